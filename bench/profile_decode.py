"""Where a decode step's GPU time goes: the kernels of one compiled batch-1 step, by kind, per format.

    python bench/profile_decode.py [--formats fp16,w4g128] [--fuse | --epilogues] [--attn sdpa,eager] [--steps 16]
    python bench/profile_decode.py --tiny --device cpu --no-write      # CPU smoke run (no kernel times)

Builds the model of bench/decode.py (LLaMA-7B-shaped, random weights; --tiny for a small one), quantizes each
wXgY format by RTN as decode.py does, and for every (attention implementation, format):
  1. times the decode step as decode.py's compile mode does (torch.compile'd step captured in a CUDA graph,
     replayed per token; CUDA events over --time-steps steps after a fresh prefill): ms/token;
  2. runs --steps more steps of the same compiled step outside the graph under torch.profiler and sums the
     device time of every kernel, grouped by kind (lpq's kernels, cuBLAS, attention, inductor's Triton
     kernels, other) and by name.
The graph's ms/token minus the kernels' sum is the time no kernel ran (launch gaps and kernel tails inside the
graph): the share of a step that neither a faster kernel nor fewer bytes can reach.

Writes the section "## Decode step profile, LLaMA-7B-shaped model (random weights)" of bench/RESULTS.md (kinds
per format, then the largest kernels) and bench/results/decode-profile-h100.json; --no-write writes neither.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq.errors import LpqError  # noqa: E402

import decode  # noqa: E402  (bench/decode.py: the model, the formats and the decode loop)
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SECTION = "Decode step profile, LLaMA-7B-shaped model (random weights)"
KINDS = ("lpq", "cuBLAS", "attention", "triton", "other")


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its (demangled) name."""
    low = name.lower()
    if low.startswith("triton"):  # inductor names a fused kernel after the ops around it, lpq's included
        return "triton"
    if "uniform_" in low or "lut_gemm" in low or "squeezellm" in low or "ptq161" in low:
        return "lpq"
    if any(s in low for s in ("fmha", "flash", "attention", "attn", "efficient_")):
        return "attention"
    if any(s in low for s in ("gemv", "gemm", "cublas", "cutlass", "xmma", "sm90_")):
        return "cuBLAS"
    return "other"


def profile_steps(dec: decode.Decoder, steps: int) -> tuple[dict[str, float], dict[str, list], int]:
    """Kernel device time of ``steps`` compiled steps called from Python, per step: (us by kind,
    {name: [us, calls]}, kernels a step)."""
    from torch.profiler import ProfilerActivity, profile

    dec.prefill()
    for _ in range(2):  # warm: the first calls after a prefill may still allocate
        dec.step()
    torch.cuda.synchronize(dec.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize(dec.device)
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list] = {}
    count = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        dur = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        if ev.name.startswith("Memcpy") or ev.name.startswith("Memset"):
            kind = "other"
        else:
            kind = kernel_kind(ev.name)
        by_kind[kind] += dur / steps
        slot = by_name.setdefault(ev.name, [0.0, 0, kind])
        slot[0] += dur / steps
        slot[1] += 1
        count += 1
    for slot in by_name.values():
        slot[1] = slot[1] / steps
    return dict(by_kind), by_name, count // steps


def graph_ms_per_token(dec: decode.Decoder, steps: int) -> float:
    dec.capture()
    secs = decode.time_decode(dec, steps, repeats=3)
    return sorted(secs)[1] * 1000.0 / steps


def measure(model, fmt: decode.Format, prompt, args, attn: str) -> dict:
    cuda = prompt.device.type == "cuda"
    dec = decode.Decoder(model, prompt, max(args.steps, args.time_steps) + 4, "compile")
    dec.prefill()
    ms = graph_ms_per_token(dec, args.time_steps) if cuda else None
    rec = {"format": fmt.name, "attn": attn, "fused": bool(args.fuse), "epilogues": bool(args.epilogues),
           "attention_fusion": (args.attention_fusion == "on") if args.epilogues else None,
           "block_fusion": args.block_fusion == "on", "ms_per_token": ms}
    if cuda:
        kinds, names, count = profile_steps(dec, args.steps)
        total = sum(kinds.values())
        rec.update({
            "kernels_per_step": count,
            "kernel_us_per_step": total,
            "idle_us_per_step": ms * 1000.0 - total,
            "us_by_kind": {k: kinds.get(k, 0.0) for k in KINDS},
            "top_kernels": [
                {"name": n, "kind": v[2], "us_per_step": v[0], "calls_per_step": v[1]}
                for n, v in sorted(names.items(), key=lambda kv: -kv[1][0])[: args.top]
            ],
        })
    else:  # CPU smoke run: the loop and the profiler run, nothing is timed on a device
        with torch.no_grad():
            for _ in range(2):
                dec.step()
    del dec
    return rec


def section_body(records: list[dict], args, gpu: str, date: str, command: str, cfg) -> str:
    lines = [
        f"{gpu}; {versions()}; date {date}.",
        f"Command: `{command}`. Model as in bench/decode.py ({cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, "
        f"MLP {cfg.intermediate_size}, random weights, float16, RTN formats), prompt {args.prompt_len}, "
        + ("fused for decode (--epilogues: lpq.fuse_for_decode, silu(gate) * up in the joint gate/up linear"
           + ("" if args.fold_norms == "none" else f"; RMSNorms folded: {args.fold_norms}")
           + ("; under lpq attention, rotary, cache write and attention as one kernel" if args.attention_fusion == "on" else "")
           + ("; residual adds and RMSNorms in the projections' epilogues (--block-fusion on)" if args.block_fusion == "on" else "")
           + "). " if args.epilogues else "projections fused (--fuse). " if args.fuse else "projections unfused. ")
        + f"ms/token: the compiled step replayed from a CUDA graph, median of 3 runs of {args.time_steps} steps. "
        f"Kernels: device time of every kernel over {args.steps} compiled steps called from Python outside the graph "
        "(torch.profiler), per step. idle = ms/token - kernel time: the graph's launch gaps and tails.",
        "",
        "| attention | format | ms/token | kernels/step | kernel us | idle us | " + " | ".join(f"{k} us" for k in KINDS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for r in records:
        if r.get("failed"):
            lines.append(f"| {r['attn']} | {r['format']} | failed: {r['failed']} |" + " |" * (5 + len(KINDS)))
        if r.get("ms_per_token") is None:
            continue
        lines.append(f"| {r['attn']} | {r['format']} | {r['ms_per_token']:.3f} | {r['kernels_per_step']} | "
                     f"{r['kernel_us_per_step']:.0f} | {r['idle_us_per_step']:.0f} | "
                     + " | ".join(f"{r['us_by_kind'][k]:.0f}" for k in KINDS) + " |")
    for r in records:
        if not r.get("top_kernels"):
            continue
        lines += ["", f"Largest kernels, {r['attn']}, {r['format']} (us a step, calls a step):", ""]
        for k in r["top_kernels"]:
            lines.append(f"- {k['us_per_step']:.1f} us, {k['calls_per_step']:g} calls, {k['kind']}: `{k['name'][:110]}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="fp16,w4g128")
    ap.add_argument("--attn", default="sdpa",
                    help="attention variants, comma-separated: sdpa, eager, flex_attention, lpq, sdpa:cudnn|flash|efficient|math")
    decode.add_fusion_args(ap)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16, help="steps profiled")
    ap.add_argument("--time-steps", type=int, default=128, help="steps timed through the graph")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per format")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--section", default=SECTION)
    ap.add_argument("--records", default="decode-profile-h100")
    ap.add_argument("--no-write", action="store_true")
    return decode.run_script(ap, argv, run)


def run(args, argv) -> int:
    formats = decode.parse_formats(args.formats)
    attns = [a.strip() for a in args.attn.split(",") if a.strip()]
    if not attns:
        raise LpqError("--attn is empty: name at least one attention implementation, e.g. sdpa")
    for a in attns:
        decode.parse_attention(a)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LpqError("--device cuda was asked for, but no CUDA GPU is available: use --device cpu (with --tiny)")
    if args.steps < 1 or args.time_steps < 1:
        raise LpqError("--steps and --time-steps must be at least 1")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.prompt_len is None:
        args.prompt_len = 32 if args.tiny else 128
    cfg = decode.make_config(args.tiny, args.layers)
    gpu = device_name(str(device))
    date = datetime.date.today().isoformat()
    command = "python bench/profile_decode.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    decode.allow_recompiles()
    # every format starts from these weights (built on the device, as decode.py does, then kept on the CPU)
    master = decode.build_model(cfg, device, dtype, args.seed).to("cpu")
    records = []
    for fmt in formats:
        t0 = time.perf_counter()
        if fmt.quantized:
            model, _ = decode.quantize_copy(master, fmt, str(device))
        else:
            model = copy.deepcopy(master)
        model.to(device)
        decode.fuse_as_asked(model, args)  # on the device, as decode.py does
        for attn in attns:
            try:
                with decode.attention(model, attn):
                    rec = measure(model, fmt, prompt, args, attn)
            except LpqError:
                raise
            except Exception as e:  # e.g. a backend that cannot serve this call: report it, go on with the next
                rec = {"format": fmt.name, "attn": attn, "fused": bool(args.fuse), "ms_per_token": None,
                       "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            rec.update({"device": gpu, "date": date, "model": f"{cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}"})
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "top_kernels"}), flush=True)
            decode.free_device(device, "compile")
        print(f"{fmt.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        del model
        decode.free_device(device, "compile")
    body = section_body(records, args, gpu, date, command, cfg)
    if not args.no_write and device.type == "cuda":
        write_records(args.records, records)
        write_section(args.section, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
