"""Launch the ptq161 GEMV a few times on one shape, for a profiler (Nsight Compute) to read.

    ncu --clock-control none --kernel-name regex:ring_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python bench/profile_ptq161.py --shape 28672x8192 --m 1 --variant ring

Prints the plan and the kernel check only: the counters are the profiler's output. The layer is random
(speed does not depend on the values), as in bench/kernels_ptq161.py, and the output is checked against
the format's reference first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_ptq161 import random_layer  # noqa: E402
from lpq.kernels import ptq161_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="28672x8192", help="OUTxIN")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--variant", default="auto", choices=sorted(ptq161_cuda.VARIANTS))
    ap.add_argument("--ksplit", type=int, default=0)
    ap.add_argument("--salient", type=float, default=0.2)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    assert torch.cuda.is_available() and ptq161_cuda.load(), "needs a CUDA GPU and the built ptq161 kernels"
    n, k = (int(v) for v in args.shape.split("x"))
    qw = random_layer(n, k, args.salient)
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x.float(), qw.dequantize())
    y = ptq161_cuda.gemv(st, x, None, variant=args.variant, ksplit=args.ksplit)
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 1e-3, f"kernel wrong: relative error {err:.2e}"
    for _ in range(args.calls):
        ptq161_cuda.gemv(st, x, None, variant=args.variant, ksplit=args.ksplit)
    torch.cuda.synchronize()
    plan = "-" if args.variant == "first" else ptq161_cuda.plan(st, args.m, variant=args.variant, ksplit=args.ksplit)
    print(f"ptq161 {n}x{k} m={args.m} {args.variant}: plan {plan}, checked (error {err:.1e}), {args.calls} calls")


if __name__ == "__main__":
    main()
