"""The fused epilogues of lpq's uniform kernel (lpq.epilogue: RMSNorm folded in, silu(gate) * up) against the small
kernels they replace, on the 7B decode shapes at batch 1.

    python bench/epilogue.py [--formats w4g128,w3g128] [--m 1] [--no-write]

Per format, m and projection (q/k/v 12288x4096 reading input_layernorm; gate/up 22016x4096 reading
post_attention_layernorm, then silu(gate) * up), four timings of one call, each torch.compile'd (inductor) where it
has torch ops, captured in a CUDA graph over rotating copies of the weights (>= 256 MB, so that L2 never holds
them), median of the replays (bench/kernels.py's `timed`):

    kernel          the GEMV alone
    kernel+norm     the GEMV with the RMSNorm epilogue only (norm_x)
    kernel+swiglu   gate/up only: the GEMV with the swiglu epilogue only
    kernel+epi      the GEMV computing all its epilogues (norm_x, and swiglu for gate/up), on w * h
    unfused         h = r + d; RMSNorm(h) as transformers writes it; the GEMV; silu(gate) * up of its two halves
    fused           h = r + d; w * h; the GEMV with its epilogues (what lpq.fuse_for_decode runs)

unfused - fused is what folding saves a block's projection; kernel+epi - kernel is what the epilogue costs inside
the kernel. Each lpq call is first checked against the fp32 reference. Writes the section "## Fused epilogues in
the uniform kernel (decode shapes)" of bench/RESULTS.md and bench/results/epilogue-h100.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import FORMATS, checked_rel_err, uniform_bench_setup, st_bytes, timed, weight_copies  # noqa: E402
from results_io import device_name, publish, versions  # noqa: E402

from lpq.epilogue import rms_scale, swiglu_interleaved  # noqa: E402
from lpq.formats.uniform import UNIFORM  # noqa: E402
from lpq.kernels import uniform_cuda  # noqa: E402

SECTION = "Fused epilogues in the uniform kernel (decode shapes)"
PROJECTIONS = {"qkv": (12288, 4096, False), "gate_up": (22016, 4096, True)}  # N, K, swiglu
EPS = 1e-5


def unfused_fn(swiglu: bool):
    def fn(r, d, w, st):
        h = r + d
        hf = h.float()
        x = w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
        y = uniform_cuda.gemm(st, x, None)
        if swiglu:
            n = y.shape[-1] // 2
            y = F.silu(y[:, :n]) * y[:, n:]
        return h, y
    return fn


def fused_fn(swiglu: bool):
    def fn(r, d, w, st):
        h = r + d
        return h, uniform_cuda.gemm(st, (w * h).to(h.dtype), None, norm_x=h, norm_eps=EPS, swiglu=swiglu)
    return fn


def check(st, qw, n, k, m, swiglu: bool) -> float:
    h = torch.randn(m, k, device="cuda", dtype=torch.float16) * 4
    w = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    wt = UNIFORM.dequantize(qw.tensors, qw.spec, k, n)
    ref = (w.float() * h.float() * rms_scale(h, EPS)) @ wt.t()
    ref = swiglu_interleaved(ref) if swiglu else ref
    y = uniform_cuda.gemm(st, (w * h).half(), None, norm_x=h, norm_eps=EPS, swiglu=swiglu)
    return checked_rel_err(y, ref, f"epilogue: {qw.spec.label()} {n}x{k} m={m}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="w4g128,w3g128")
    ap.add_argument("--m", default="1")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    fmts = uniform_bench_setup(args)
    if fmts == 2:
        return 2
    records = []
    for fmt in fmts:
        bits, gs = FORMATS[fmt]
        for proj, (n, k, swiglu) in PROJECTIONS.items():
            qw, sts = weight_copies(n, k, bits, gs)
            st0, copies = sts[0], len(sts)
            for m in [int(v) for v in args.m.split(",")]:
                err = check(st0, qw, n, k, m, swiglu)
                r = torch.randn(m, k, device="cuda", dtype=torch.float16)
                d = torch.randn(m, k, device="cuda", dtype=torch.float16)
                w = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
                h = r + d
                x = (w * h).half()
                torch._dynamo.reset()
                unfused, fused = torch.compile(unfused_fn(swiglu)), torch.compile(fused_fn(swiglu))
                row = {"format": fmt, "projection": proj, "n": n, "k": k, "m": m, "swiglu": swiglu, "rel_err": err,
                       "weight_bytes": st_bytes(st0)}
                row["kernel_us"] = timed(lambda i: uniform_cuda.gemm(sts[i], x, None), copies)
                row["kernel_norm_us"] = timed(lambda i: uniform_cuda.gemm(sts[i], x, None, norm_x=h, norm_eps=EPS),
                                              copies)
                row["kernel_swiglu_us"] = timed(lambda i: uniform_cuda.gemm(sts[i], x, None, swiglu=True),
                                                copies) if swiglu else None
                row["kernel_epi_us"] = timed(lambda i: uniform_cuda.gemm(sts[i], x, None, norm_x=h, norm_eps=EPS,
                                                                         swiglu=swiglu), copies)
                row["unfused_us"] = timed(lambda i: unfused(r, d, w, sts[i]), copies)
                row["fused_us"] = timed(lambda i: fused(r, d, w, sts[i]), copies)
                row.update({"device": device_name("cuda"), "date": datetime.date.today().isoformat(), "dtype": "float16"})
                records.append(row)
                print(row, flush=True)
            del sts, st0, qw
            torch.cuda.empty_cache()
    lines = [
        f"{device_name('cuda')}; {versions()}; date {datetime.date.today().isoformat()}.",
        f"Command: `python bench/epilogue.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        + " ".join(__doc__.split("\n\n")[2].split()),
        "",
        "| format | projection | m | kernel us | kernel+norm us | kernel+swiglu us | kernel+epi us | unfused us | fused us "
        "| saved us | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        sw = "-" if r["kernel_swiglu_us"] is None else f"{r['kernel_swiglu_us']:.1f}"
        lines.append(f"| {r['format']} | {r['projection']} {r['n']}x{r['k']} | {r['m']} | {r['kernel_us']:.1f} | "
                     f"{r['kernel_norm_us']:.1f} | {sw} | {r['kernel_epi_us']:.1f} | {r['unfused_us']:.1f} | {r['fused_us']:.1f} | "
                     f"{r['unfused_us'] - r['fused_us']:.1f} | {r['rel_err']:.1e} |")
    publish(SECTION, "epilogue-h100", records, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
