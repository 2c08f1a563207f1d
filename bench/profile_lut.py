"""Launch the squeezellm LUT kernel a few times on one shape, for a profiler (Nsight Compute) to read.

    ncu --clock-control none --kernel-name regex:lut_gemm --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python bench/profile_lut.py --format s3 --shape 28672x8192 --m 1

Prints nothing but the kernel check: the counters are the profiler's output. The layer is random (speed
does not depend on the values), as in bench/kernels_lut.py, and the output is checked against the
format's reference first. `--variant ring|first` and `--warps` pick the kernel as LPQ_LUT_VARIANT and
LPQ_LUT_WARPS would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_lut import FORMATS, check, lpq_call, random_layer  # noqa: E402
from lpq.kernels import cuda_build, squeezellm_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="s3", choices=sorted(FORMATS))
    ap.add_argument("--shape", default="28672x8192", help="OUTxIN")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--variant", default=None, choices=sorted(squeezellm_cuda.VARIANTS))
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    assert torch.cuda.is_available() and cuda_build.load_lut(), "needs a CUDA GPU and the built LUT kernels"
    n, k = (int(v) for v in args.shape.split("x"))
    bits, density = FORMATS[args.format]
    gen = torch.Generator(device="cuda").manual_seed(0)
    spec, tensors, _ = random_layer(n, k, bits, density, gen)
    st = squeezellm_cuda.repack(tensors, spec, k, n)
    check(st, spec, tensors, n, k, [args.m])
    variant = None if args.variant is None else squeezellm_cuda.VARIANTS[args.variant]
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    for _ in range(args.calls):
        lpq_call(st, x, args.warps, variant)
    torch.cuda.synchronize()
    print(f"{args.format} {n}x{k} m={args.m}: checked, {args.calls} calls")


if __name__ == "__main__":
    main()
