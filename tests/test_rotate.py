"""Residual-stream rotation (--rotate): the matrix, exactness per family, refusals, and quantize/load/CLI."""

import copy
import json

import pytest
import torch
from torch import nn

import lpq
from lpq import api
from lpq.errors import LpqError, UnsupportedModelError
from lpq.transforms import fuse_norm_into, norm_form, rotate_model, rotation_matrix

from conftest import _configs, make_model, run_cli, save_model

ROTATABLE = ["llama", "mistral", "qwen2", "gemma"]


def build(family: str, tie: bool | None = None, seed: int = 0, **changes):
    """A tiny model whose norm scales, biases and weights are all random (so folding and rotating them matters)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(_configs()[family])
    if tie is not None:
        cfg.tie_word_embeddings = tie
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    return model.eval()


def ids(n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(5))


def rms_norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def assert_identity_norm(norm, d: int) -> None:
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(1)) + 0.7
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).sqrt(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 7, 64, 96, 576, 1536])
def test_rotation_matrix_is_orthogonal(d):
    q = rotation_matrix(d, seed=3)
    assert q.shape == (d, d) and q.dtype == torch.float64
    eye = torch.eye(d, dtype=torch.float64)
    assert (q @ q.T - eye).abs().max() < 1e-10
    assert (q.T @ q - eye).abs().max() < 1e-10


def test_rotation_matrix_power_of_two_is_a_signed_hadamard():
    q = rotation_matrix(256, seed=0)
    assert torch.allclose(q.abs(), torch.full_like(q, 256**-0.5))


def test_rotation_matrix_is_seeded():
    a, b, c = rotation_matrix(96, 0), rotation_matrix(96, 0), rotation_matrix(96, 1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert rotation_matrix(96, 0, dtype=torch.float32).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_keeps_the_logits(family, tie):
    model = build(family, tie=tie)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    x = ids()
    ref = model(x, output_hidden_states=True)
    record = rotate_model(model, seed=2)
    got = model(x, output_hidden_states=True)

    scale = ref.logits.abs().max()
    assert (got.logits - ref.logits).abs().max() <= 1e-4 * scale
    # the stream really is rotated: the output of block 0 is the original's times Q
    q = rotation_matrix(model.config.hidden_size, 2, dtype=torch.float32)
    h_ref, h_got = ref.hidden_states[1], got.hidden_states[1]
    assert (h_got - h_ref).abs().max() > 0.1 * h_ref.abs().max()
    torch.testing.assert_close(h_got, h_ref @ q, rtol=1e-4, atol=1e-4)
    for norm in rms_norms(model):
        assert_identity_norm(norm, model.config.hidden_size)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    assert record["untied_lm_head"] == tie and record["kind"] == "hadamard" and record["seed"] == 2
    assert record["max_check_error"] < 1e-5
    model.tie_weights()  # transformers re-ties only what the config says: nothing now
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.allclose(model(x).logits, got.logits)


def test_rotation_of_writer_biases():
    model = build("llama", attention_bias=True, mlp_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None and model.model.layers[0].mlp.down_proj.bias is not None
    x = ids()
    ref = model(x).logits
    rotate_model(model)
    assert (model(x).logits - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_half_precision_model_passes_the_check():
    model = build("llama", tie=True).to(torch.bfloat16)
    x = ids(1, 16)
    ref = model(x).logits.float()
    record = rotate_model(model)
    assert record["max_check_error"] < 5e-2
    assert ((model(x).logits.float() - ref).norm() / ref.norm()) < 5e-2


@pytest.mark.parametrize("family,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_fuse_norm_into_keeps_the_output(family, offset):
    model = build(family)
    block = model.model.layers[0]
    norm, linears = block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj]
    assert norm_form(norm) == offset
    x = torch.randn(5, 64)
    before = [lin(norm(x)) for lin in linears]
    fuse_norm_into(norm, linears)
    assert torch.all(norm.weight == 1.0 - offset)
    for lin, want in zip(linears, before):
        torch.testing.assert_close(lin(norm(x)), want, rtol=1e-5, atol=1e-5)


def test_norm_form_refuses_a_norm_that_subtracts_the_mean():
    assert norm_form(nn.LayerNorm(8, bias=False)) is None
    assert norm_form(nn.LayerNorm(8)) is None


# ---------------------------------------------------------------------------------------------------
# refusals: one line, nothing changed
# ---------------------------------------------------------------------------------------------------
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_layer_norm_models_are_refused(family):
    model = make_model(family)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as err:
        rotate_model(model)
    assert str(err.value) == (f"--rotate supports pre-RMSNorm decoders (Llama, Mistral, Qwen2, Gemma); "
                              f"{type(model).__name__} uses LayerNorm: quantize it without --rotate")
    assert_untouched(model, before)


def test_unknown_linear_in_a_block_is_refused():
    model = build("llama")
    model.model.layers[1].mlp.extra = nn.Linear(64, 64)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"block 1\.mlp\.extra\.weight, which --rotate does not know"):
        rotate_model(model)
    assert_untouched(model, before)


def test_rms_norm_that_is_not_one_is_refused():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class CenteredRMSNorm(LlamaRMSNorm):  # looks like an RMSNorm, subtracts the mean
        def forward(self, x):
            return super().forward(x - x.mean(-1, keepdim=True))

    model = build("llama")
    old = model.model.layers[0].post_attention_layernorm
    new = CenteredRMSNorm(64)
    new.weight.data.copy_(old.weight.data)
    model.model.layers[0].post_attention_layernorm = new
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="post_attention_layernorm in block 0.*does not compute"):
        rotate_model(model)
    assert_untouched(model, before)


def test_a_block_that_only_looks_right_is_caught_by_the_probe():
    model = build("llama")
    block = model.model.layers[1]
    channel_scale = torch.linspace(0.5, 1.5, 64)
    plain = block.forward
    block.forward = lambda h, *a, **k: plain(h * channel_scale, *a, **k)  # a per-channel op on the stream
    with pytest.raises(UnsupportedModelError, match="changes its block 1 outputs"):
        rotate_model(model)


# ---------------------------------------------------------------------------------------------------
# quantize, save, load, resume, CLI
# ---------------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("save_format", ["lpq", "gptq"])
def test_quantize_rotated_saves_and_loads(tokenizer, tmp_path, save_format):
    model = build("llama", tie=True)
    x = ids()
    ref = model(x).logits.detach()
    out = tmp_path / "q"
    api.quantize(model, out, tokenizer=tokenizer, method="rtn", bits=8, group_size=32, rotate=True,
                 save_format=save_format)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    if save_format == "lpq":
        assert config["quantization_config"]["rotation"] == {"kind": "hadamard", "seed": 0}
    loaded = lpq.load(out, device="cpu")
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    assert rel(loaded(x).logits, ref) < 0.03  # 8-bit codes and 16-bit embeddings, nothing else


def test_unrotated_config_has_no_rotation(tokenizer, tmp_path):
    api.quantize(build("llama"), tmp_path / "q", tokenizer=tokenizer, method="rtn", bits=8, group_size=32)
    assert "rotation" not in json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]


def test_gptq_and_mixed_with_rotation(tokenizer, tmp_path):
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    x = ids()
    res = api.quantize(build("qwen2", tie=True), tmp_path / "g", tokenizer=tokenizer, method="gptq", bits=3,
                       group_size=32, act_order=True, method_options={"mse": True}, calib=calib, rotate=True)
    assert res.seconds["rotate"] > 0
    assert torch.isfinite(lpq.load(tmp_path / "g", device="cpu")(x).logits).all()
    res = api.quantize(build("llama", tie=True), tmp_path / "m", tokenizer=tokenizer, method="rtn", bits=3.8,
                       group_size=32, mixed="hessian", sensitivity="gptq", candidates="3:32,4:32", calib=calib,
                       sensitivity_samples=2, rotate=True)
    assert res.plan is not None
    qconfig = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qconfig["rotation"]["kind"] == "hadamard" and "mixed" in qconfig
    assert torch.isfinite(lpq.load(tmp_path / "m", device="cpu")(x).logits).all()


def test_resume_checks_the_rotation(tokenizer, tmp_path, monkeypatch):
    from conftest import assert_same_saved_model
    from lpq.methods.rtn import RTN

    kwargs = dict(tokenizer=tokenizer, method="rtn", bits=4, group_size=32, device="cpu")
    real, calls = RTN.quantize_layer, []

    def stop_in_block_1(self, *a, **k):  # 7 linears per block: the 8th call is block 1's first
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(RTN, "quantize_layer", stop_in_block_1)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        api.quantize(build("llama", tie=True), out, rotate=True, **kwargs)
    monkeypatch.setattr(RTN, "quantize_layer", real)
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama", tie=True), out, resume=True, **kwargs)
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama", tie=True), out, resume=True, rotate=True, rotate_seed=1, **kwargs)
    api.quantize(build("llama", tie=True), out, resume=True, rotate=True, **kwargs)
    api.quantize(build("llama", tie=True), tmp_path / "fresh", rotate=True, **kwargs)
    assert_same_saved_model(out, tmp_path / "fresh")




def test_cli_rotate(llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "-q", "quantize", str(llama_dir), "--bits", "4", "--group-size", "32", "--rotate",
                           "--out", str(out), "--save-recipe", str(tmp_path / "r.yaml"))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rotation"]["kind"] == "hadamard"
    assert "rotate: true" in (tmp_path / "r.yaml").read_text()
    code, _, err = run_cli(capsys, "-q", "quantize", "--recipe", str(tmp_path / "r.yaml"), str(llama_dir),
                           "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert "rotation" in json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]


def test_cli_rotate_refuses_gpt2(tokenizer, tmp_path, capsys):
    src = save_model(make_model("gpt2"), tokenizer, tmp_path / "gpt2")
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "quantize", str(src), "--rotate", "--group-size", "32", "--out", str(out))
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == ("error: --rotate supports pre-RMSNorm decoders (Llama, Mistral, Qwen2, Gemma); "
                        "GPT2LMHeadModel uses LayerNorm: quantize it without --rotate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # no output, no partial work directory


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rotation_on_the_gpu_keeps_the_model_on_the_cpu():
    model = build("gemma", tie=True).half()
    x = ids(1, 16)
    ref = model.float()(x).logits
    model.half()
    record = rotate_model(model, device="cuda")
    assert record["work_dtype"] == "float32" and record["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    got = model.float()(x).logits
    assert rel(got, ref) < 1e-2
