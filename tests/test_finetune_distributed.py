"""QAT fine-tuning data-parallel under ``accelerate launch``: two CPU processes (gloo) against one.

accelerate's ``--cpu --num_processes 2`` starts a single process (it expects mpirun for several CPU
processes), so the runs here use ``--multi_gpu --num_processes 2``, which starts two processes through
torchrun; with ``device="cpu"`` lpq's Accelerator is a CPU one and they talk over gloo.

Tolerance of the two-process curve against the one-process curve. Both runs take the same global
batch of 4 windows (the two processes 2 each) and step on the same mean loss; they differ only in the
order of floating-point sums: each process averages its 2 x 31 token losses and the two means are
averaged, where one process averages all 124 at once; weight gradients are summed over each process's
tokens and then all-reduced. In fp32 (unit roundoff 6e-8) a pairwise sum of n positive terms is off
by at most about log2(n) roundings, so a step's loss moves by at most ~8 x 6e-8 = 5e-7, and gradients
by ~1e-7 relative. For the qalora variant the forward is a smooth function of the adapters, Adam turns
the gradients' ~1e-7 into updates ~1e-7 * lr apart, and those move the next losses by far less than
a rounding. Hence rtol 2e-6 (about 20 roundings of a loss near 5). A run whose gradients were not
averaged across the processes (each stepping on its own half batch) is 3e-4 to 1e-3 off from step 1
on, more than 100 times that.

The default l4q variant is compared at step 0 only. Its learned step sizes start with a gradient that
is zero in exact arithmetic (the base weight lies on the grid), so in fp32 it is rounding noise
(~1e-10, signs set by the order of the sums); Adam (eps 1e-8) turns that noise into steps of a few
per cent of lr, which move the fp16-rounded scales. Its curve therefore depends on the summation order
even in one process: accumulating the same batch as two halves moves it by 1e-5 to 1e-4 as well.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lpq
from lpq.errors import LpqError
from lpq.finetune import end_distributed, finetune
from lpq.nn import QuantizedLinear

from conftest import assert_same_saved_model, make_model

slow = pytest.mark.slow  # the four launches of two processes together take about a minute on 2 cores

ROOT = Path(__file__).resolve().parents[1]
RTOL = 2e-6
COMMON = dict(steps=6, batch=4, seqlen=32, lora_rank=4, lr=3e-3, variant="qalora", device="cpu", seed=0)

DRIVER = '''
"""Run lpq.finetune.finetune(**json argv[1]) in this process; write what it did to argv[2]/rank<R>.json."""
import json, os, sys
from pathlib import Path

import torch.distributed as dist

from lpq.finetune import end_distributed, finetune
from lpq.finetune import train as train_mod

kwargs, report, interrupt_at = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
calls = {"save_checkpoint": 0, "save_merged": 0, "broadcast": None}


def counting(key, fn):
    def wrapper(*a, **k):
        calls[key] += 1
        return fn(*a, **k)
    return wrapper


if hasattr(dist, "_broadcast_coalesced"):  # DDP broadcasts module buffers through it
    calls["broadcast"] = 0
    dist._broadcast_coalesced = counting("broadcast", dist._broadcast_coalesced)
train_mod.save_checkpoint = counting("save_checkpoint", train_mod.save_checkpoint)
train_mod.save_merged = counting("save_merged", train_mod.save_merged)
if interrupt_at >= 0:
    real = train_mod.lr_factor

    def factor(step, steps, warmup):
        if step == interrupt_at:
            raise KeyboardInterrupt
        return real(step, steps, warmup)

    train_mod.lr_factor = factor
record = {"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1"))}
try:
    res = finetune(**kwargs)
    record.update(losses=res.losses, tokens=res.tokens, resumed_from=res.resumed_from, main=res.main_process)
finally:
    record["calls"] = calls
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*argv: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two processes on this CPU (see the module docstring)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LPQ_QUIET": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if expect_ok:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def _run_driver(tmp: Path, name: str, kwargs: dict, interrupt_at: int = -1, expect_ok: bool = True) -> list[dict]:
    (tmp / "driver.py").write_text(DRIVER)
    report = tmp / f"report-{name}"
    _launch(str(tmp / "driver.py"), json.dumps(kwargs), str(report), str(interrupt_at), expect_ok=expect_ok)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer, sample_text):
    tmp = tmp_path_factory.mktemp("ddp")
    qdir = tmp / "q3"
    lpq.quantize(make_model("llama"), qdir, tokenizer=tokenizer, method="rtn", bits=3, group_size=32)
    data = tmp / "train.txt"
    data.write_text(sample_text[:12000], encoding="utf-8")
    return tmp, qdir, data


@pytest.fixture(scope="module")
def runs(packed):
    tmp, qdir, data = packed
    one = finetune(qdir, data, tmp / "one", **COMMON)  # the one-process reference, in this process
    outs = tmp / "outs"
    outs.mkdir()
    kwargs = dict(quant_dir=str(qdir), data=str(data), out=str(outs / "two"), save_every=3, **COMMON)
    two = _run_driver(tmp, "two", kwargs)
    return {"tmp": tmp, "qdir": qdir, "data": data, "one": one, "two": two, "outs": outs}


@slow
def test_two_processes_repeat_the_one_process_losses(runs):
    one, two = runs["one"], runs["two"]
    assert [r["world"] for r in two] == [2, 2]
    assert two[0]["losses"] == two[1]["losses"]  # every process reports the all-reduced global mean
    assert len(two[0]["losses"]) == COMMON["steps"]
    assert two[0]["losses"] == pytest.approx(one.losses, rel=RTOL, abs=0)
    assert one.losses[-1] != one.losses[0]  # the adapters trained (qalora moves the forward from step 1)
    # tokens count the global batch, not one process's share
    assert two[0]["tokens"] == one.tokens == COMMON["steps"] * COMMON["batch"] * COMMON["seqlen"]
    assert [r["main"] for r in two] == [True, False]


@slow
def test_only_the_main_process_writes(runs):
    two, outs = runs["two"], runs["outs"]
    assert [r["calls"]["save_merged"] for r in two] == [1, 0]
    assert [r["calls"]["save_checkpoint"] for r in two] == [1, 0]  # save_every 3 of 6 steps: once
    # the merged model exists once, and neither the checkpoint folder nor a temporary folder is left
    assert sorted(p.name for p in outs.iterdir()) == ["two"]
    model = lpq.load(outs / "two", device="cpu")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    cfg = json.loads((outs / "two" / "config.json").read_text())["quantization_config"]
    assert cfg["finetune"]["steps"] == COMMON["steps"] and cfg["finetune"]["batch"] == COMMON["batch"]


@slow
def test_frozen_buffers_are_not_broadcast_every_step(runs):
    """DDP's default re-sends every buffer (the uint8 codes: 1 byte per weight) before each forward."""
    for r in runs["two"]:
        if r["calls"]["broadcast"] is None:
            pytest.skip("this torch has no torch.distributed._broadcast_coalesced to count")
        assert r["calls"]["broadcast"] <= 1, r  # at most the one sync when DDP is built, not one per step


@slow
def test_resume_under_two_processes(runs):
    """A 2-process run cut after its checkpoint at step 3 resumes on 2 processes and repeats the losses."""
    tmp, two = runs["tmp"], runs["two"]
    outs = tmp / "outs-cut"
    outs.mkdir()
    kwargs = dict(quant_dir=str(runs["qdir"]), data=str(runs["data"]), out=str(outs / "cut"), save_every=3, **COMMON)
    cut = _run_driver(tmp, "cut", kwargs, interrupt_at=4, expect_ok=False)
    assert [r["calls"]["save_checkpoint"] for r in cut] == [1, 0] and "losses" not in cut[0]
    work = outs / ".cut.lpq-finetune"
    assert (work / "state.pt").is_file() and not (outs / "cut").exists()
    state = torch.load(work / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and state["losses"] == two[0]["losses"][:3]
    resumed = _run_driver(tmp, "resumed", {**kwargs, "resume": True})
    assert [r["resumed_from"] for r in resumed] == [3, 3]
    # same processes, same order of sums: the resumed run repeats the uninterrupted 2-process run bit for bit
    assert resumed[0]["losses"] == resumed[1]["losses"] == two[0]["losses"]
    assert sorted(p.name for p in outs.iterdir()) == ["cut"]
    assert_same_saved_model(runs["outs"] / "two", outs / "cut")


@slow
def test_cli_under_two_processes_prints_one_summary(runs):
    """The default l4q variant through ``lpq finetune``: one JSON summary, one output, same first loss."""
    tmp, one = runs["tmp"], runs["one"]
    out = tmp / "outs-cli" / "l4q"
    res = _launch("-m", "lpq.cli.main", "finetune", str(runs["qdir"]), "--qat", "--data", str(runs["data"]),
                  "--steps", "3", "--batch", str(COMMON["batch"]), "--seqlen", str(COMMON["seqlen"]),
                  "--lora-rank", "4", "--lr", "3e-3", "--device", "cpu", "--out", str(out), "--json")
    summary = json.loads(res.stdout)  # a second process's summary would make this "Extra data"
    assert summary["steps"] == 3 and summary["tokens"] == 3 * COMMON["batch"] * COMMON["seqlen"]
    # step 0 sees the untrained model (LoRA B = 0) on the same first batch: the packed model's loss,
    # the same for l4q and qalora, so it must match the one-process qalora run's first loss
    assert summary["losses"][0] == pytest.approx(one.losses[0], rel=RTOL, abs=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["l4q"]
    model = lpq.load(out, device="cpu")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["default"]["options"]["qat"]["variant"] == "l4q"
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launch_is_refused(packed, kind):
    """Under accelerate's FSDP or DeepSpeed the loop would still run plain DDP: say so instead."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lpq.finetune import FinetuneConfig, prepare_qat, train_qat

    model = lpq.load(packed[1], device="cpu")
    prepare_qat(model, rank=4)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=0, is_main_process=True,
                          distributed_type=getattr(DistributedType, kind))
    with pytest.raises(LpqError, match="data-parallel"):
        train_qat(model, torch.zeros(4, 8, dtype=torch.long), FinetuneConfig(steps=1, batch=2, seqlen=8), acc)


def test_end_distributed_destroys_the_process_group(tmp_path):
    """The process group a launch created is torn down (and a second call, or none at all, is a no-op)."""
    import torch.distributed as dist

    end_distributed()  # nothing initialized: no error
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_distributed()
        assert not dist.is_initialized()
        end_distributed()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
