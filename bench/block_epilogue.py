"""What the epilogues of a fused decoder block (lpq.fuse.DecodeBlock) cost inside lpq's uniform kernel, on the 7B
decode shapes at batch 1.

    python bench/block_epilogue.py [--formats w4g128,w3g128] [--no-write]

A fused block runs its four projections with these epilogues (lpq.epilogue):

    qkv      12288x4096   norm_sq: the input RMSNorm's scale from the sums of squares the previous down_proj wrote
    o_proj    4096x4096   residual: h = y + residual, w_post * h and the sums of h^2 for gate/up
    gate_up  22016x4096   norm_sq and swiglu
    down      4096x11008  residual: h = y + residual, w_next * h and the sums of h^2 for the next block's q/k/v

Per format and projection, two timings of one call: the kernel with the epilogues the unfused block runs (swiglu
only, for gate/up) and with the block's. Each is captured in a CUDA graph over rotating copies of the weights
(>= 256 MB, so that L2 never holds them), median of the replays (bench/kernels.py's `timed`). Each epilogue call is
first checked against the fp32 reference. Writes the section "## Block epilogues in the uniform kernel (decode
shapes)" of bench/RESULTS.md and bench/results/block-epilogue-h100.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import FORMATS, checked_rel_err, uniform_bench_setup, timed, weight_copies  # noqa: E402
from results_io import device_name, publish, versions  # noqa: E402

from lpq.epilogue import swiglu_interleaved  # noqa: E402
from lpq.formats.uniform import UNIFORM  # noqa: E402
from lpq.kernels import uniform_cuda  # noqa: E402

SECTION = "Block epilogues in the uniform kernel (decode shapes)"
# name: (N, K, epilogue) with epilogue "norm_sq", "norm_sq+swiglu" or "residual"
PROJECTIONS = {"qkv": (12288, 4096, "norm_sq"), "o_proj": (4096, 4096, "residual"),
               "gate_up": (22016, 4096, "norm_sq+swiglu"), "down": (4096, 11008, "residual")}
EPS = 1e-5
SLOTS = 256  # sums of squares a 4096-wide producer writes (one per 16 outputs)


def inputs(n: int, k: int):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=g).half()
    h = (torch.randn(1, k, device="cuda", generator=g) * 3).half()
    sq = torch.stack([c.sum(-1) for c in h.float().pow(2).tensor_split(SLOTS, dim=-1)], dim=-1)  # [1, SLOTS]
    res = torch.randn(1, n, device="cuda", generator=g).half()
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).half()
    return x, h, sq, res, w


def check(st, qw, n: int, k: int, epilogue: str) -> float:
    x, h, sq, res, w = inputs(n, k)
    wt = UNIFORM.dequantize(qw.tensors, qw.spec, k, n)
    if epilogue == "residual":
        got, x_next, sums = uniform_cuda.gemm_residual(st, x, None, res, w)
        ref = x.float() @ wt.t() + res.float()
        if not torch.equal(x_next, w * got) or not torch.allclose(sums.sum(-1), got.float().pow(2).sum(-1), rtol=1e-4):
            raise SystemExit(f"block epilogue check failed: {qw.spec.label()} {n}x{k}: next_w * h or the sums")
    else:
        swiglu = epilogue.endswith("swiglu")
        got = uniform_cuda.gemm(st, x, None, norm_sq=sq, norm_eps=EPS, swiglu=swiglu)
        ref = (x.float() * torch.rsqrt(sq.sum(-1, keepdim=True) / k + EPS)) @ wt.t()
        ref = swiglu_interleaved(ref) if swiglu else ref
    return checked_rel_err(got, ref, f"block epilogue: {qw.spec.label()} {n}x{k} {epilogue}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="w4g128,w3g128")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    fmts = uniform_bench_setup(args)
    if fmts == 2:
        return 2
    records = []
    for fmt in fmts:
        bits, gs = FORMATS[fmt]
        for proj, (n, k, epilogue) in PROJECTIONS.items():
            qw, sts = weight_copies(n, k, bits, gs)
            st0, copies = sts[0], len(sts)
            err = check(st0, qw, n, k, epilogue)
            x, h, sq, res, w = inputs(n, k)
            swiglu = epilogue.endswith("swiglu")
            plain = timed(lambda i: uniform_cuda.gemm(sts[i], x, None, swiglu=swiglu), copies)
            if epilogue == "residual":
                fused = timed(lambda i: uniform_cuda.gemm_residual(sts[i], x, None, res, w), copies)
            else:
                fused = timed(lambda i: uniform_cuda.gemm(sts[i], x, None, norm_sq=sq, norm_eps=EPS, swiglu=swiglu),
                              copies)
            row = {"format": fmt, "projection": proj, "n": n, "k": k, "m": 1, "epilogue": epilogue, "rel_err": err,
                   "plain_us": plain, "block_us": fused, "device": device_name("cuda"),
                   "date": datetime.date.today().isoformat(), "dtype": "float16"}
            records.append(row)
            print(row, flush=True)
            del sts, st0, qw
            torch.cuda.empty_cache()
    lines = [
        f"{device_name('cuda')}; {versions()}; date {datetime.date.today().isoformat()}.",
        f"Command: `python bench/block_epilogue.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        "m = 1, float16. plain: the kernel with the epilogues of the unfused block (swiglu for gate/up); block: with "
        "the fused block's (norm_sq from 256 slots, or the residual epilogue). CUDA-graph replays over rotated "
        "weight copies, median.",
        "",
        "| format | projection | block epilogue | plain us | block us | cost us | rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt in dict.fromkeys(r["format"] for r in records):
        rows = [r for r in records if r["format"] == fmt]
        for r in rows:
            lines.append(f"| {fmt} | {r['projection']} {r['n']}x{r['k']} | {r['epilogue']} | {r['plain_us']:.2f} | "
                         f"{r['block_us']:.2f} | {r['block_us'] - r['plain_us']:+.2f} | {r['rel_err']:.1e} |")
        plain, block = sum(r["plain_us"] for r in rows), sum(r["block_us"] for r in rows)
        lines.append(f"| {fmt} | a block's four | | {plain:.2f} | {block:.2f} | {block - plain:+.2f} | |")
    publish(SECTION, "block-epilogue-h100", records, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
