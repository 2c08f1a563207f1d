"""Paired A/B of one launch setting in batch-1 decode: one model, two captured steps, their timings interleaved.

    python bench/decode_ab.py --setting LPQ_PDL_EARLY=4 [--formats w4g128,w3g128] [--repeats 8] [--epilogues ...]
    python bench/decode_ab.py --tiny --device cpu --mode eager --setting LPQ_PDL_EARLY=1 --no-write   # CPU smoke run

Two separate runs of bench/decode.py move by a few per cent on the same GPU (the fp16 model of the 7B shape took
5.62 and 5.79 ms a token in two runs on one H100), as much as a launch setting under study changes. Here each
format's model is built once (as bench/decode.py builds it: the same shape, weights, prompt, fusion options and
attention), and two decode steps are captured from it, each with its own static cache: A under this process's
settings and B under SETTING=VALUE. Their timings then alternate (A B, B A, A B, ...), --repeats of each, every
timing --new-tokens steps after a fresh prefill. The table gives each arm's median and B/A per pair, whose spread
shows the noise that is left. Before timing, each arm's replayed step must give the greedy tokens of the same step
called from Python, and A's tokens must equal B's (a launch setting must not change a result).

Settings: LPQ_PDL_EARLY (the early trigger, by kernel key: 0, 1, or keys such as w4 or w4,s3,p161; w2-w4 the m = 1
uniform kernels, s2-s4 the m = 1 squeezellm LUT kernels, p161 the ptq161 ring kernel) and LPQ_PDL (programmatic
dependent launch of the uniform, LUT, ptq161 and attention kernels: 0 or 1), LPQ_TALL_WARPS (warps a block of the
m = 1 uniform kernel for 2-/3-bit layers taller than wide: 4, the default, or 8) and LPQ_PTQ161_VARIANT (the ptq161
kernel variant, a name of lpq.kernels.ptq161_cuda.VARIANTS).

Writes the section "## End to end: decode A/B, SETTING=VALUE" of bench/RESULTS.md and bench/results/decode-ab.json
(--section / --records name others; --no-write writes neither).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402
from lpq.errors import LpqError  # noqa: E402
from results_io import device_name, publish, versions  # noqa: E402

SETTINGS = ("LPQ_PDL_EARLY", "LPQ_PDL", "LPQ_TALL_WARPS", "LPQ_PTQ161_VARIANT")


def parse_setting(text: str) -> tuple[str, str]:
    """'LPQ_PDL_EARLY=4' -> ('LPQ_PDL_EARLY', '4'), refusing names and values the settings do not take."""
    name, eq, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or name not in SETTINGS:
        raise LpqError(f"--setting {text!r}: write NAME=VALUE with NAME one of {', '.join(SETTINGS)}")
    if name == "LPQ_PDL" and value not in ("0", "1"):
        raise LpqError(f"--setting {text}: LPQ_PDL takes 0 or 1")
    if name == "LPQ_TALL_WARPS" and value not in ("4", "8"):
        raise LpqError(f"--setting {text}: LPQ_TALL_WARPS takes 4 or 8")
    if name == "LPQ_PTQ161_VARIANT":
        from lpq.kernels import ptq161_cuda

        if value not in ptq161_cuda.VARIANTS:
            raise LpqError(f"--setting {text}: LPQ_PTQ161_VARIANT takes one of {', '.join(ptq161_cuda.VARIANTS)}")
    if name == "LPQ_PDL_EARLY":
        from lpq.kernels import uniform_cuda as u

        keys = {("w" + t if t.isdigit() else t) for t in (v.strip().lower() for v in value.split(","))}
        if not (value in ("0", "1") or (value and keys <= u.EARLY_KEYS)):
            raise LpqError(f"--setting {text}: LPQ_PDL_EARLY takes 0, 1 or kernel keys among "
                           f"{', '.join(u.EARLY_ORDER)} (such as w4 or w4,s3,p161; a bare width N means wN)")
    return name, value


@contextlib.contextmanager
def launch_setting(name: str | None, value: str | None):
    """Inside the block lpq's kernels launch as the environment variable ``name`` = ``value`` would have them
    (the module attributes that variable sets at import); restored on the way out. None: as they are."""
    if name is None:
        yield
        return
    from lpq.kernels import uniform_cuda as u

    saved = (u.PDL, u.PDL_RULES, u.PDL_EARLY, u.TALL_LOW_BIT_WARPS)
    saved_env = os.environ.get("LPQ_PTQ161_VARIANT")
    try:
        if name == "LPQ_PTQ161_VARIANT":  # read by ptq161_cuda.gemv at each call (so at capture)
            os.environ[name] = value
        elif name == "LPQ_PDL_EARLY":
            u.PDL_EARLY = u.early_kernels(value)
        elif name == "LPQ_TALL_WARPS":
            u.TALL_LOW_BIT_WARPS = u.tall_low_bit_warps(value)
        else:
            u.PDL, u.PDL_RULES = u.pdl_settings(value, os.environ.get("LPQ_PDL_BALANCE"))
        yield
    finally:
        u.PDL, u.PDL_RULES, u.PDL_EARLY, u.TALL_LOW_BIT_WARPS = saved
        if saved_env is None:
            os.environ.pop("LPQ_PTQ161_VARIANT", None)
        else:
            os.environ["LPQ_PTQ161_VARIANT"] = saved_env


def arm_decoder(model, prompt, steps: int, mode: str, setting: tuple[str | None, str | None]):
    """A Decoder of ``model`` made, checked and (graph/compile on CUDA) captured under ``setting``; with the tokens
    of its checked steps. Raises AssertionError where the replayed step's tokens differ from the called step's."""
    with launch_setting(*setting):
        dec = decode.Decoder(model, prompt, max(steps, decode.CHECK_STEPS), mode)
        dec.prefill()
        if dec.device.type == "cuda" and mode in ("graph", "compile"):
            dec.capture()
            called, replayed = decode.check_replay(dec)
            if called != replayed:
                raise AssertionError(f"greedy tokens through the CUDA graph {replayed} differ from the same step "
                                     f"called from Python {called}")
        else:
            dec.prefill()
            dec.run(decode.CHECK_STEPS)
            called = dec.tokens(decode.CHECK_STEPS)
    # no dynamo reset between the arms: each Decoder compiles its own step (its guards name the Decoder), so B's is
    # traced anew under B's setting, while A's graph keeps the compiled code it replays
    return dec, called


def measure_pair(model, fmt, prompt, args, setting: tuple[str, str]) -> dict:
    """Both arms of one format: checks, then --repeats alternating timings of each. Returns the format's record."""
    record = {"format": fmt.name, "bits": fmt.bits if fmt.quantized else 16, "check": None}
    with decode.attention(model, args.attn):
        try:
            dec_a, tokens_a = arm_decoder(model, prompt, args.new_tokens, args.mode, (None, None))
            dec_b, tokens_b = arm_decoder(model, prompt, args.new_tokens, args.mode, setting)
        except AssertionError as e:
            record["check"] = f"FAILED: {e}"
            return record
        if tokens_a != tokens_b:
            record["check"] = f"FAILED: A's greedy tokens {tokens_a} differ from B's {tokens_b}"
            return record
        record["check"] = f"A == B, {decode.CHECK_STEPS} steps"
        arms = {"A": (dec_a, (None, None)), "B": (dec_b, setting)}
        seconds: dict[str, list[float]] = {"A": [], "B": []}
        for r in range(args.repeats):
            for arm in ("AB" if r % 2 == 0 else "BA"):
                dec, arm_setting = arms[arm]
                with launch_setting(*arm_setting):  # the eager arms read the setting at every call
                    seconds[arm] += decode.time_decode(dec, args.new_tokens, 1)
        record["kernel"] = decode.kernel_names(model) if fmt.quantized else "torch"
        del dec_a, dec_b, arms
    steps = args.new_tokens
    ratios = [b / a for a, b in zip(seconds["A"], seconds["B"])]
    record.update({
        "a_ms_per_token": statistics.median(seconds["A"]) * 1000.0 / steps,
        "b_ms_per_token": statistics.median(seconds["B"]) * 1000.0 / steps,
        "a_ms_repeats": [s * 1000.0 / steps for s in seconds["A"]],
        "b_ms_repeats": [s * 1000.0 / steps for s in seconds["B"]],
        "b_over_a": statistics.median(ratios), "b_over_a_min": min(ratios), "b_over_a_max": max(ratios),
        "pairs": len(ratios),
    })
    return record


def section_body(records, args, setting, gpu: str, date: str, command: str, cfg) -> str:
    name, value = setting
    a_value = os.environ.get(name, "unset")
    lines = [
        f"{gpu}; {versions()}; date {date}.",
        f"Command: `{command}`. Model: {'tiny Llama' if args.tiny else 'LLaMA-7B-shaped'} ({cfg.num_hidden_layers} "
        f"blocks, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, random weights, seed {args.seed}), {args.dtype}, "
        f"built and quantized as bench/decode.py does ({decode.format_words(decode.parse_formats(args.formats))}), "
        f"mode {args.mode}, attention "
        f"{args.attn}" + (", --epilogues (blocks fused as bench/decode.py's)" if args.epilogues else
                          ", --fuse" if args.fuse else "") + ". "
        f"A: this process's settings ({name} {a_value}); B: {name}={value}. Each arm has its own decoder and static cache"
        + (", its step captured once in a CUDA graph" if args.mode != "eager" else "")
        + f"; {args.repeats} timings of each, alternating (A B, B A, ...), each of {args.new_tokens} decode "
        f"steps after a prefill of {args.prompt_len} tokens. ms/token: median of an arm's timings; B/A: the median, "
        "least and largest of the pairs' ratios (below 1: B is faster). Checked before timing: "
        + ("each arm's replayed step gives the tokens of the step called from Python, and " if args.mode != "eager"
           else "") + "A's greedy tokens equal B's.",
        "",
        f"| format | A ms/token | B ms/token ({name}={value}) | B/A | B/A range | pairs | kernel | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["check"].startswith("FAILED"):
            lines.append(f"| {r['format']} | - | - | - | - | - | - | {r['check']} |")
            continue
        lines.append(f"| {r['format']} | {r['a_ms_per_token']:.3f} | {r['b_ms_per_token']:.3f} | {r['b_over_a']:.3f} | "
                     f"{r['b_over_a_min']:.3f}-{r['b_over_a_max']:.3f} | {r['pairs']} | {r['kernel']} | {r['check']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", required=True, help="NAME=VALUE for arm B, NAME one of " + ", ".join(SETTINGS))
    ap.add_argument("--formats", default="w4g128,w3g128", help="comma list of " + decode.FORMAT_FORMS)
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; 2 with --tiny)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (32 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps a timing; default 256 (32 with --tiny)")
    ap.add_argument("--repeats", type=int, default=6, help="timings of each arm")
    ap.add_argument("--mode", choices=("graph", "compile", "eager"), default="compile")
    ap.add_argument("--attn", default="lpq", help="as bench/decode.py's --attn")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="float16 / bfloat16 / float32; auto: float16 on CUDA, float32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="2 blocks, hidden 256, MLP 512, 4 heads, vocabulary 1000")
    decode.add_fusion_args(ap)
    ap.add_argument("--section", default=None, help="RESULTS.md section (default: 'End to end: decode A/B, SETTING')")
    ap.add_argument("--records", default="decode-ab", help="bench/results/<name>.json")
    ap.add_argument("--no-write", action="store_true")
    return decode.run_script(ap, argv, run)


def run(args, argv) -> int:
    setting = parse_setting(args.setting)
    formats = decode.parse_formats(args.formats)
    decode.check_fusion(formats, args)
    decode.parse_attention(args.attn)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LpqError("--device cuda was asked for, but no CUDA GPU is available: use --device cpu (with --tiny)")
    if device.type != "cuda" and args.mode != "eager":
        raise LpqError(f"--mode {args.mode} needs CUDA: use --mode eager on the CPU")
    if args.dtype == "auto":
        args.dtype = "float16" if device.type == "cuda" else "float32"
    if args.dtype not in decode.DTYPES:
        raise LpqError(f"--dtype {args.dtype} is not known: choose float16, bfloat16 or float32")
    args.prompt_len = args.prompt_len or (32 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (32 if args.tiny else 256)
    if args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise LpqError("--prompt-len, --new-tokens and --repeats must be at least 1")
    cfg = decode.make_config(args.tiny, args.layers)
    gpu, date = device_name(str(device)), datetime.date.today().isoformat()
    env = "".join(f"{k}={os.environ[k]} " for k in ("LPQ_PDL", "LPQ_PDL_BALANCE", "LPQ_PDL_EARLY") if k in os.environ)
    command = env + "python bench/decode_ab.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    base = decode.build_model(cfg, device, decode.DTYPES[args.dtype], args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    quantized = [f for f in formats if f.quantized]
    # as bench/decode.py: fp16 (first, if asked) runs on the model as built; the formats quantize a CPU copy of the
    # unfused weights
    master = copy.deepcopy(base).to("cpu") if quantized and not formats[0].quantized and args.fuse else None
    records = []
    for fmt in formats:
        if fmt.quantized:
            if master is None:
                master = base.to("cpu")  # in place: the fp16 model leaves the GPU
            base = None
            decode.free_device(device, args.mode)
            model, _ = decode.quantize_copy(master, fmt, str(device))
            model.to(device)
        else:
            model = base
        decode.fuse_as_asked(model, args)
        rec = measure_pair(model, fmt, prompt, args, setting)
        rec.update({"setting": f"{setting[0]}={setting[1]}", "a_setting": f"{setting[0]}={os.environ.get(setting[0], 'unset')}",
                    "mode": args.mode, "attn": args.attn, "epilogues": bool(args.epilogues), "fused": bool(args.fuse),
                    "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
                    "device": gpu, "date": date, "dtype": args.dtype})
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del model
        decode.free_device(device, args.mode)
    publish(args.section or f"End to end: decode A/B, {setting[0]}={setting[1]}", args.records, records,
            section_body(records, args, setting, gpu, date, command, cfg), write=not args.no_write)
    failed = [r["format"] for r in records if r["check"].startswith("FAILED")]
    if failed:
        print(f"error: the check failed for {', '.join(failed)}; no timing for them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
