"""Kernel speed of lpq's squeezellm LUT kernels (PROTOCOL §4).

  python bench/kernels_lut.py [--quick] [--formats s3,s3sp,s4] [--m 1,16] [--shapes 4096x4096,...] [--sweep]

Per shape (out x in) and batch m: lpq's `squeezellm_cuda` kernel (the fused LUT kernel for m <= 16,
dequantize + cuBLAS above) on random squeezellm layers, beside cuBLAS fp16 through F.linear in the same
run. Formats: s3 = 3-bit dense-only, s3sp = 3-bit with 0.45 % sparse, s4 = 4-bit dense-only (also
s2, s4sp). Every variant rotates through copies of its weights (>= 256 MB in all, so L2 never holds
them), is captured in a CUDA graph (one call per copy) and each replay is timed with CUDA events; the
figure is the median over >= 200 calls, per call. Before timing, each layer's kernel output is checked
against the fp32 product with the format's reference dequantize (relative error < 1e-3).

Bandwidth counts what the kernel reads: its repacked indices, codebooks, sparse entries (4 bytes
each: 16-bit column, fp16 correction), row pointers and activations, plus the output written.
`--variants ring,first` (the default) times both fused kernels in the same run. `--sweep` also times
the fused kernels at m = 1 with 2, 4 and 8 warps per block (printed, not recorded).

Writes the section "## Kernels (squeezellm LUT)" of bench/RESULTS.md and bench/results/kernels-lut.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernels import ROOFLINE_TBPS, SHAPES, copies_for, pdl_env_prefix, pdl_note, timed  # noqa: E402  (one timer for every kernel bench)
from results_io import write_records, write_section  # noqa: E402

from lpq.formats.squeezellm import SQUEEZELLM  # noqa: E402
from lpq.kernels import cuda_build, squeezellm_cuda  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402

FORMATS = {"s3": (3, 0.0), "s3sp": (3, 0.0045), "s4": (4, 0.0), "s2": (2, 0.0), "s4sp": (4, 0.0045)}
SECTION = "Kernels (squeezellm LUT)"


def random_layer(n: int, k: int, bits: int, density: float, gen: torch.Generator):
    """Canonical squeezellm tensors with random indices (random words: every bit pattern is a valid
    index), sorted random codebooks and nnz = density * n * k random sparse positions."""
    dev = "cuda"
    words = k * bits // 32
    qweight = torch.randint(-2**31, 2**31, (words, n), device=dev, dtype=torch.int64, generator=gen).to(torch.int32)
    lut = torch.sort(torch.randn(n, 1 << bits, device=dev, generator=gen) * 0.02, dim=1).values.half()
    tensors = {"qweight": qweight, "lut": lut}
    nnz = 0
    if density > 0:
        lin = torch.unique(torch.randint(0, n * k, (int(round(density * n * k)),), device=dev, generator=gen))
        rows, cols = lin // k, lin % k
        rowptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        nnz = lin.numel()
        tensors.update(sp_rowptr=rowptr.to(torch.int32), sp_col=cols.to(torch.int32),
                       sp_val=(torch.randn(nnz, device=dev, generator=gen) * 0.1).half())
    spec = QuantSpec(bits=bits, group_size=-1, method="squeezellm", format="squeezellm", options={"nnz": nnz})
    return spec, tensors, nnz


def state_bytes(st: dict, dtype=torch.float16) -> int:
    b = st["qw"].numel() * 4 + st["tab"][dtype].numel() * 4
    if st["sp_ptr"] is not None:
        b += st["sp_ptr"].numel() * 4 + st["sp_e"][dtype].numel() * 4
    return b


def state_copy(st: dict) -> dict:
    c = {**st, "qw": st["qw"].clone(), "tab": {torch.float16: st["tab"][torch.float16].clone()}}
    if st["sp_ptr"] is not None:
        c.update(sp_ptr=st["sp_ptr"].clone(), sp_e={torch.float16: st["sp_e"][torch.float16].clone()})
    return c


def lpq_call(st, x, warps=None, variant=None):
    if x.shape[0] <= squeezellm_cuda._fused_max_m():
        return squeezellm_cuda.gemm(st, x, None, warps, variant)
    return F.linear(x, squeezellm_cuda.dequant(st, x.dtype))


def check(st, spec, tensors, n, k, ms) -> None:
    w = SQUEEZELLM.dequantize(tensors, spec, k, n)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ w.t()
        y = lpq_call(st, x)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-3:
            raise SystemExit(f"kernel check failed: {spec.bits}-bit nnz={spec.options['nnz']} {n}x{k} m={m}: rel err {err:.2e}")
    del w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes (4096x4096, 28672x8192)")
    ap.add_argument("--formats", default="s3,s3sp,s4")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--sweep", action="store_true", help="also time 2/4/8 warps per block at m = 1 (printed)")
    ap.add_argument("--variants", default="ring,first", help="fused kernels to time (LPQ_LUT_VARIANT names)")
    ap.add_argument("--section", default=SECTION, help="RESULTS.md section (without '## ')")
    ap.add_argument("--records", default="kernels-lut", help="bench/results/<name>.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert cuda_build.load_lut(), f"LUT kernels unavailable: {cuda_build.lut_failure_reason()}"
    shapes = [SHAPES[0], SHAPES[4]] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    fmts = [f for f in args.formats.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in squeezellm_cuda.VARIANTS:
            raise SystemExit(f"--variants: {v!r} is not known: choose {', '.join(squeezellm_cuda.VARIANTS)}")
    gpu = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    gen = torch.Generator(device="cuda").manual_seed(0)
    records, sweeps = [], []
    for n, k in shapes:
        w_bytes = n * k * 2
        nc = copies_for(w_bytes)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nc)]
        base = {}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base[m] = timed(lambda i: F.linear(x, ws[i]), nc)
        del ws
        torch.cuda.empty_cache()
        for m in ms:
            io = (m * k + m * n) * 2
            tb = (w_bytes + io) / base[m] / 1e6
            records.append(dict(gpu=gpu, kernel="cublas_fp16", format="fp16", bits=16, group_size=-1, m=m, n=n, k=k,
                                dtype="float16", us=base[m], tbps=tb, roofline_share=tb / ROOFLINE_TBPS,
                                speedup_vs_cublas=1.0, speedup_vs_torch_int4=None, options="", nnz=0, date=date))
        for f in fmts:
            bits, density = FORMATS[f]
            spec, tensors, nnz = random_layer(n, k, bits, density, gen)
            st = squeezellm_cuda.repack(tensors, spec, k, n)
            check(st, spec, tensors, n, k, ms)
            del tensors
            st["tab"] = {torch.float16: st["tab"][torch.float16]}
            if st["sp_ptr"] is not None:
                st["sp_e"] = {torch.float16: st["sp_e"][torch.float16]}
            nbytes = state_bytes(st)
            ncp = copies_for(nbytes)
            sts = [st] + [state_copy(st) for _ in range(ncp - 1)]
            x0 = torch.randn(ms[0], k, device="cuda", dtype=torch.float16)
            timed(lambda i: lpq_call(sts[i], x0), ncp)  # discarded: the first timing after the copies runs slow
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                fused = m <= squeezellm_cuda._fused_max_m()
                for vname in variants if fused else ["dequant+cublas"]:
                    base_v = squeezellm_cuda.VARIANTS.get(vname)
                    # as gemm launches it by default: the ring kernel with programmatic dependent launch where it is on
                    v = None if base_v is None else squeezellm_cuda.with_default_pdl(base_v, m, nnz > 0, bits)
                    us = timed(lambda i: lpq_call(sts[i], x, None, v), ncp)
                    io = (m * k + m * n) * 2
                    tb = (nbytes + io) / us / 1e6
                    records.append(dict(gpu=gpu, kernel=f"squeezellm_cuda({vname})", format="squeezellm", bits=bits,
                                        group_size=-1, m=m, n=n, k=k, dtype="float16", us=us, tbps=tb,
                                        roofline_share=tb / ROOFLINE_TBPS, speedup_vs_cublas=base[m] / us,
                                        speedup_vs_torch_int4=None,
                                        options=f"sparse {density:.2%}" if density else "dense-only", nnz=nnz, date=date,
                                        default=(not fused) or base_v == squeezellm_cuda.default_variant(m, nnz > 0)))
                    if args.sweep and fused and m == 1:
                        alt = {w: timed(lambda i: lpq_call(sts[i], x, w, v), ncp) for w in (2, 4, 8)}
                        sweeps.append(f"{vname} {f} {n}x{k} m={m}: default({squeezellm_cuda.default_warps(st, m, base_v)}) "
                                      f"{us:.2f} us; " + ", ".join(f"w{w} {t:.2f}" for w, t in alt.items()))
            del sts, st
            torch.cuda.empty_cache()
        print(f"done {n}x{k}", flush=True)

    body = render(records, gpu, " ".join(sys.argv[1:]))
    print(f"## {args.section}\n\n{body}")
    for s in sweeps:
        print("sweep:", s)
    if not args.no_write:
        write_section(args.section, body)
        write_records(args.records, records)


def render(records, gpu, argv: str = "") -> str:
    lines = [f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; date {dt.date.today().isoformat()}; "
             f"command: `{pdl_env_prefix()}python bench/kernels_lut.py{(' ' + argv) if argv else ''}`. Random squeezellm layers (random indices, sorted random fp16 "
             f"codebooks, sparse positions uniformly random), activations fp16. Median of >= 200 calls, CUDA-graph "
             f"replays over rotated weight copies (>= 256 MB). Bandwidth counts the kernel's repacked indices, codebooks "
             f"and sparse entries (4 bytes each: 16-bit column, fp16 correction) and row pointers + activations read and output written; roofline {ROOFLINE_TBPS} TB/s. "
             f"x cuBLAS = cuBLAS fp16 time / lpq time. m <= 16: fused LUT kernel (sparse part fused; `ring` = the "
             f"cp.async ring kernel; `first` = the register-prefetch kernel; * = the one lpq runs at that m, "
             f"LPQ_LUT_VARIANT forces one); above: dequantize + cuBLAS. "
             + pdl_note(f"the ring kernel at m = 1, and up to m = {squeezellm_cuda.PDL_MAX_M} on dense-only layers"),
             "",
             "| shape (out x in) | m | cuBLAS fp16 us | format | kernel | us | TB/s | roofline | x cuBLAS |",
             "|---|---|---|---|---|---|---|---|---|"]
    by: dict = {}
    for r in records:
        by.setdefault((r["n"], r["k"], r["m"]), []).append(r)
    for (n, k, m), rs in by.items():
        cb = next(r for r in rs if r["kernel"] == "cublas_fp16")
        for r in rs:
            if r["format"] != "squeezellm":
                continue
            lab = f"{r['bits']}-bit {r['options']}"
            kern = r["kernel"].split("(", 1)[-1].rstrip(")") + (" *" if r.get("default") and "dequant" not in r["kernel"] else "")
            lines.append(f"| {n}x{k} | {m} | {cb['us']:.1f} | {lab} | {kern} | {r['us']:.1f} | {r['tbps']:.2f} | "
                         f"{r['roofline_share']:.0%} | {r['speedup_vs_cublas']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
