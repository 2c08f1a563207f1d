"""QAT fine-tuning sharded with FSDP2 (``fsdp=True``) under ``accelerate launch``: two CPU processes (gloo).

The processes are started as in test_finetune_distributed.py (``--multi_gpu --num_processes 2`` through
torchrun; ``device="cpu"`` makes them talk over gloo). Nothing FSDP2 needs here is missing on gloo/CPU:
fully_shard of uint8 codes beside fp32 parameters, the all-gathers and reduce-scatters, full_tensor,
non-reentrant gradient checkpointing of the sharded blocks and AdamW over DTensors all run.

Tolerance against the one-process run. Both take the same global batch of 4 windows (2 per process)
and, like data parallel, differ only in the order of fp32 sums: each process averages its own 2 x 31
token losses and FSDP's reduce-scatter averages the two halves' gradients, where one process sums all
at once. Sharding itself adds no arithmetic: AdamW is element-wise, so each shard's update is the
one-process update of those entries, and the forward computes with the all-gathered (bit-identical)
tensors. The argument of test_finetune_distributed.py holds unchanged: a loss moves by at most a few
fp32 roundings (~5e-7 relative), hence the same rtol 2e-6 for the qalora variant. Measured on this
machine: 1.2e-7 at most over 6 steps, and the merged models came out bit-identical. A run whose
gradients are not averaged over the processes is 3e-4 or more off from the second step on.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import lpq
from lpq.errors import LpqError
from lpq.finetune import finetune
from lpq.nn import QuantizedLinear

from conftest import assert_same_saved_model, make_model
from test_finetune_distributed import _launch

slow = pytest.mark.slow  # each launch of two processes takes 20-30 s on 2 cores

RTOL = 2e-6
COMMON = dict(steps=6, batch=4, seqlen=32, lora_rank=4, lr=3e-3, variant="qalora", device="cpu", seed=0)

DRIVER = '''
"""finetune(**json argv[1]) in this process; what it did -> argv[2]/rank<R>.json (see test_finetune_fsdp.py)."""
import functools, json, os, sys
from pathlib import Path

from lpq.finetune import end_distributed, finetune
from lpq.finetune import train as train_mod

kwargs, report, interrupt_at, small_solo = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
record = {"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1"))}

if small_solo:  # the tiny model's shards are below SOLO's 1024-entry floor: quantize them all, 32 per block
    train_mod.SOLO = functools.partial(train_mod.SOLO, min_quant_numel=1, block_size=32)
real_train = train_mod.train_qat


def train_qat(model, *a, **k):  # the layout of every parameter as training starts (sharded)
    record["params"] = {n: {"local": (p.to_local() if hasattr(p, "to_local") else p).numel(), "numel": p.numel(),
                            "shape": list(p.shape),
                            "dtype": str(p.dtype), "grad": p.requires_grad, "dtensor": hasattr(p, "to_local")}
                        for n, p in model.named_parameters()}
    return real_train(model, *a, **k)


train_mod.train_qat = train_qat
if interrupt_at >= 0:
    real_factor = train_mod.lr_factor

    def factor(step, steps, warmup):
        if step == interrupt_at:
            raise KeyboardInterrupt
        return real_factor(step, steps, warmup)

    train_mod.lr_factor = factor
try:
    res = finetune(**kwargs)
    record.update(losses=res.losses, tokens=res.tokens, resumed_from=res.resumed_from, main=res.main_process,
                  fsdp=res.fsdp, processes=res.processes, peaks=res.peak_memory_gb_per_process,
                  perplexity=res.perplexity, state_bytes=res.state_bytes, trainable=res.trainable_params,
                  model_none=res.model is None)
finally:
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{record['rank']}.json").write_text(json.dumps(record))
    end_distributed()  # as the CLI does: no process group left to interpreter shutdown
# Reached only when finetune returned (an exception has propagated out of the finally above). The report is
# written; leave without interpreter teardown, where a C++ worker thread still alive on this 2-process CPU run
# has now and then aborted a finished process ("terminate called without an active exception", exit -6).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def _run(tmp: Path, name: str, kwargs: dict, interrupt_at: int = -1, small_solo: bool = False,
         expect_ok: bool = True) -> list[dict]:
    (tmp / "fsdp_driver.py").write_text(DRIVER)
    report = tmp / f"report-{name}"
    _launch(str(tmp / "fsdp_driver.py"), json.dumps(kwargs), str(report), str(interrupt_at), "1" if small_solo else "0",
            expect_ok=expect_ok)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer, sample_text):
    tmp = tmp_path_factory.mktemp("fsdp")
    qdir = tmp / "q3"
    lpq.quantize(make_model("llama"), qdir, tokenizer=tokenizer, method="rtn", bits=3, group_size=32)
    data = tmp / "train.txt"
    data.write_text(sample_text[:12000], encoding="utf-8")
    evalf = tmp / "eval.txt"
    evalf.write_text(sample_text[20000:30000], encoding="utf-8")
    return tmp, qdir, data, evalf


@pytest.fixture(scope="module")
def runs(packed):
    tmp, qdir, data, evalf = packed
    ev = dict(eval_text=str(evalf), eval_windows=2, eval_seqlen=64)
    one = finetune(qdir, data, tmp / "one", **COMMON, **ev)  # the one-process reference, in this process
    outs = tmp / "outs"
    outs.mkdir()
    kwargs = dict(quant_dir=str(qdir), data=str(data), out=str(outs / "two"), save_every=3, fsdp=True, **COMMON, **ev)
    two = _run(tmp, "two", kwargs)
    return {"tmp": tmp, "qdir": qdir, "data": data, "one": one, "two": two, "outs": outs}


def test_codes_and_trainable_tensors_are_sharded(runs):
    two = runs["two"]
    assert [r["world"] for r in two] == [2, 2] and [r["fsdp"] for r in two] == [True, True]
    p0, p1 = two[0]["params"], two[1]["params"]
    assert p0.keys() == p1.keys()
    layer = "model.layers.0.self_attn.q_proj."
    # the frozen packed state is made of parameters now (FSDP shards those), without gradients
    assert p0[layer + "codes"]["dtype"] == "torch.float16" and not p0[layer + "codes"]["grad"]  # uint8 bytes, 2 per element
    assert not p0[layer + "scales0"]["grad"] and not p0[layer + "zeros"]["grad"]
    assert p0[layer + "lora_a"]["grad"] and p0[layer + "lora_b"]["grad"]
    n_codes = 0
    for name, a in p0.items():
        b = p1[name]
        assert a["dtensor"] and b["dtensor"], name  # every parameter, frozen or not, is a DTensor
        # dim 0 cut in two: the first process holds ceil(rows / 2) rows, the second the rest
        rows, row = a["shape"][0], a["numel"] // max(1, a["shape"][0])
        assert a["local"] == -(-rows // 2) * row and b["local"] == a["numel"] - a["local"], (name, a, b)
        if name.endswith(".codes"):
            n_codes += 1
            assert a["local"] == b["local"] == a["numel"] // 2, name  # 64- and 128-row codes: exact halves
    assert n_codes == 14
    # the trainable parameters counted whole, not per shard
    assert two[0]["trainable"] == two[1]["trainable"] == runs["one"].trainable_params


def test_sharded_losses_repeat_the_one_process_run(runs):
    one, two = runs["one"], runs["two"]
    assert two[0]["losses"] == two[1]["losses"]  # the all-reduced global mean on every process
    assert len(two[0]["losses"]) == COMMON["steps"]
    assert two[0]["losses"] == pytest.approx(one.losses, rel=RTOL, abs=0)
    assert one.losses[-1] != one.losses[0]
    assert two[0]["tokens"] == one.tokens
    assert [r["main"] for r in two] == [True, False]
    assert [r["processes"] for r in two] == [2, 2] and two[0]["peaks"] == [0.0, 0.0]  # CPU: no GPU peak
    # the sharded model evaluates in step on both processes: the one-process unmerged perplexity
    assert two[0]["perplexity"]["unmerged"] == pytest.approx(one.perplexity["unmerged"], rel=1e-5)
    assert two[0]["perplexity"]["before"] == pytest.approx(one.perplexity["before"], rel=1e-6)


def test_sharded_merge_equals_the_one_process_merge(runs):
    one, outs = runs["one"], runs["outs"]
    # the work folder (its sharded checkpoint of step 3 included) is gone, the merged model written once
    assert sorted(p.name for p in outs.iterdir()) == ["two"]
    assert [r["model_none"] for r in runs["two"]] == [False, True]  # the merged model lives on the main process
    a, b = lpq.load(runs["tmp"] / "one", device="cpu"), lpq.load(outs / "two", device="cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        if n.endswith("qweight") or n.endswith("qzeros") or n.endswith("g_idx"):
            # the codes re-quantized from the gathered adapters: identical
            assert torch.equal(sa[n], sb[n]), n
        else:
            torch.testing.assert_close(sb[n], sa[n], rtol=1e-3, atol=1e-6, msg=n)
    assert sum(isinstance(m, QuantizedLinear) for m in b.modules()) == 14
    cfg = json.loads((outs / "two" / "config.json").read_text())["quantization_config"]
    assert cfg["finetune"]["fsdp"] == 2 and cfg["finetune"]["steps"] == COMMON["steps"]
    assert runs["two"][0]["perplexity"]["merged"] == pytest.approx(one.perplexity["merged"], rel=1e-5)


@slow
def test_sharded_resume_repeats_the_curve_and_refuses_other_launches(runs):
    tmp, two = runs["tmp"], runs["two"]
    outs = tmp / "outs-cut"
    outs.mkdir()
    kwargs = dict(quant_dir=str(runs["qdir"]), data=str(runs["data"]), out=str(outs / "cut"), save_every=3,
                  fsdp=True, **COMMON)
    cut = _run(tmp, "cut", kwargs, interrupt_at=4, expect_ok=False)
    assert "losses" not in cut[0] and "losses" not in cut[1]
    work = outs / ".cut.lpq-finetune"
    assert json.loads((work / "sharded.json").read_text()) == {"world": 2, "step": 3}
    files = sorted(p.name for p in work.iterdir())
    assert files == ["manifest.json", "sharded.json", "state-3.rank0.pt", "state-3.rank1.pt"], files
    for r in range(2):
        st = torch.load(work / f"state-3.rank{r}.pt", map_location="cpu", weights_only=False)
        assert st["step"] == 3 and st["world"] == 2 and st["losses"] == two[0]["losses"][:3]
        # each process's file has its own halves of the trainable tensors
        a = st["trainable"]["model.layers.0.mlp.down_proj.lora_b"]  # [64, 4] whole
        assert a.shape == (32, 4)
    # another number of processes, or no --fsdp, is refused in one line before anything is loaded
    run_kw = {k: v for k, v in kwargs.items() if k not in ("quant_dir", "data", "out")}
    with pytest.raises(LpqError, match=r"sharded over 2 processes, this run has 1: resume it with accelerate launch --num_processes 2") as e:
        finetune(runs["qdir"], runs["data"], outs / "cut", resume=True, **run_kw)
    assert "\n" not in str(e.value)
    with pytest.raises(LpqError, match="--fsdp"):
        finetune(runs["qdir"], runs["data"], outs / "cut", resume=True, **{**run_kw, "fsdp": False})
    resumed = _run(tmp, "resumed", {**kwargs, "resume": True})
    assert [r["resumed_from"] for r in resumed] == [3, 3]
    # same processes, same order of sums: the uninterrupted sharded run's losses, bit for bit
    assert resumed[0]["losses"] == resumed[1]["losses"] == two[0]["losses"]
    assert sorted(p.name for p in outs.iterdir()) == ["cut"]
    assert_same_saved_model(runs["outs"] / "two", outs / "cut")


@slow
def test_solo_on_shards_lowers_the_loss(runs):
    tmp = runs["tmp"]
    outs = tmp / "outs-solo"
    kwargs = dict(quant_dir=str(runs["qdir"]), data=str(runs["data"]), out=str(outs / "solo"), fsdp=True,
                  **{**COMMON, "steps": 8, "optim": "solo", "variant": "l4q", "lr": 1e-2})
    solo = _run(tmp, "solo", kwargs, small_solo=True)
    losses = solo[0]["losses"]
    assert solo[1]["losses"] == losses and len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    # 3-bit states of each process's shard: far below fp32 AdamW's 8 bytes per trainable entry
    for r in solo:
        local = sum(p["local"] for p in r["params"].values() if p["grad"])
        assert 0 < r["state_bytes"] < 0.25 * 8 * local, (r["state_bytes"], local)
    assert lpq.load(outs / "solo", device="cpu") is not None


def test_fsdp_needs_several_processes(packed):
    tmp, qdir, data, _ = packed
    with pytest.raises(LpqError, match="--fsdp shards the model over several processes: start it with accelerate launch"):
        finetune(qdir, data, tmp / "single", fsdp=True, **COMMON)
    with pytest.raises(LpqError, match="--distill does not combine with --fsdp"):
        finetune(qdir, data, tmp / "single", fsdp=True, distill=str(qdir), **COMMON)
    assert not (tmp / "single").exists() and not (tmp / ".single.lpq-finetune").exists()


def test_frozen_parameters_compute_as_buffers(packed):
    """freeze_as_parameters changes only the kind of codes/scales0/zeros: same outputs, no new trainables."""
    from lpq.finetune import prepare_qat, trainable_parameters

    model = lpq.load(packed[1], device="cpu")
    layers = prepare_qat(model, rank=4)
    ids = torch.arange(40).view(2, 20)
    with torch.no_grad():
        for m in layers.values():
            m.lora_b.normal_(0, 0.05)
        model.train()
        ref = model(input_ids=ids).logits
    before = [id(p) for g in trainable_parameters(model) for p in g]
    codes_before = next(iter(layers.values())).codes.clone()
    for m in layers.values():
        m.freeze_as_parameters()
    after = [id(p) for g in trainable_parameters(model) for p in g]
    assert before == after
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_a", "lora_b", "log_step")) for n in names)
    m = next(iter(layers.values()))
    assert isinstance(m.codes, torch.nn.Parameter) and "codes" not in m._buffers
    # a floating-point view of the same bytes (FSDP2 of torch <= 2.11 refuses integer parameters)
    assert m.codes.dtype == torch.float16 and m.codes.shape[1] * 2 == m.code_tensor().shape[1]
    assert m.code_tensor().dtype == torch.uint8 and torch.equal(m.code_tensor(), codes_before)
    with torch.no_grad():
        model.train()
        assert torch.equal(model(input_ids=ids).logits, ref)
        model.eval()
        out = model(input_ids=ids).logits
        assert m._cached is None  # no dense copy kept per layer when sharded
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_cli_fsdp_without_processes_is_one_error_line(packed):
    from click.testing import CliRunner

    from lpq.cli.main import cli

    tmp, qdir, data, _ = packed
    res = CliRunner().invoke(cli, ["finetune", str(qdir), "--qat", "--data", str(data), "--fsdp", "--steps", "1",
                                   "--batch", "2", "--seqlen", "16", "--device", "cpu", "--out", str(tmp / "cli1")])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == ["error: --fsdp shards the model over several processes: start it with accelerate launch "
                     "--num_processes N (N >= 2, one GPU each), or drop --fsdp on one GPU"], res.output
