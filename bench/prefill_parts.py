"""Where the large-m (prefill) path of the uniform format spends its time: dequantize, then cuBLAS.

    python bench/prefill_parts.py [--formats w4g128,w3g128] [--shapes 4096x4096,11008x4096] [--m 2048] [--no-write]

Per shape and format, four timings (us, median of CUDA-graph replays over rotated copies of >= 256 MB, as
bench/kernels.py times, so that L2 never holds the weights a call starts with):
    cuBLAS      F.linear on fp16 weights (random, the baseline of bench/kernels.py)
    dequant     lpq's dequantize kernel alone (packed -> fp16 weight)
    GEMM        F.linear on weights lpq dequantized beforehand (rotated copies)
    lpq         dequantize + F.linear, the path QuantizedLinear takes above m = 64
and the dequantize kernel's bandwidth (packed bytes read + fp16 bytes written) against a 3.0 TB/s roofline. The issue 4
target is lpq <= 1.15x cuBLAS; lpq - GEMM is what the dequantize adds inside the path.

Writes the section "## Prefill path: where the time goes" of bench/RESULTS.md and bench/results/prefill-parts-h100.json.
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

from kernels import FORMATS, ROOFLINE_TBPS, copies_for, st_bytes, timed, uniform_bench_setup, weight_copies  # noqa: E402
from results_io import device_name, publish, versions  # noqa: E402

from lpq.kernels import uniform_cuda  # noqa: E402

SECTION = "Prefill path: where the time goes"
DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008,8192x8192,28672x8192"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="w4g128,w3g128")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    fmts = uniform_bench_setup(args)
    if fmts == 2:
        return 2
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        print(f"error: --shapes {args.shapes!r}: write NxK,NxK (e.g. 4096x4096)", file=sys.stderr)
        return 2
    m = args.m
    records = []
    torch.manual_seed(0)
    for n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        nc = copies_for(n * k * 2)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nc)]
        cublas = timed(lambda i: F.linear(x, ws[i]), nc)
        del ws
        for fmt in fmts:
            bits, gs = FORMATS[fmt]
            _, sts = weight_copies(n, k, bits, gs)
            dq = timed(lambda i: uniform_cuda.dequant(sts[i], torch.float16), len(sts))
            path = timed(lambda i: F.linear(x, uniform_cuda.dequant(sts[i], torch.float16)), len(sts))
            wd = [uniform_cuda.dequant(st, torch.float16) for st in sts[: copies_for(n * k * 2)]]
            gemm = timed(lambda i: F.linear(x, wd[i]), len(wd))
            dq_bytes = st_bytes(sts[0]) + n * k * 2
            row = {"format": fmt, "n": n, "k": k, "m": m, "cublas_us": cublas, "dequant_us": dq, "gemm_us": gemm,
                   "lpq_us": path, "dequant_tbps": dq_bytes / dq / 1e6,
                   "dequant_roofline": dq_bytes / dq / 1e6 / ROOFLINE_TBPS, "lpq_over_cublas": path / cublas,
                   "device": device_name("cuda"), "date": datetime.date.today().isoformat(), "dtype": "float16"}
            records.append(row)
            print(row, flush=True)
            del sts, wd
            torch.cuda.empty_cache()
    lines = [
        f"{device_name('cuda')}; {versions()}; date {datetime.date.today().isoformat()}.",
        f"Command: `python bench/prefill_parts.py {' '.join(argv if argv is not None else sys.argv[1:])}`. m = {m}, "
        "float16. cuBLAS: F.linear on fp16 weights; dequant: lpq's dequantize kernel alone (its TB/s counts packed "
        f"bytes read + fp16 bytes written, roofline {ROOFLINE_TBPS} TB/s); GEMM: F.linear on weights dequantized "
        "beforehand; lpq: dequantize + F.linear (QuantizedLinear above m = 64). CUDA-graph replays over rotated copies "
        "(>= 256 MB), median. Issue 4's target: lpq <= 1.15x cuBLAS.",
        "",
        "| shape | format | cuBLAS us | dequant us | dequant TB/s | GEMM us | lpq us | lpq - GEMM us | lpq / cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['n']}x{r['k']} | {r['format']} | {r['cublas_us']:.1f} | {r['dequant_us']:.1f} | "
                     f"{r['dequant_tbps']:.2f} ({r['dequant_roofline']:.0%}) | {r['gemm_us']:.1f} | {r['lpq_us']:.1f} | "
                     f"{r['lpq_us'] - r['gemm_us']:.1f} | {r['lpq_over_cublas']:.2f} |")
    publish(SECTION, "prefill-parts-h100", records, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
