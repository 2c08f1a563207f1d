"""The read floor of each packed format (PROTOCOL §4 timing): how fast can ANY kernel be that has to read
a layer's packed bytes, and so which speed-up targets are reachable at all under this timing.

  python bench/floor.py [--shapes 4096x4096,...] [--formats w4g128,w3g128,w2g64,s3,s3sp,s4,p161,p161s40]

For each shape (out x in) and format, in one run:
- cuBLAS fp16 through F.linear at m = 1 (the baseline of every target);
- lpq's default kernel for that format at m = 1 (uniform_cuda, squeezellm_cuda, ptq161_cuda), checked
  against the format's fp32 reference first;
- the read floor: a streaming kernel that does nothing but read the same number of bytes (packed weights
  + scales/zeros/codebooks/sparse parts + activations, as each kernel bench counts them) with 16-byte
  non-allocating loads and xor-folds them, the best of a sweep of block sizes, loads in flight per thread
  and grid sizes (persistent waves of 1-8 blocks an SM, or one pass over the data);
- the same floor launched with programmatic dependent launch, signalling its dependents at its start and
  waiting for its predecessor only before its (data-dependent, almost never taken) store: the most that
  overlapping consecutive calls can hide;
- an empty kernel: what one more node of a CUDA graph costs.
Every figure uses bench/kernels.py's timer: CUDA-graph replays over rotated copies (>= 256 MB in all, so
L2 never holds them), median over >= 200 calls.

The bound: a kernel that must read B bytes cannot beat the floor for B, so a target speed-up T over
cuBLAS is out of reach for every kernel when cuBLAS us / T < floor us. The table gives the ceiling
cuBLAS / floor beside the target and lpq's kernel, and lpq's share of the floor (floor us / lpq us).

Writes the section "Kernels: the read floor of each format" of bench/RESULTS.md and
bench/results/floor-h100.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernels import ROOFLINE_TBPS, SHAPES, copies_for, timed  # noqa: E402  (one timer for every kernel bench)
from results_io import write_records, write_section  # noqa: E402

SECTION = "Kernels: the read floor of each format"
# format -> (family, target speed-up over cuBLAS fp16 at m = 1 on the large shapes, the issue that sets it)
FORMATS = {
    "w4g128": ("uniform", 3.2, 4), "w3g128": ("uniform", 4.0, 4), "w2g64": ("uniform", 5.0, 4),
    "s4": ("squeezellm", 3.2, 5), "s3": ("squeezellm", 4.0, 5), "s3sp": ("squeezellm", 3.5, 5),
    "p161": ("ptq161", 6.0, 6), "p161s40": ("ptq161", None, 6),
}
SMALL_SHAPE = (4096, 4096)  # the one shape that is not "large" (issue 4); only W4 has a target there
SMALL_W4_TARGET = 2.5


def target_for(fmt: str, n: int, k: int) -> tuple[float | None, int]:
    """The speed-up over cuBLAS an issue asks of this format on this shape (None: no target), and the issue."""
    _, target, issue = FORMATS[fmt]
    if (n, k) == SMALL_SHAPE:
        return (SMALL_W4_TARGET if fmt == "w4g128" else None), issue
    return target, issue
UNIFORM = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}
LUT = {"s4": (4, 0.0), "s3": (3, 0.0), "s3sp": (3, 0.0045)}
SALIENT = {"p161": 0.2, "p161s40": 0.4}

_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

// 16 bytes from global memory, not kept in L1 (each byte is read once)
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Reads n16 16-byte words with a grid-stride loop, UNROLL loads in flight per thread. The xor-fold and the
// store on an (almost) impossible value keep every load alive without writing anything measurable.
template <int UNROLL, bool PDL>
__global__ void read_words(const uint4* __restrict__ p, long long n16, unsigned sentinel, unsigned* out) {
  if (PDL) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += stride * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * stride;
      v[u] = j < n16 ? load_stream(p + j) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (acc == sentinel) out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

__global__ void empty_kernel() {}

template <int UNROLL, bool PDL>
static void launch(const uint4* p, long long n16, unsigned* out, int blocks, int threads) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = PDL ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, read_words<UNROLL, PDL>, p, n16, 0x9e3779b9u, out));
}

void read_floor(torch::Tensor buf, int64_t offset, int64_t nbytes, int64_t blocks, int64_t threads,
                int64_t unroll, bool pdl, torch::Tensor out) {
  TORCH_CHECK(offset % 16 == 0, "offset must be 16-byte aligned");
  TORCH_CHECK(offset + nbytes <= buf.numel(), "read past the buffer");
  TORCH_CHECK(out.numel() >= blocks * threads, "out too small");
  const uint4* p = reinterpret_cast<const uint4*>(buf.data_ptr<uint8_t>() + offset);
  const long long n16 = (nbytes + 15) / 16;
  unsigned* o = reinterpret_cast<unsigned*>(out.data_ptr<int32_t>());
  const int b = (int)blocks, t = (int)threads;
  if (unroll == 2) { if (pdl) launch<2, true>(p, n16, o, b, t); else launch<2, false>(p, n16, o, b, t); }
  else if (unroll == 4) { if (pdl) launch<4, true>(p, n16, o, b, t); else launch<4, false>(p, n16, o, b, t); }
  else if (unroll == 8) { if (pdl) launch<8, true>(p, n16, o, b, t); else launch<8, false>(p, n16, o, b, t); }
  else TORCH_CHECK(false, "unroll must be 2, 4 or 8");
}

void empty(int64_t dummy) {
  empty_kernel<<<1, 32, 0, at::cuda::getCurrentCUDAStream()>>>();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""


def _extension():
    from torch.utils.cpp_extension import load_inline

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return load_inline(
        name="lpq_bench_floor", cpp_sources="void read_floor(torch::Tensor buf, int64_t offset, int64_t nbytes, "
        "int64_t blocks, int64_t threads, int64_t unroll, bool pdl, torch::Tensor out);\nvoid empty(int64_t dummy);",
        cuda_sources=_SRC, functions=["read_floor", "empty"],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"], verbose=False)


def floor_configs(n16: int, sms: int) -> list[tuple[int, int, int]]:
    """(blocks, threads, unroll) to sweep: persistent grids of 1-8 blocks an SM (at most 2048 threads an SM)
    and the one-pass grid (each thread issues its UNROLL loads once)."""
    out = []
    for threads in (256, 512, 1024):
        for unroll in (2, 4, 8):
            grids = {sms * w for w in (1, 2, 4, 8) if w * threads <= 2048}
            grids.add(max(1, -(-n16 // (threads * unroll))))
            out += [(b, threads, unroll) for b in sorted(grids)]
    return out


def read_floor_us(ext, nbytes: int, sms: int, pdl: bool) -> tuple[float, tuple[int, int, int]]:
    """The best time per call of reading nbytes over rotated copies, and the (blocks, threads, unroll) of it."""
    stride = -(-nbytes // 256) * 256
    copies = copies_for(stride)
    buf = torch.randint(0, 256, (stride * copies,), device="cuda", dtype=torch.uint8)
    n16 = -(-nbytes // 16)
    configs = floor_configs(n16, sms)
    out = torch.zeros(max(b * t for b, t, _ in configs), device="cuda", dtype=torch.int32)
    best = None
    for b, t, u in configs:
        us = timed(lambda i: ext.read_floor(buf, i * stride, nbytes, b, t, u, pdl, out), copies)
        if best is None or us < best[0]:
            best = (us, (b, t, u))
    del buf
    return best


def ceiling_verdict(cublas_us: float, floor_us: float, target: float | None) -> str:
    """Whether a target speed-up over cuBLAS is within the read floor: the time it needs against the floor."""
    if target is None:
        return "-"
    need = cublas_us / target
    return (f"needs {need:.1f} us: below the floor" if need < floor_us
            else f"needs {need:.1f} us: {floor_us / need:.0%} of it is the floor")


def layer_for(fmt: str, n: int, k: int, gen: torch.Generator):
    """-> (call(i, x) running lpq's default kernel on copy i, bytes the kernel reads per call (without
    activations/output), number of copies, fp32 dense reference weight [n, k])."""
    family = FORMATS[fmt][0]
    if family == "uniform":
        from kernels import lpq_call, random_packed, st_bytes
        from lpq.formats.uniform import UNIFORM as UNI
        from lpq.kernels import uniform_cuda

        bits, gs = UNIFORM[fmt]
        qw = random_packed(n, k, bits, gs)
        st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
        w = UNI.dequantize(qw.tensors, qw.spec, k, n)
        nbytes = st_bytes(st)
        nc = copies_for(nbytes)
        sts = [st] + [{**st, "qw": st["qw"].clone(), "sc": st["sc"].clone(), "zp": st["zp"].clone()}
                      for _ in range(nc - 1)]
        return (lambda i, x: lpq_call(sts[i], x)), nbytes, nc, w
    if family == "squeezellm":
        from kernels_lut import lpq_call as lut_call, random_layer as lut_layer, state_bytes, state_copy
        from lpq.formats.squeezellm import SQUEEZELLM
        from lpq.kernels import squeezellm_cuda

        bits, density = LUT[fmt]
        spec, tensors, _ = lut_layer(n, k, bits, density, gen)
        st = squeezellm_cuda.repack(tensors, spec, k, n)
        w = SQUEEZELLM.dequantize(tensors, spec, k, n).float()
        nbytes = state_bytes(st)
        nc = copies_for(nbytes)
        sts = [st] + [state_copy(st) for _ in range(nc - 1)]
        return (lambda i, x: lut_call(sts[i], x)), nbytes, nc, w
    from kernels_ptq161 import random_layer as p161_layer
    from lpq.kernels import ptq161_cuda

    qw = p161_layer(n, k, SALIENT[fmt])
    st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
    w = qw.dequantize().float()
    nbytes = sum(t.numel() * t.element_size() for t in qw.tensors.values())  # as bench/kernels_ptq161.py counts
    nc = copies_for(nbytes)
    sts = [st] + [{**st, "qw": st["qw"].clone(), "sw": st["sw"].clone()} for _ in range(nc - 1)]
    return (lambda i, x: ptq161_cuda.gemv(sts[i], x, None)), nbytes, nc, w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--section", default=SECTION)
    ap.add_argument("--records", default="floor-h100")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    fmts = [f for f in args.formats.split(",") if f]
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    from lpq.kernels import cuda_build, ptq161_cuda

    loads = {"uniform": cuda_build.load, "squeezellm": cuda_build.load_lut, "ptq161": ptq161_cuda.load}
    for family in sorted({FORMATS[f][0] for f in fmts}):
        assert loads[family](), f"lpq's {family} CUDA kernels are unavailable"
    ext = _extension()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.manual_seed(0)
    empty_us = timed(lambda i: ext.empty(0), 64)
    records = []
    for n, k in shapes:
        m = 1
        io = (m * k + m * n) * 2
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_for(n * k * 2))]
        cublas_us = timed(lambda i: F.linear(x, ws[i]), len(ws))
        del ws
        fp16_floor, _ = read_floor_us(ext, n * k * 2 + io, sms, pdl=False)
        records.append(dict(gpu=gpu, kernel="cublas_fp16", format="fp16", m=m, n=n, k=k, dtype="float16",
                            us=cublas_us, bytes=n * k * 2 + io, floor_us=fp16_floor, date=date,
                            torch=torch.__version__, cuda=torch.version.cuda,
                            command=shlex.join(["python", "bench/floor.py", *sys.argv[1:]]),
                            configs=len(floor_configs(1 << 20, sms)), empty_kernel_us=empty_us))
        for fmt in fmts:
            call, nbytes, nc, w = layer_for(fmt, n, k, gen)
            ref = x.float() @ w.t()
            y = call(0, x)
            err = float((y.float() - ref).norm() / ref.norm())
            if not err < 1e-3:
                raise SystemExit(f"{fmt} kernel wrong on {n}x{k}: relative error {err:.2e}")
            del w, ref
            timed(lambda i: call(i, x), nc)  # discarded: the first timing after the copies runs slow
            lpq_us = timed(lambda i: call(i, x), nc)
            moved = nbytes + io
            floor_us, cfg = read_floor_us(ext, moved, sms, pdl=False)
            pdl_us, pdl_cfg = read_floor_us(ext, moved, sms, pdl=True)
            target, issue = target_for(fmt, n, k)
            rec = dict(gpu=gpu, kernel=FORMATS[fmt][0] + "_cuda", format=fmt, m=m, n=n, k=k, dtype="float16",
                       bytes=moved, bpw=nbytes * 8 / (n * k), us=lpq_us, cublas_us=cublas_us, floor_us=floor_us,
                       floor_config=dict(zip(("blocks", "threads", "unroll"), cfg)), floor_pdl_us=pdl_us,
                       floor_pdl_config=dict(zip(("blocks", "threads", "unroll"), pdl_cfg)),
                       speedup_vs_cublas=cublas_us / lpq_us, ceiling_vs_cublas=cublas_us / floor_us,
                       ceiling_pdl_vs_cublas=cublas_us / pdl_us, share_of_floor=floor_us / lpq_us,
                       roofline_share=moved / lpq_us / 1e6 / ROOFLINE_TBPS, target=target, issue=issue,
                       verdict=ceiling_verdict(cublas_us, floor_us, target), empty_kernel_us=empty_us, date=date)
            records.append(rec)
            print(rec, flush=True)
            del call
            torch.cuda.empty_cache()
        print(f"done {n}x{k}", flush=True)
    body = render(records)
    print(body)
    if not args.no_write:
        write_section(args.section, body)
        write_records(args.records, records)


def render(records: list[dict]) -> str:
    """The section's text from the records of one run (its first record, cuBLAS's, carries the run's facts)."""
    head = records[0]
    rows = []
    for r in records:
        if r["format"] == "fp16":
            rows.append(f"| {r['n']}x{r['k']} | fp16 | {r['bytes'] / 1e6:.2f} | {r['floor_us']:.1f} | - | {r['us']:.1f} | "
                        f"{r['floor_us'] / r['us']:.0%} | 1.00 | - | - | - |")
            continue
        target, issue = target_for(r["format"], r["n"], r["k"])
        rows.append(f"| {r['n']}x{r['k']} | {r['format']} | {r['bytes'] / 1e6:.2f} | {r['floor_us']:.1f} | "
                    f"{r['floor_pdl_us']:.1f} | {r['us']:.1f} | {r['floor_us'] / r['us']:.0%} | "
                    f"{r['cublas_us'] / r['us']:.2f} | {r['cublas_us'] / r['floor_us']:.2f} | "
                    f"{'-' if target is None else f'{target:g}x (issue {issue})'} | "
                    f"{ceiling_verdict(r['cublas_us'], r['floor_us'], target)} |")
    return "\n".join([
        f"GPU: {head['gpu']}; torch {head['torch']}, CUDA {head['cuda']}; date {head['date']}; command: "
        f"`{head['command']}`. m = 1, fp16. Formats: wXgY uniform X bits in groups of Y; sX squeezellm X-bit "
        f"dense-only, s3sp with 0.45 % sparse; p161 ptq161 with 20 % salient channels, p161s40 with 40 %. MB: what "
        f"the kernel reads and writes per call (packed tensors as its own bench counts them + activations + output). "
        f"floor us: the best of {head['configs']} configurations of a kernel that only streams those bytes (16-byte "
        f"non-allocating loads); PDL floor: the same with programmatic dependent launch, overlapping the call before "
        f"it. lpq us: lpq's default kernel, checked against the fp32 reference. share: floor us / lpq us. ceiling: "
        f"cuBLAS us / floor us, the most any kernel reading these bytes can reach under this timing. target: the "
        f"issue's speed-up over cuBLAS for this format and shape (issue 4: W4 2.5x on 4096x4096, 3.2x / W3 4x / W2 5x "
        f"on the larger shapes; issue 5 and 6 on the larger shapes). An empty kernel costs {head['empty_kernel_us']:.2f} "
        f"us a call here. All timings: CUDA-graph replays over rotated copies (>= 256 MB), median of >= 200 calls.",
        "",
        "| shape (out x in) | format | MB | floor us | PDL floor us | lpq us | share of floor | lpq x cuBLAS | "
        "ceiling x cuBLAS | target | target vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"


if __name__ == "__main__":
    main()
