"""Kernel speed of the ptq161 CUDA GEMV (PROTOCOL §4).

  python bench/kernels_ptq161.py [--m 1,4,16] [--salient 0.2] [--shapes 4096x4096,...]
                                 [--variants auto,ring,stream,ring@8,...] [--ksplit S]

Per shape (out x in) and batch m: lpq's ``ptq161_cuda`` GEMV (each of --variants: ``auto``, the default
choice; ``ring`` / ``ring3``, the ring kernel with 4 / 3 stages a warp where it applies; ``stream``, the
streaming kernel; ``stream-ffma``, the same with the salient codes FMA'd in fp32 instead of on the tensor
cores; ``stream-1row``, one output row a thread where the plan takes two; ``first``, the first kernel kept
for comparison; ``NAME@S`` forces S splits along K) (20 % salient input channels at 4 bits,
the rest binarized, ~1.6 bits per weight plus per-row/column vectors) against cuBLAS fp16 through
F.linear, in the same run. Each variant rotates through copies of its weights (>= 256 MB in all), is
captured in a CUDA graph and timed with CUDA events (median over >= 200 calls), with the same timer as
bench/kernels.py. Before timing, the kernel is checked against the format's fp32 reference.

Writes the section "Kernels (ptq161 format)" of bench/RESULTS.md and bench/results/kernels-ptq161.json.
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

from kernels import ROOFLINE_TBPS, SHAPES, copies_for, pdl_env_prefix, pdl_note, timed  # noqa: E402
from results_io import write_records, write_section  # noqa: E402

from lpq.formats.ptq161 import pack_ptq161  # noqa: E402
from lpq.kernels import ptq161_cuda  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402


def random_layer(n: int, k: int, salient: float, device="cuda"):
    s = int(round(k * salient / 8)) * 8
    s += (k - s) % 32  # the binarized rest must fill whole 32-channel words (s stays a multiple of 8)
    mask = torch.zeros(k, dtype=torch.bool, device=device)
    mask[torch.randperm(k, device=device)[:s]] = True
    b = k - s
    qw = pack_ptq161(mask, torch.randint(0, 2, (n, b), device=device).float() * 2 - 1,
                     torch.randint(0, 16, (n, s), device=device, dtype=torch.int32),
                     torch.rand(n, device=device) * 0.02 + 0.001, torch.randint(0, 16, (n,), device=device).float(),
                     torch.rand(n, device=device) * 0.05, torch.rand(b, device=device) + 0.5,
                     torch.randn(n, device=device) * 0.01, QuantSpec(bits=4, group_size=-1))
    return qw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,4,16")
    ap.add_argument("--salient", type=float, default=0.2)
    ap.add_argument("--shapes", default="")
    ap.add_argument("--variants", default="auto,ring,stream,first")
    ap.add_argument("--ksplit", type=int, default=0,
                    help="force K splits of the ring and streaming kernels (0: their plans; NAME@S in --variants "
                         "forces one variant's)")
    ap.add_argument("--section", default="Kernels (ptq161 format)")
    ap.add_argument("--records", default="kernels-ptq161")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.m.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        name, _, split = v.partition("@")
        if name not in ptq161_cuda.VARIANTS or (split and not split.isdigit()):
            raise SystemExit(f"--variants: unknown {v!r} (use {', '.join(ptq161_cuda.VARIANTS)}, NAME@SPLITS)")
    gpu = torch.cuda.get_device_name(0)
    today = dt.date.today().isoformat()
    records, rows = [], []
    for n, k in shapes:
        qw = random_layer(n, k, args.salient)
        st = ptq161_cuda.prepare_state(qw.tensors, qw.spec, k, n)
        w_ref = qw.dequantize()
        packed = sum(t.numel() * t.element_size() for t in qw.tensors.values())
        bpw = packed * 8 / (n * k)
        ncopies = copies_for(packed)
        states = [st] + [{**st, "qw": st["qw"].clone(), "sw": st["sw"].clone()} for _ in range(ncopies - 1)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = F.linear(x.float(), w_ref)
            us_cb = timed(lambda i: F.linear(x, dense[i]), len(dense))
            for label in variants:
                variant, _, split = label.partition("@")
                ks = 0 if variant == "first" else int(split) if split else args.ksplit
                planned = "-" if variant == "first" else ptq161_cuda.plan(st, m, variant=variant, ksplit=ks)
                used = "-" if variant == "first" else f"{planned['kernel']} {planned['ksplit']}"
                y = ptq161_cuda.gemv(st, x, None, variant=variant, ksplit=ks)
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 1e-3:
                    raise SystemExit(f"ptq161 {variant} kernel wrong on {n}x{k} m={m}: relative error {err:.2e}")
                us = timed(lambda i: ptq161_cuda.gemv(states[i], x, None, variant=variant, ksplit=ks), len(states))
                moved = packed + m * k * 2 + m * n * 2
                tbps = moved / (us * 1e-6) / 1e12
                rec = {"gpu": gpu, "kernel": "ptq161_cuda", "variant": label, "launched": used, "format": "ptq161",
                       "bits": 1.6, "group_size": -1, "m": m, "n": n, "k": k, "dtype": "float16", "us": us,
                       "tbps": tbps, "roofline_share": tbps / ROOFLINE_TBPS, "speedup_vs_cublas": us_cb / us,
                       "speedup_vs_torch_int4": None, "bpw": bpw, "cublas_us": us_cb, "date": today}
                records.append(rec)
                rows.append(f"| {n}x{k} | {m} | {label} | {used} | {bpw:.3f} | {us_cb:.1f} | {us:.1f} | {tbps:.2f} "
                            f"| {tbps / ROOFLINE_TBPS:.0%} | {us_cb / us:.2f} |")
                print(rec, flush=True)
        del states, dense
        torch.cuda.empty_cache()
    if args.no_write:
        return
    body = "\n".join([
        f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; date {today}; command: "
        f"`{pdl_env_prefix()}{shlex.join(['python', 'bench/kernels_ptq161.py', *sys.argv[1:]])}`. auto: the default choice (m <= 4: "
        f"the ring kernel with 2 stages of 8 words a warp where it applies, 3 at m = 1 where a warp's share of a K "
        f"split is 80 words of 32 rows or more, else the streaming kernel); ring / ring3 / ring2 / ring2w8 / ring3w8 / ring4w8: the ring "
        f"kernel (cp.async ring of 4 / 3 / 2 stages of 4 words, 2 / 3 / 4 of 8 words a warp; m <= 4, 3 or 4 of 8 at "
        f"m = 1 only); stream: the streaming kernel (register double buffers); stream-ffma: the same with the salient codes FMA'd in fp32; stream-1row: one row a "
        f"thread; first: the first kernel (short K tiles, fp32 atomics, memset + epilogue launches); NAME@S: S "
        f"splits along K forced. 'launched': the kernel and K splits that ran. Random ptq161 layers "
        f"({args.salient:.0%} salient channels at 4 bits, the rest binarized), activations fp16. Median of >= 200 calls, "
        f"CUDA-graph replays over rotated weight copies (>= 256 MB). Bandwidth counts every packed tensor + activations "
        f"+ output; roofline {ROOFLINE_TBPS} TB/s. x cuBLAS = cuBLAS fp16 time / lpq time. "
        + pdl_note("the ring kernel (m <= 4)"),
        "",
        "| shape (out x in) | m | variant | launched | bits/weight | cuBLAS fp16 us | ptq161 us | TB/s | roofline | x cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    write_section(args.section, body)
    write_records(args.records, records)


if __name__ == "__main__":
    main()
