"""QAT fine-tuning: gradients, merge exactness, save/load, exact resume, CLI errors (tiny models)."""

import json

import pytest
import torch
from click.testing import CliRunner

import lpq
from lpq.cli.finetune import finetune as finetune_cmd
from lpq.finetune import QATLinear, finetune, merge_qat, prepare_qat, qat_layers
from lpq.finetune import train as train_mod
from lpq.finetune.merge import merge_layer
from lpq.nn import QuantizedLinear

from conftest import assert_same_saved_model, interrupt_training_at, make_model


def _ids(n=2, length=48, seed=0):
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=0):
    """Give the adapters and steps non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in qat_layers(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
            if m.log_step is not None:
                m.log_step.copy_(torch.randn(m.log_step.shape, generator=g) * 0.05)


def test_fresh_qat_model_equals_packed_model(qdir):
    ref = lpq.load(qdir, device="cpu")
    model = lpq.load(qdir, device="cpu")
    prepare_qat(model, rank=4)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["l4q", "qalora"])
def test_gradients_reach_adapters_and_scales_not_base(qdir, variant):
    model = lpq.load(qdir, device="cpu")
    layers = prepare_qat(model, rank=4, variant=variant)
    assert len(layers) == 14 and not any(isinstance(m, QuantizedLinear) for m in model.modules())
    _perturb(model)
    codes_before = {n: m.codes.clone() for n, m in layers.items()}
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, m in layers.items():
        assert m.lora_a.grad is not None and m.lora_a.grad.abs().sum() > 0, name
        assert m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0, name
        if variant == "l4q":
            assert m.log_step.grad is not None and m.log_step.grad.abs().sum() > 0, name
        assert not m.codes.requires_grad and m.codes.dtype == torch.uint8
        assert f"{name}.codes" not in trainable
    # everything outside the adapters and steps is frozen and got no gradient
    for n, p in model.named_parameters():
        if not any(k in n for k in ("lora_a", "lora_b", "log_step")):
            assert not p.requires_grad and p.grad is None, n
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for n, m in layers.items():
        assert torch.equal(m.codes, codes_before[n])


def test_step_size_gradient_is_lsq():
    """d Wq / d s = round(w/s) - w/s inside the grid, (q - z) where clamped: LSQ's estimator."""
    from lpq.finetune.qat import l4q_codes_and_weight

    w = torch.tensor([[0.26, -0.74, 5.0, -5.0]])
    s = torch.tensor([[0.5]], requires_grad=True)
    z = torch.tensor([[2.0]])
    _, wq = l4q_codes_and_weight(w, s, z, torch.zeros(4, dtype=torch.long), bits=2)  # codes 0..3
    grads = [torch.autograd.grad(wq[0, i], s, retain_graph=True)[0].item() for i in range(4)]
    expected = [round(0.52) - 0.52, round(-1.48) + 1.48, 3 - 2, 0 - 2]
    assert grads == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("variant", ["l4q", "qalora"])
def test_merge_then_dequantize_equals_trained_weights(qdir, variant):
    model = lpq.load(qdir, device="cpu")
    layers = prepare_qat(model, rank=4, variant=variant)
    _perturb(model, seed=1)
    for name, layer in layers.items():
        trained = layer.fake_quant_weight().detach()
        merged = merge_layer(layer)
        assert isinstance(merged, QuantizedLinear) and merged.spec.bits == 3 and merged.spec.options["qat"]["variant"] == variant
        deq = merged.dequantize()
        if variant == "l4q":
            # the forward already computes on the stored grid: equal up to fp32 arithmetic
            torch.testing.assert_close(deq, trained, rtol=0, atol=1e-6)
        else:
            # zeros are stored as integers: each weight moves by at most half a step, unless clamped
            s = layer.scales0[layer.g_idx].t()
            z = (layer.zeros - (layer.delta() / torch.bincount(layer.g_idx).float()).t() / layer.scales0)[layer.g_idx].t()
            inside = (z > -0.5) & (z < layer.spec.maxq + 0.5)
            assert ((deq - trained).abs() <= 0.5 * s + 1e-6)[inside].all()
            assert inside.float().mean() > 0.9


def test_merged_model_saves_loads_and_matches(qdir, tmp_path, tokenizer):
    model = lpq.load(qdir, device="cpu")
    prepare_qat(model, rank=4)
    _perturb(model, seed=2)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        trained_logits = model(ids).logits
    merge_qat(model, {"steps": 0})
    assert not qat_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained_logits, rtol=1e-4, atol=1e-4)
    from lpq.finetune import save_merged

    for fmt in ("lpq", "gptq"):
        out = save_merged(model, tokenizer, tmp_path / fmt, save_format=fmt)
        loaded = lpq.load(out, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, trained_logits, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "lpq" / "config.json").read_text())["quantization_config"]
    assert cfg["default"]["options"]["qat"]["variant"] == "l4q" and cfg["finetune"] == {"steps": 0}


@pytest.mark.parametrize("optim", ["adamw", "solo"])
def test_resume_repeats_the_uninterrupted_losses(qdir, train_file, tmp_path, monkeypatch, optim):
    common = dict(steps=6, batch=2, seqlen=32, lora_rank=4, lr=3e-3, optim=optim, device="cpu")
    full = finetune(qdir, train_file, tmp_path / "full", **common)
    assert len(full.losses) == 6 and full.losses[-1] < full.losses[0]
    interrupt_training_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(qdir, train_file, tmp_path / "cut", save_every=3, **common)
    assert (tmp_path / ".cut.lpq-finetune" / "state.pt").is_file() and not (tmp_path / "cut").exists()
    monkeypatch.undo()
    resumed = finetune(qdir, train_file, tmp_path / "cut", save_every=3, resume=True, **common)
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses  # bit for bit
    assert not (tmp_path / ".cut.lpq-finetune").exists()
    assert_same_saved_model(tmp_path / "full", tmp_path / "cut")


def test_batch_order_is_a_pure_function_of_the_step():
    seen = torch.cat([train_mod.batch_indices(s, 3, 10, seed=0) for s in range(10)])
    # 30 indices = 3 whole epochs of 10 windows, each a permutation
    for e in range(3):
        assert sorted(seen[e * 10:(e + 1) * 10].tolist()) == list(range(10))
    assert torch.equal(train_mod.batch_indices(7, 3, 10, 0), train_mod.batch_indices(7, 3, 10, 0))
    assert not torch.equal(seen[:10], seen[10:20])


def test_cli_end_to_end(qdir, train_file, tmp_path):
    out = tmp_path / "ft"
    res = CliRunner().invoke(finetune_cmd, [str(qdir), "--qat", "--data", str(train_file), "--steps", "3", "--batch", "2",
                                            "--seqlen", "32", "--lora-rank", "4", "--optim", "solo", "--state-bits", "3",
                                            "--out", str(out), "--device", "cpu", "--json",
                                            "--eval-text", str(train_file), "--eval-windows", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["steps"] == 3 and summary["state_bytes"] > 0
    assert set(summary["perplexity"]) == {"before", "unmerged", "merged"}
    assert summary["perplexity"]["merged"] == pytest.approx(summary["perplexity"]["unmerged"], rel=1e-3)
    model = lpq.load(out, device="cpu")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    report = lpq.inspect(out)
    assert 3 < report["bpw"] < 4


def _one_line_error(res, *words):
    assert res.exit_code != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("case", ["not_quantized", "no_dir", "missing_data", "bad_bits", "no_qat"])
def test_cli_bad_input(case, qdir, llama_dir, train_file, tmp_path):
    model, data, extra, words = str(qdir), str(train_file), [], []
    if case == "not_quantized":
        model, words = str(llama_dir), ["not quantized"]
    elif case == "no_dir":
        model, words = str(tmp_path / "nope"), ["not a quantized"]
    elif case == "missing_data":
        data, words = str(tmp_path / "missing.txt"), ["not found"]
    elif case == "bad_bits":
        extra, words = ["--optim", "solo", "--state-bits", "5"], ["--state-bits 5"]
    argv = [model, "--data", data, "--out", str(tmp_path / "o"), "--device", "cpu", "--steps", "1", *extra]
    if case != "no_qat":
        argv.insert(1, "--qat")
    else:
        words = ["--qat"]
    res = CliRunner().invoke(finetune_cmd, argv)
    _one_line_error(res, *words)
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
