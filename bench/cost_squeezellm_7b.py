"""Time to cluster every linear of a LLaMA-7B-shaped model with SqueezeLLM (issue 5's cost target).

Each block of LLaMA-7B has q/k/v/o (4096 x 4096), gate/up (11008 x 4096) and down (4096 x 11008); 32
blocks make 224 linears and 6.5e9 weights. For each one, random weights [N, K] and random positive
Fisher weights [N, K] are made on the GPU (the clustering's cost does not depend on the values), then
timed: the dense-and-sparse split (--outliers/--sensitive percent), the Fisher-weighted per-row k-means
with 2**bits centroids (--iters cap, all rows at once), the final assignment, and packing into the
squeezellm format (indices, per-row codebooks, CSR). The Fisher pass itself (a backward pass over the
calibration data) is not part of this number.

    python bench/cost_squeezellm_7b.py --bits 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq.formats.squeezellm import pack_squeezellm  # noqa: E402
from lpq.methods.squeezellm import squeezellm_quantize  # noqa: E402
from lpq.spec import QuantSpec  # noqa: E402
from results_io import device_name, versions, write_records, write_section  # noqa: E402

BLOCK_SHAPES = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]  # (name, N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3", help="comma list of widths")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--outliers", type=float, default=0.40)
    ap.add_argument("--sensitive", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--name", default="cost-squeezellm-7b")
    ap.add_argument("--section", default="Cost: SqueezeLLM clustering of a LLaMA-7B-shaped model")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    gpu, date = device_name("cuda"), datetime.date.today().isoformat()
    gen = torch.Generator(device=dev).manual_seed(0)
    records = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits=bits, group_size=-1, method="squeezellm", format="squeezellm")
        torch.cuda.reset_peak_memory_stats()
        cluster_s = pack_s = 0.0
        weights = 0
        t_all = time.perf_counter()
        for block in range(args.blocks):
            for name, n, k in BLOCK_SHAPES:
                w = torch.randn(n, k, device=dev, generator=gen).mul_(0.02).half()
                fisher = torch.randn(n, k, device=dev, generator=gen).exp_()  # positive, heavy-tailed like squared grads
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                idx, lut, mask, _ = squeezellm_quantize(w, fisher, bits, args.outliers, args.sensitive, args.iters)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                pack_squeezellm(idx, lut, mask, w, spec, layer=f"model.layers.{block}.{name}")
                torch.cuda.synchronize()
                cluster_s += t1 - t0
                pack_s += time.perf_counter() - t1
                weights += n * k
                del w, fisher, idx, lut, mask
            if block == 0:
                print(f"block 0: {cluster_s:.2f} s clustering, {pack_s:.2f} s packing", flush=True)
        rec = {"model": f"LLaMA-7B-shaped ({args.blocks} blocks x 7 linears, random weights and Fisher)",
               "method": f"squeezellm w{bits}", "linears": 7 * args.blocks, "weights": weights,
               "outliers": args.outliers, "sensitive": args.sensitive, "iters": args.iters,
               "cluster_s": cluster_s, "pack_s": pack_s, "wall_s": time.perf_counter() - t_all,
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "device": gpu, "date": date}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    write_records(args.name, records)
    lines = [f"{gpu}; {versions()}; date {date}.",
             f"Command: `python bench/cost_squeezellm_7b.py {shlex.join(sys.argv[1:])}`. Every linear of a "
             "LLaMA-7B-shaped model (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008 per block) with random "
             "weights and random positive Fisher weights made on the GPU: dense-and-sparse split, Fisher-weighted "
             "per-row k-means (all rows at once), final assignment, then packing into the squeezellm format. The "
             "Fisher pass (a backward pass over the calibration data) is not included. Target (issue 5): all "
             "linears clustered in at most 5 minutes on the H100.", "",
             "| run | linears | weights | outliers % | sensitive % | k-means iters cap | clustering s | packing s | "
             "wall s | peak GPU GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {r['linears']} | {r['weights'] / 1e9:.2f}e9 | {r['outliers']} | {r['sensitive']} | "
                     f"{r['iters']} | {r['cluster_s']:.1f} | {r['pack_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['peak_mem_gb']:.1f} |")
    write_section(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
