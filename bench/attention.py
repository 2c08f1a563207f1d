"""Decode attention (one query token a sequence over a static key/value cache): lpq's kernel against SDPA.

    python bench/attention.py [--shapes 1x32x32x384x128,...] [--no-write]

Shape BxHxHkvxLxD: batch, query heads, key/value heads, cache length, head size; float16; the mask is a
static cache's (bool [B, 1, 1, L], the first L - 16 keys attended), as transformers passes it at decode.
Each implementation is timed as bench/kernels.py times kernels: CUDA-graph replays over rotated copies of
the cache (>= 256 MB, so that the cache is read from DRAM, not L2), median microseconds a call. GB/s counts
the keys and values read (every position of the cache: each implementation reads them all). Before timing,
lpq's output is checked against the plain-torch reference (lpq.kernels.attention_cuda.reference).

SDPA: torch's dispatcher's own choice (cuDNN on the H100 for these calls), then each backend that accepts
the call, held to it through torch's switches (cudnn, efficient, math; flash takes no mask).

Writes the section "## Decode attention: lpq kernel against SDPA" of bench/RESULTS.md and
bench/results/attention-h100.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import copies_for, timed  # noqa: E402
from results_io import device_name, publish, versions  # noqa: E402

from lpq.kernels import attention_cuda  # noqa: E402

SECTION = "Decode attention: lpq kernel against SDPA"
DEFAULT_SHAPES = "1x32x32x384x128,1x32x32x2048x128,1x32x8x4096x128,1x64x8x8192x128,8x32x32x1024x128,1x32x32x384x64"
BACKENDS = {"cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
            "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
            "math": torch.nn.attention.SDPBackend.MATH}


def parse_shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 5:
        raise SystemExit(f"--shapes: {text!r} is not BxHxHkvxLxD")
    return parts


def sdpa_call(q, k, v, mask, rep: int):
    # transformers' own SDPA path: grouped heads through enable_gqa where torch has it
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)
    return out.transpose(1, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not attention_cuda.load():
        print(f"error: the decode attention kernel did not build: {attention_cuda.failure_reason()}", file=sys.stderr)
        return 2
    records = []
    for shape in [parse_shape(s) for s in args.shapes.split(",") if s]:
        b, h, hkv, length, d = shape
        rep = h // hkv
        kv_bytes = 2 * b * hkv * length * d * 2
        n = copies_for(kv_bytes)
        g = torch.Generator(device="cuda").manual_seed(0)
        qs = [torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
        ks = [torch.randn(b, hkv, length, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
        vs = [torch.randn(b, hkv, length, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(n)]
        mask = (torch.arange(length, device="cuda") < max(1, length - 16)).view(1, 1, 1, length).expand(b, 1, 1, length)
        got = attention_cuda.decode_attention(qs[0], ks[0], vs[0], mask)
        want = attention_cuda.reference(qs[0], ks[0], vs[0], mask)
        err = (got.float() - want.float()).abs().max().item()
        splits, kps = attention_cuda.plan(b * h, length, d)
        row = {"shape": f"{b}x{h}x{hkv}x{length}x{d}", "batch": b, "heads": h, "kv_heads": hkv, "cache": length,
               "head_size": d, "kv_bytes": kv_bytes, "max_abs_err": err, "splits": splits, "keys_per_split": kps}
        row["lpq_us"] = timed(lambda i: attention_cuda.decode_attention(qs[i], ks[i], vs[i], mask), n)
        row["sdpa_us"] = timed(lambda i: sdpa_call(qs[i], ks[i], vs[i], mask, rep), n)
        for name, backend in BACKENDS.items():
            try:
                with torch.nn.attention.sdpa_kernel([backend]):
                    row[f"sdpa_{name}_us"] = timed(lambda i: sdpa_call(qs[i], ks[i], vs[i], mask, rep), n)
            except RuntimeError as e:  # a backend that refuses this call
                row[f"sdpa_{name}_us"] = None
                row[f"sdpa_{name}_refused"] = str(e).splitlines()[0][:160]
        row["lpq_gbs"] = kv_bytes / row["lpq_us"] / 1e3
        row["speedup_vs_sdpa"] = row["sdpa_us"] / row["lpq_us"]
        row.update({"device": device_name("cuda"), "date": datetime.date.today().isoformat(), "dtype": "float16"})
        records.append(row)
        print(row, flush=True)
        del qs, ks, vs
        torch.cuda.empty_cache()
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [
        f"{device_name('cuda')}; {versions()}; date {datetime.date.today().isoformat()}.",
        f"Command: `python bench/attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`. " +
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| B x H x Hkv x L x D | K+V MB | runs x keys | lpq us | GB/s | SDPA us (its choice) | cuDNN us | efficient us | math us | x SDPA | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['shape']} | {r['kv_bytes'] / 1e6:.1f} | {r['splits']} x {r['keys_per_split']} | "
                     f"{r['lpq_us']:.1f} | {r['lpq_gbs']:.0f} | {r['sdpa_us']:.1f} | {fmt(r['sdpa_cudnn_us'])} | "
                     f"{fmt(r['sdpa_efficient_us'])} | {fmt(r['sdpa_math_us'])} | {r['speedup_vs_sdpa']:.2f} | "
                     f"{r['max_abs_err']:.1e} |")
    publish(SECTION, "attention-h100", records, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
