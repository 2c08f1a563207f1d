"""Launch the uniform fused kernel a few times on one shape, for a profiler (Nsight Compute) to read.

    ncu --clock-control none --kernel-name regex:uniform_gemm --launch-skip 3 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python bench/profile_uniform.py --format w3g128 --shape 28672x8192 --m 1

Prints nothing but the kernel check: the counters are the profiler's output. The weights are random
(speed does not depend on their values); the output is checked against the format's reference first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import FORMATS, check, lpq_call, random_packed  # noqa: E402
from lpq.kernels import cuda_build, uniform_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="w3g128", choices=sorted(FORMATS))
    ap.add_argument("--shape", default="28672x8192", help="OUTxIN")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    assert torch.cuda.is_available() and cuda_build.load(), "needs a CUDA GPU and the built kernels"
    n, k = (int(v) for v in args.shape.split("x"))
    bits, gs = FORMATS[args.format]
    torch.manual_seed(0)
    qw = random_packed(n, k, bits, gs)
    st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
    print(f"{args.format} {n}x{k} m={args.m}: rel err {check(st, qw, n, k, args.m):.2e}")
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    for _ in range(args.calls):
        lpq_call(st, x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
