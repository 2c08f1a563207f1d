"""Time and memory of whole `lpq quantize` runs on a LLaMA-7B-shaped model (PROTOCOL §5).

The model (32 blocks, hidden 4096, MLP 11008, vocabulary 32000) is built from its config with random
weights directly on the GPU, then moved to the CPU: the cost of RTN, GPTQ and packing does not depend
on the weight values. Calibration is random token ids (128 windows of 2048 by default). Blocks stream
through the GPU one at a time. Also times packing alone (every linear's codes -> int32 words).

    python bench/cost_7b.py --runs gptq:4:128,rtn:4:128
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq import api  # noqa: E402
from lpq.formats.uniform import pack_uniform  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half()
    return model.to("cpu").eval()


def time_packing(model, bits: int, group_size: int) -> float:
    """Seconds to pack random codes of every block linear of the model, on the GPU."""
    from lpq.models.arch import find_blocks, find_linears, linear_shape

    _, blocks = find_blocks(model)
    shapes = [linear_shape(m) for b in blocks for m in find_linears(b).values()]
    spec = QuantSpec(bits=bits, group_size=group_size)
    total = 0.0
    for k, n in shapes:
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, device="cuda")
        g = -(-k // group_size)
        scales = torch.rand(g, n, device="cuda")
        zeros = torch.randint(0, 2**bits, (g, n), dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pack_uniform(codes, scales, zeros, spec)
        torch.cuda.synchronize()
        total += time.perf_counter() - t0
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="gptq:4:128,rtn:4:128")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--name", default="cost-7b")
    ap.add_argument("--section", default="Cost: LLaMA-7B-shaped model (random weights)")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    gpu = device_name("cuda")

    t0 = time.perf_counter()
    model = build_model(args.layers)
    print(f"built the model in {time.perf_counter() - t0:.1f} s", flush=True)
    tokens = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    records = []
    pack_s = time_packing(model, 4, 128)
    records.append({"model": f"LLaMA-7B-shaped ({args.layers} blocks, random)", "method": "pack only w4 g128",
                    "device": gpu, "wall_s": pack_s, "peak_mem_gb": None, "calib_s": 0.0, "method_s": 0.0,
                    "pack_s": pack_s, "save_s": 0.0, "date": date})
    print(json.dumps(records[-1]), flush=True)
    for run in args.runs.split(","):
        method, bits, group = run.split(":")[0], int(run.split(":")[1]), int(run.split(":")[2])
        out = Path(tempfile.mkdtemp(prefix="lpq-7b-")) / "q"
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = api.quantize(model, out, method=method, bits=bits,
                           group_size=group, calib=tokens if method != "rtn" else None, device="cuda",
                           calib_batch_size=args.calib_batch_size)
        wall = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rec = {"model": f"LLaMA-7B-shaped ({args.layers} blocks, random)", "method": run, "device": gpu,
               "wall_s": wall, "peak_mem_gb": res.peak_memory_gb, "calib_s": res.seconds.get("calib", 0.0),
               "method_s": res.seconds.get("method", 0.0), "pack_s": res.seconds.get("pack", 0.0),
               "save_s": res.seconds.get("save", 0.0), "output_gb": size / 1e9,
               "calib": f"random tokens {args.nsamples}x{args.seqlen}" if method != "rtn" else None, "date": date}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        shutil.rmtree(out.parent, ignore_errors=True)
        # quantize() swapped the linears for packed ones: rebuild plain linears for the next run
        model = build_model(args.layers)
    write_records(args.name, records)
    lines = [f"{gpu}; {versions()}; date {date}.",
             f"Command: `python bench/cost_7b.py {shlex.join(sys.argv[1:])}`. LLaMA-7B-shaped model built from its config "
             "with random weights on the GPU, then kept on the CPU; blocks stream through the GPU one at a time. "
             "Wall time of the whole `lpq.quantize` call (calibration capture and forward passes, the method, bit "
             "packing, saving the safetensors); peak GPU memory by torch.cuda.max_memory_allocated.", "",
             "| run | wall s | calibration s | method s | pack s | save s | peak GPU GB | output GB | calibration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {r['calib_s']:.1f} | {r['method_s']:.1f} | {r['pack_s']:.2f} | "
                     f"{r['save_s']:.1f} | {'-' if r['peak_mem_gb'] is None else format(r['peak_mem_gb'], '.2f')} | "
                     f"{format(r.get('output_gb'), '.2f') if r.get('output_gb') else '-'} | {r.get('calib') or '-'} |")
    write_section(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
