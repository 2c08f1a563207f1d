"""QAT fine-tuning with distillation from the unquantized model (``--distill``), tiny models.

The teacher is the tiny unquantized llama saved to a directory; the student is the same model
quantized with RTN w3 g32, so KL(teacher || student) starts at the quantization error.
"""

import gc
import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import lpq
from lpq.cli.finetune import finetune as finetune_cmd
from lpq.errors import LpqError
from lpq.finetune import DISTILL_ALPHA, FinetuneConfig, distill_loss, finetune, prepare_qat, train_qat
from lpq.finetune import train as train_mod
from lpq.nn import QuantizedLinear

from conftest import assert_same_saved_model, VOCAB, interrupt_training_at, make_model, save_model

COMMON = dict(steps=6, batch=2, seqlen=32, lora_rank=4, lr=3e-3, device="cpu")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    return save_model(make_model("llama"), tokenizer, tmp_path_factory.mktemp("teacher") / "fp")


def _direct_kl(student, teacher, mask=None):
    """Mean over (masked) tokens of sum_v p_t (log p_t - log p_s), with torch's own kl_div."""
    per_token = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                         reduction="none").sum(-1)
    return per_token.mean() if mask is None else per_token[mask].mean()


# ---------------------------------------------------------------------------------------------------
# the pure loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_distill_loss_equals_direct_kl_value_and_gradient(chunk, masked):
    g = torch.Generator().manual_seed(chunk)
    s = (torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3
    mask = None
    if masked:
        mask = torch.rand(3, 5, generator=g) > 0.4
        mask[0, 0] = True
    loss = distill_loss(s, t, mask, chunk=chunk)
    loss.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    ref = _direct_kl(s_ref, t, mask)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    assert ref.item() > 0.5  # random logits: far from each other, so the comparison means something
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
    if masked:  # tokens outside the mask get no gradient
        assert (s.grad[~mask] == 0).all() and (s.grad[mask].abs().sum(-1) > 0).all()


def test_distill_loss_is_zero_for_the_teacher_itself():
    x = torch.randn(2, 9, 31, generator=torch.Generator().manual_seed(1)) * 4
    s = x.clone().requires_grad_(True)
    loss = distill_loss(s, x, chunk=4)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s.grad.abs().max() < 1e-6
    # and positive as soon as the student moves
    assert distill_loss(x + 0.3 * torch.randn_like(x), x).item() > 1e-3


def test_gradient_reaches_the_student_only():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 13, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 13, generator=g, requires_grad=True)
    distill_loss(s, t, chunk=3).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # the analytic gradient: (softmax(s) - softmax(t)) / tokens
    expected = (s.detach().softmax(-1) - t.detach().softmax(-1)) / 8
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_teacher_logits_are_not_kept_by_the_graph():
    """The KL keeps its gradient, not the teacher's [B, L, V] logits: they can be freed before backward."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 11, generator=g)
    expected = _direct_kl(s.detach(), t)
    ref = weakref.ref(t)
    loss = distill_loss(s * 1.0, t, chunk=5)
    del t
    gc.collect()
    assert ref() is None
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bf16_logits_and_masked_out_vocabulary():
    g = torch.Generator().manual_seed(4)
    s32 = torch.randn(2, 5, 19, generator=g) * 2
    t32 = torch.randn(2, 5, 19, generator=g) * 2
    s = s32.to(torch.bfloat16).requires_grad_(True)
    loss = distill_loss(s, t32.to(torch.bfloat16), chunk=3)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16  # the gradient lives in the student logits' dtype
    ref = _direct_kl(s32.to(torch.bfloat16).float(), t32.to(torch.bfloat16).float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a teacher logit of -inf (a token it never predicts) contributes 0, not nan
    t_inf = t32.clone()
    t_inf[..., :4] = float("-inf")
    val = distill_loss(s32, t_inf).item()
    p_t = t_inf.softmax(-1)
    direct = (p_t[..., 4:] * (p_t[..., 4:].log() - s32.log_softmax(-1)[..., 4:])).sum(-1).mean()
    assert math.isfinite(val) and val == pytest.approx(direct.item(), rel=1e-5)


def test_distill_loss_refuses_other_shapes():
    with pytest.raises(LpqError, match="vocabulary"):
        distill_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


# ---------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------
def _held_out_kl(student, teacher, ids):
    with torch.no_grad():
        return distill_loss(student(ids).logits, teacher(ids).logits).item()


def test_kd_steps_lower_the_kl_to_the_teacher(qdir, teacher_dir, train_file, tmp_path, sample_text, tokenizer):
    ids = torch.tensor([tokenizer(sample_text[20000:20000 + 400])["input_ids"][:96]])  # text not trained on
    teacher = lpq.api.load_any(str(teacher_dir), "cpu")[0]
    before = _held_out_kl(lpq.load(qdir, device="cpu"), teacher, ids)
    res = finetune(qdir, train_file, tmp_path / "kd", distill=str(teacher_dir), distill_alpha=1.0,
                   **{**COMMON, "steps": 8, "lr": 1e-2})
    after = _held_out_kl(lpq.load(tmp_path / "kd", device="cpu"), teacher, ids)
    assert before > 0.01
    assert after < 0.8 * before, (before, after)
    # alpha 1: the loss is the KL term; CE recorded beside it
    assert res.distill == str(teacher_dir) and res.distill_alpha == 1.0
    assert len(res.kd_losses) == len(res.ce_losses) == 8 and res.losses == res.kd_losses
    assert all(c > 3 * k for c, k in zip(res.ce_losses, res.kd_losses))  # CE (~5 nats) is not the KL
    cfg = json.loads((tmp_path / "kd" / "config.json").read_text())["quantization_config"]["finetune"]
    assert cfg["distill"] == str(teacher_dir) and cfg["distill_alpha"] == 1.0


def test_alpha_zero_repeats_the_plain_run(qdir, teacher_dir, train_file, tmp_path):
    plain = finetune(qdir, train_file, tmp_path / "plain", **COMMON)
    kd0 = finetune(qdir, train_file, tmp_path / "kd0", distill=str(teacher_dir), distill_alpha=0.0, **COMMON)
    assert kd0.losses == plain.losses  # bit for bit: the teacher changes neither data, RNG nor gradients
    assert kd0.ce_losses == plain.losses and len(kd0.kd_losses) == COMMON["steps"]
    assert all(k > 0 for k in kd0.kd_losses)
    assert_same_saved_model(tmp_path / "plain", tmp_path / "kd0")
    # while a real mix moves the run
    mixed = finetune(qdir, train_file, tmp_path / "kd5", distill=str(teacher_dir), distill_alpha=0.5, **COMMON)
    assert mixed.losses != plain.losses
    for loss, ce, kd in zip(mixed.losses, mixed.ce_losses, mixed.kd_losses):
        assert loss == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-6)


def test_kd_without_gradient_checkpointing_gives_the_same_losses(qdir, teacher_dir, train_file, tmp_path):
    common = {**COMMON, "steps": 3}
    on = finetune(qdir, train_file, None, distill=str(teacher_dir), distill_alpha=0.5, **common)
    off = finetune(qdir, train_file, None, distill=str(teacher_dir), distill_alpha=0.5, grad_checkpointing=False,
                   **common)
    assert on.losses == pytest.approx(off.losses, rel=1e-6)


def test_teacher_stays_frozen_and_in_eval_mode(qdir, teacher_dir, tokenizer):
    model = lpq.load(qdir, device="cpu")
    prepare_qat(model, rank=4)
    teacher = lpq.api.load_any(str(teacher_dir), "cpu")[0]
    teacher.train()  # the loop must put it back in eval mode
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    windows = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(steps=2, batch=2, seqlen=24, lora_rank=4, lr=1e-2, distill=str(teacher_dir))
    run = train_qat(model, windows, cfg, teacher=teacher)
    assert len(run["kd_losses"]) == 2
    assert not teacher.training
    for n, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, n
        assert torch.equal(p, before[n]), n


def test_resume_of_a_kd_run_repeats_the_uninterrupted_losses(qdir, teacher_dir, train_file, tmp_path, monkeypatch):
    kd = dict(distill=str(teacher_dir), distill_alpha=0.7, **COMMON)
    full = finetune(qdir, train_file, tmp_path / "full", **kd)
    interrupt_training_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(qdir, train_file, tmp_path / "cut", save_every=3, **kd)
    work = tmp_path / ".cut.lpq-finetune"
    manifest = json.loads((work / "manifest.json").read_text())["config"]
    assert manifest["distill"] == str(teacher_dir.resolve()) and manifest["distill_alpha"] == 0.7
    monkeypatch.undo()
    # other distillation settings (or none) are refused, and leave the checkpoint alone
    for other in (dict(kd, distill_alpha=0.5), dict(COMMON)):
        with pytest.raises(LpqError, match="other settings"):
            finetune(qdir, train_file, tmp_path / "cut", save_every=3, resume=True, **other)
    assert (work / "state.pt").is_file()
    resumed = finetune(qdir, train_file, tmp_path / "cut", save_every=3, resume=True, **kd)
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses  # bit for bit
    assert resumed.ce_losses == full.ce_losses and resumed.kd_losses == full.kd_losses
    assert_same_saved_model(tmp_path / "full", tmp_path / "cut")


def test_plain_run_manifest_is_unchanged(qdir, train_file, tmp_path):
    """A run without a teacher writes the manifest it always wrote (older interrupted runs still resume)."""
    m = train_mod._manifest(str(qdir), str(train_file), FinetuneConfig())
    assert "distill" not in m["config"] and "distill_alpha" not in m["config"]


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_config_refuses_bad_alpha(alpha):
    with pytest.raises(LpqError, match="--distill-alpha"):
        FinetuneConfig(distill="smollm2-135m", distill_alpha=alpha).check()
    FinetuneConfig(distill="smollm2-135m", distill_alpha=0.0).check()
    FinetuneConfig(distill="smollm2-135m", distill_alpha=1.0).check()


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, vocab_size=VOCAB + 32,
                      bos_token_id=1, eos_token_id=2)
    return save_model(AutoModelForCausalLM.from_config(cfg), tokenizer, tmp_path_factory.mktemp("t160") / "m")


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("case", ["alpha_high", "alpha_negative", "alpha_without_teacher", "vocab", "missing"])
def test_cli_refuses_bad_distillation(case, qdir, teacher_dir, other_vocab_dir, train_file, tmp_path):
    extra, words = {
        "alpha_high": (["--distill", str(teacher_dir), "--distill-alpha", "1.5"], ["--distill-alpha 1.5", "between 0 and 1"]),
        "alpha_negative": (["--distill", str(teacher_dir), "--distill-alpha", "-1"], ["--distill-alpha -1"]),
        "alpha_without_teacher": (["--distill-alpha", "0.5"], ["--distill-alpha needs --distill"]),
        "vocab": (["--distill", str(other_vocab_dir)], [f"{VOCAB + 32} tokens", f"student's {VOCAB}"]),
        "missing": (["--distill", str(tmp_path / "no-such-model")], ["--distill", "not found"]),
    }[case]
    out = tmp_path / "o"
    res = CliRunner().invoke(finetune_cmd, [str(qdir), "--qat", "--data", str(train_file), "--out", str(out),
                                            "--device", "cpu", "--steps", "1", *extra])
    _one_line_error(res, *words)
    assert not out.exists() and not (tmp_path / ".o.lpq-finetune").exists()


def test_train_qat_refuses_a_teacher_of_another_vocabulary(qdir, other_vocab_dir):
    model = lpq.load(qdir, device="cpu")
    prepare_qat(model, rank=4)
    cfg = FinetuneConfig(steps=1, batch=1, seqlen=8, lora_rank=4, distill=str(other_vocab_dir))
    with pytest.raises(LpqError, match=f"{VOCAB + 32} tokens and the student's {VOCAB}"):
        train_qat(model, torch.zeros(2, 8, dtype=torch.long), cfg)


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------
def test_cli_with_distill(qdir, teacher_dir, train_file, tmp_path):
    out = tmp_path / "ft"
    res = CliRunner().invoke(finetune_cmd, [str(qdir), "--qat", "--data", str(train_file), "--steps", "3", "--batch", "2",
                                            "--seqlen", "32", "--lora-rank", "4", "--out", str(out), "--device", "cpu",
                                            "--distill", str(teacher_dir), "--distill-alpha", "0.25", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["distill"] == str(teacher_dir) and summary["distill_alpha"] == 0.25
    assert len(summary["ce_losses"]) == len(summary["kd_losses"]) == len(summary["losses"]) == 3
    assert summary["losses"][0] == pytest.approx(0.75 * summary["ce_losses"][0] + 0.25 * summary["kd_losses"][0], rel=1e-6)
    model = lpq.load(out, device="cpu")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    # the plain summary names the teacher
    res = CliRunner().invoke(finetune_cmd, [str(qdir), "--qat", "--data", str(train_file), "--steps", "2", "--batch", "2",
                                            "--seqlen", "32", "--lora-rank", "4", "--out", str(out), "--overwrite",
                                            "--device", "cpu", "--distill", str(teacher_dir)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())  # rich wraps long lines
    assert f"distilled from {teacher_dir} (alpha {DISTILL_ALPHA:g};" in said and "loss = 0.5 * CE + 0.5 * KL" in said
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["finetune"]
    assert cfg["distill"] == str(teacher_dir) and cfg["distill_alpha"] == DISTILL_ALPHA == 0.5  # the default


def test_cli_without_distill_reports_no_teacher(qdir, train_file, tmp_path):
    res = CliRunner().invoke(finetune_cmd, [str(qdir), "--qat", "--data", str(train_file), "--steps", "1", "--batch", "2",
                                            "--seqlen", "32", "--lora-rank", "4", "--out", str(tmp_path / "p"),
                                            "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["distill"] is None and summary["distill_alpha"] is None
    assert summary["ce_losses"] == [] and summary["kd_losses"] == []


# ---------------------------------------------------------------------------------------------------
# two processes (accelerate launch), each with its own teacher
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_distill_like_one(qdir, teacher_dir, train_file, tmp_path):
    from test_finetune_distributed import COMMON as DDP_COMMON
    from test_finetune_distributed import RTOL, _run_driver

    kwargs = dict(DDP_COMMON, distill=str(teacher_dir), distill_alpha=0.5)
    one = finetune(qdir, train_file, tmp_path / "one", **kwargs)
    two = _run_driver(tmp_path, "kd2", dict(quant_dir=str(qdir), data=str(train_file), out=str(tmp_path / "two"),
                                              **kwargs))
    assert [r["world"] for r in two] == [2, 2] and two[0]["losses"] == two[1]["losses"]
    assert two[0]["losses"] == pytest.approx(one.losses, rel=RTOL, abs=0)
    assert one.losses[-1] != one.losses[0]
    assert [r["calls"]["save_merged"] for r in two] == [1, 0]
