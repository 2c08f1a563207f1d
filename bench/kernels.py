"""Kernel speed of lpq's uniform-format CUDA kernels (PROTOCOL §4).

  python bench/kernels.py [--quick] [--formats w4g128,w3g128,w2g64,w8g128] [--m 1,4,16,64,2048]

Per shape (out x in) and batch m: lpq's `uniform_cuda` kernel (fused dequantize-GEMM for m <= 64,
dequantize + cuBLAS above), cuBLAS fp16 through F.linear, and torch's int4 kernel
(`torch._weight_int4pack_mm`, bf16, group 128). Every variant rotates through copies of its weights
(>= 256 MB in all, so L2 never holds them), is captured in a CUDA graph (one call per copy) and each
replay is timed with CUDA events; the figure is the median over >= 200 calls' replays, per call.
Before timing, each lpq kernel is checked against the fp32 reference of the same dequantized weights.

Writes the section "## Kernels (uniform format)" of bench/RESULTS.md (other sections untouched) and
bench/results/kernels-h100.json (a flat list of PROTOCOL §6 kernel records); --section and --records
name another section / records file (e.g. one per round of kernel work).

--compare-variants 4,5 also times, at every m <= 8, the round-4 default variant (3 for 2/3-bit, 0 for
4/8-bit, its default warps) beside each listed variant with 4 and 8 warps per block, each checked
against the reference first; the timings go into the section and the records (kernel
"uniform_cuda[v<variant>/w<warps>]").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpq.formats.uniform import UNIFORM, pack_uniform  # noqa: E402
from lpq.kernels import cuda_build, uniform_cuda  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
M_VALUES = [1, 4, 16, 64, 2048]
FORMATS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64), "w8g128": (8, 128)}
ROOFLINE_TBPS = 3.0
ROTATE_BYTES = 256 * 2**20
SECTION = "Kernels (uniform format)"


def round4_variant(bits: int) -> int:
    """The m <= 8 variant the automatic rule picked before round 5 (bench/NOTES-kernels.md)."""
    return 3 if bits in (2, 3) else 0


def timed(fn_for_copy, n_copies: int, min_calls: int = 200, min_replays: int = 20) -> float:
    """Median microseconds per call of fn_for_copy(i), i cycling over the copies, via graph replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_copies):  # warm-up (also lazy init, cuBLAS handles, workspaces)
            fn_for_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_copies):
            fn_for_copy(i)
    for _ in range(3):
        g.replay()
    replays = max(min_replays, -(-min_calls // n_copies))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    per_call = [a.elapsed_time(b) * 1000.0 / n_copies for a, b in ev]
    del g
    return statistics.median(per_call)


def copies_for(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(nbytes, 1)))


def random_packed(n: int, k: int, bits: int, gs: int, device="cuda"):
    spec = QuantSpec(bits=bits, group_size=gs)
    maxq = (1 << bits) - 1
    g = -(-k // gs)
    codes = torch.randint(0, maxq + 1, (n, k), device=device, dtype=torch.int32)
    scales = (torch.rand((g, n), device=device) * 0.02 + 0.002).half()
    zeros = torch.randint(0, maxq + 1, (g, n), device=device, dtype=torch.int32)
    qw = pack_uniform(codes, scales, zeros, spec)
    del codes
    return qw


def st_bytes(st: dict) -> int:
    return st["qw"].numel() * 4 + st["sc"].numel() * 4 + st["zp"].numel() * 2


def weight_copies(n: int, k: int, bits: int, gs: int):
    """A random packed layer [n, k] and the uniform kernel's states of it and of further random layers of the same
    shape, enough of them to rotate through >= ROTATE_BYTES (so that L2 never holds the weights a timed call reads):
    (qw, [state of qw, state, ...])."""
    qw = random_packed(n, k, bits, gs)
    st0 = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
    return qw, [st0] + [uniform_cuda.repack(random_packed(n, k, bits, gs).tensors, qw.spec, k, n)
                        for _ in range(copies_for(st_bytes(st0)) - 1)]


def uniform_bench_setup(args) -> list[str] | int:
    """The start of a bench of the uniform kernels (bench/epilogue.py, block_epilogue.py, prefill_parts.py): its
    --formats as a list of FORMATS names, or 2 after one line on stderr where the kernels cannot run here or a format
    is unknown."""
    missing = kernels_missing()
    if missing:
        print(f"error: needs a CUDA GPU and lpq's kernels ({missing})", file=sys.stderr)
        return 2
    fmts = [f for f in args.formats.split(",") if f]
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown or not fmts:
        print(f"error: --formats: {', '.join(unknown) or 'nothing'} is not one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    return fmts


def checked_rel_err(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 2e-3) -> float:
    """||got - ref|| / ||ref||; stops the bench with ``what`` where it is not below ``tol``."""
    err = ((got.float() - ref).norm() / ref.norm()).item()
    if not err < tol:
        raise SystemExit(f"{what} check failed: rel err {err:.2e}")
    return err


def kernels_missing() -> str | None:
    """Why lpq's uniform kernels cannot run here (no CUDA device, or their build failed), else None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None if cuda_build.load() else (cuda_build.failure_reason() or "the kernels did not build")


def check(st, qw, n, k, m, dtype=torch.float16, warps: int | None = None, variant: int | None = None) -> float:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = UNIFORM.dequantize(qw.tensors, qw.spec, k, n)
    ref = x.float() @ w.t()
    y = lpq_call(st, x, warps, variant)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-3:
        raise SystemExit(f"kernel check failed: {qw.spec.label()} {n}x{k} m={m} variant={variant} warps={warps}: "
                         f"rel err {err:.2e}")
    return err


def lpq_call(st, x, warps: int | None = None, variant: int | None = None):
    if x.shape[0] <= 64:
        return uniform_cuda.gemm(st, x, None, warps, variant)
    return F.linear(x, uniform_cuda.dequant(st, x.dtype))


def int4_pack(w_codes: torch.Tensor, n: int, k: int):
    """torch's tinygemm int4 layout; codes [N, K] in 0..15 -> packed weight (API differs by version)."""
    try:
        u8 = (w_codes[:, ::2] << 4 | w_codes[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(u8, 8)
    except Exception:
        return torch._convert_weight_to_int4pack(w_codes.to(torch.int32), 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes, m=1 and 16 only")
    ap.add_argument("--formats", default="w4g128,w3g128,w2g64,w8g128")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--variants", action="store_true",
                    help="also time every fused-kernel variant (0 v3, 1 v2, 2 deep rings, 3 two n-tiles per warp, 4/5 two chunks per "
                         "stage with two/one n-tiles) x warps 4/8 at m <= 16 (notes)")
    ap.add_argument("--compare-variants", default="",
                    help="comma list of fused variants timed beside the round-4 default at m <= 8, warps 4 and 8")
    ap.add_argument("--section", default=SECTION, help="RESULTS.md section (without '## ')")
    ap.add_argument("--records", default="kernels-h100", help="bench/results/<name>.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert cuda_build.load(), f"CUDA kernels unavailable: {cuda_build.failure_reason()}"
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [1, 16] if args.quick else [int(v) for v in args.m.split(",")]
    fmts = [f for f in args.formats.split(",") if f]
    cmp_variants = [int(v) for v in args.compare_variants.split(",") if v]
    bad = [v for v in cmp_variants if v not in uniform_cuda.GEMM_VARIANTS]
    if bad:
        raise SystemExit(f"--compare-variants: unknown variant(s) {bad}; the kernels have {uniform_cuda.GEMM_VARIANTS}")
    gpu = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    records, variants = [], []
    torch.manual_seed(0)
    for n, k in shapes:
        # cuBLAS fp16 baseline
        w_bytes = n * k * 2
        nc = copies_for(w_bytes)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nc)]
        base = {}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base[m] = timed(lambda i: F.linear(x, ws[i]), nc)
        del ws
        # torch int4 (bf16, group 128)
        i4 = {}
        try:
            codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
            pk = int4_pack(codes, n, k)
            sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
            i4_bytes = pk.numel() * pk.element_size() + sz.numel() * 2
            nc4 = copies_for(i4_bytes)
            pks = [pk.clone() for _ in range(nc4)]
            szs = [sz.clone() for _ in range(nc4)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                i4[m] = timed(lambda i: torch._weight_int4pack_mm(x, pks[i], 128, szs[i]), nc4)
            del pks, szs, codes, pk
        except Exception as e:  # report, never hide
            print(f"torch int4 unavailable for {n}x{k}: {type(e).__name__}: {e}")
            i4_bytes = 0
        for m in ms:
            io = (m * k + m * n) * 2
            rec = dict(gpu=gpu, kernel="cublas_fp16", format="fp16", bits=16, group_size=-1, m=m, n=n, k=k,
                       dtype="float16", us=base[m], tbps=(w_bytes + io) / base[m] / 1e6,
                       roofline_share=(w_bytes + io) / base[m] / 1e6 / ROOFLINE_TBPS, speedup_vs_cublas=1.0,
                       speedup_vs_torch_int4=(i4[m] / base[m]) if m in i4 else None, date=date)
            records.append(rec)
            if m in i4:
                records.append(dict(gpu=gpu, kernel="torch_int4pack_mm", format="tinygemm-int4", bits=4, group_size=128,
                                    m=m, n=n, k=k, dtype="bfloat16", us=i4[m], tbps=(i4_bytes + io) / i4[m] / 1e6,
                                    roofline_share=(i4_bytes + io) / i4[m] / 1e6 / ROOFLINE_TBPS,
                                    speedup_vs_cublas=base[m] / i4[m], speedup_vs_torch_int4=1.0, date=date))
        for f in fmts:
            bits, gs = FORMATS[f]
            qw = random_packed(n, k, bits, gs)
            st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
            for m in sorted(set(ms) & {1, 16, 2048}) or ms[:1]:
                check(st, qw, n, k, m)
            for m in [m for m in ms if m <= 8] if cmp_variants else []:
                for v in cmp_variants:
                    for w in (4, 8):
                        check(st, qw, n, k, m, warps=w, variant=v)
            del qw
            nbytes = st_bytes(st)
            nc = copies_for(nbytes)
            sts = [st] + [{**st, "qw": st["qw"].clone(), "sc": st["sc"].clone(), "zp": st["zp"].clone()}
                          for _ in range(nc - 1)]
            x0 = torch.randn(ms[0], k, device="cuda", dtype=torch.float16)
            timed(lambda i: lpq_call(sts[i], x0), nc)  # discarded: the first timing after the copies runs slow
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                us = timed(lambda i: lpq_call(sts[i], x), nc)
                io = (m * k + m * n) * 2
                tb = (nbytes + io) / us / 1e6
                records.append(dict(gpu=gpu, kernel="uniform_cuda" + ("" if m <= 64 else "(dequant+cublas)"),
                                    format="uniform", bits=bits, group_size=gs, m=m, n=n, k=k, dtype="float16", us=us,
                                    tbps=tb, roofline_share=tb / ROOFLINE_TBPS, speedup_vs_cublas=base[m] / us,
                                    speedup_vs_torch_int4=(i4[m] / us) if (m in i4 and bits == 4) else None, date=date))
                if cmp_variants and m <= 8:
                    old = round4_variant(bits)
                    alt = {("old", old, uniform_cuda.default_warps(st, m, old)): None}
                    alt.update({(None, v, w): None for v in cmp_variants for w in (4, 8)})
                    for key in alt:
                        _, v, w = key
                        alt[key] = timed(lambda i: lpq_call(sts[i], x, warps=w, variant=v), nc)
                        records.append(dict(gpu=gpu, kernel=f"uniform_cuda[v{v}/w{w}]", format="uniform", bits=bits,
                                            group_size=gs, m=m, n=n, k=k, dtype="float16", us=alt[key],
                                            tbps=(nbytes + io) / alt[key] / 1e6,
                                            roofline_share=(nbytes + io) / alt[key] / 1e6 / ROOFLINE_TBPS,
                                            speedup_vs_cublas=base[m] / alt[key],
                                            speedup_vs_torch_int4=(i4[m] / alt[key]) if (m in i4 and bits == 4) else None,
                                            date=date, role="round4-default" if key[0] == "old" else "compared"))
                    dv = uniform_cuda.default_variant(st, m)
                    variants.append(f"{f} {n}x{k} m={m}: default v{dv}/w{uniform_cuda.default_warps(st, m, dv)} "
                                    f"{us:.2f} us; " + ", ".join(
                                        ("round-4 " if o else "") + f"v{v}/w{w} {t:.2f}" for (o, v, w), t in alt.items()))
                if args.variants and m <= 16:
                    alt = {(v, w): timed(lambda i: lpq_call(sts[i], x, warps=w, variant=v), nc)
                           for v in uniform_cuda.GEMM_VARIANTS for w in (4, 8)}
                    variants.append(f"{f} {n}x{k} m={m}: default {us:.2f} us; " + ", ".join(
                        f"v{v}/w{w} {t:.2f}" for (v, w), t in alt.items()))
            del sts, st
            torch.cuda.empty_cache()
        torch.cuda.empty_cache()
        print(f"done {n}x{k}", flush=True)

    table = render(records, ms, fmts, gpu, args.section)
    if variants:
        table += ("\nVariants at m <= 8 (us; 'default' is the automatic rule of this code, 'round-4' the rule "
                  "before round 5, vN/wW variant N with W warps per block):\n\n```\n" + "\n".join(variants) + "\n```\n")
    print(table)
    for v in variants:
        print("variant:", v)
    if not args.no_write:
        write_results(table, records, args.section, args.records)


PDL_ENV = ("LPQ_PDL", "LPQ_PDL_BALANCE", "LPQ_PDL_EARLY")  # the launch settings a kernel bench's command states


def pdl_env_prefix() -> str:
    """The command's PDL settings (PDL_ENV), as they were given."""
    return "".join(f"{k}={os.environ[k]} " for k in PDL_ENV if k in os.environ)


def pdl_note(which: str) -> str:
    """One sentence on how `which` (the kernels a bench times) is launched under this process's PDL settings."""
    if not uniform_cuda.PDL:
        return "LPQ_PDL=0: plain launches."
    placement = ("its dynamic shared memory padded so that no SM holds more than ceil(blocks / SMs) of its blocks"
                 if uniform_cuda.PDL_BALANCE else "placed without padding (LPQ_PDL_BALANCE=0)")
    if uniform_cuda.PDL_EARLY:
        placement += (", the kernels of " + uniform_cuda.early_words() + " layers (W: uniform m = 1, S: squeezellm LUT "
                      "m = 1, P161: ptq161 ring) letting the next launch right after their own wait (the early trigger)")
    return (f"Programmatic dependent launch (lpq's default; LPQ_PDL=0 turns it off) for {which}, {placement}: a "
            "replayed call may request its first weights while the call before it finishes, as consecutive linears do "
            "in a model; cuBLAS and torch int4 launch plainly.")


def render(records, ms, fmts, gpu, section: str = SECTION) -> str:
    lines = ["## " + section, "",
             f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; date {dt.date.today().isoformat()}; "
             f"command: `{pdl_env_prefix()}python bench/kernels.py{''.join(' ' + shlex.quote(v) for v in sys.argv[1:])}`. Activations fp16 (torch int4: bf16). Median of >= 200 calls, CUDA-graph "
             f"replays over rotated weight copies (>= 256 MB). Bandwidth counts the packed weights + scales/zeros + "
             f"activations read and output written; roofline {ROOFLINE_TBPS} TB/s. x cuBLAS = cuBLAS time / lpq time; "
             f"x int4 = torch int4 time / lpq time (4-bit rows only). m <= 64: fused kernel; m = 2048: dequantize + cuBLAS. "
             + pdl_note("the fused kernel's " + ", ".join(
                 f"variant {v} at m {'= ' + str(lo) if lo == hi else f'{lo}..{hi}'}"
                 for v, (lo, hi) in sorted(uniform_cuda.PDL_RULES.items()))),
             "",
             "| shape (out x in) | m | cuBLAS fp16 us | torch int4 us | kernel | us | TB/s | roofline | x cuBLAS | x int4 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in records:
        by.setdefault((r["n"], r["k"], r["m"]), []).append(r)
    for (n, k, m), rs in by.items():
        cb = next(r for r in rs if r["kernel"] == "cublas_fp16")
        i4 = next((r for r in rs if r["kernel"] == "torch_int4pack_mm"), None)
        for r in rs:
            if r["format"] != "uniform" or r["kernel"].startswith("uniform_cuda["):
                continue
            lab = f"W{r['bits']} g{r['group_size']}"
            x4 = f"{r['speedup_vs_torch_int4']:.2f}" if r["speedup_vs_torch_int4"] else "-"
            lines.append(f"| {n}x{k} | {m} | {cb['us']:.1f} | {i4['us'] if i4 else float('nan'):.1f} | {lab} | {r['us']:.1f} | "
                         f"{r['tbps']:.2f} | {r['roofline_share']:.0%} | {r['speedup_vs_cublas']:.2f} | {x4} |")
    return "\n".join(lines) + "\n"


def write_results(table: str, records, section: str = SECTION, name: str = "kernels-h100") -> None:
    res = ROOT / "bench" / "RESULTS.md"
    text = res.read_text() if res.exists() else "# lpq benchmark results\n\n"
    pat = re.compile(r"^## " + re.escape(section) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: table + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + table
    res.write_text(text)
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
