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


def _extra_configs():
    """Families only the head rotation's tests use: Qwen3 (explicit head_dim 32 != 64 / 4 heads, q/k norms)
    and Phi-3 (fused qkv_proj and gate_up_proj)."""
    from transformers import Phi3Config, Qwen3Config

    common = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {"qwen3": Qwen3Config(head_dim=32, **common), "phi3": Phi3Config(pad_token_id=0, **common)}


def build(family: str, tie: bool | None = None, seed: int = 0, **changes):
    """A tiny model whose norm scales, biases and weights are all random (so folding and rotating them matters)."""
    from transformers import AutoModelForCausalLM

    configs = _configs()
    cfg = copy.deepcopy(configs[family] if family in configs else _extra_configs()[family])
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


# ---------------------------------------------------------------------------------------------------
# the value/output head rotation (heads=True)
# ---------------------------------------------------------------------------------------------------
# family, config changes: GQA 4 heads on 2 kv heads (llama); q/k/v biases (qwen2); explicit head_dim
# 32 != 64 / 4 with q/k norms (qwen3); head_dim 32 on a single kv head, (1 + w) norms (gemma); fused qkv (phi3)
HEAD_CASES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("gemma", {"head_dim": 32}), ("phi3", {})]


def value_rows(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The value rows [kv*hd, d] of an attention module's projections (and their bias), fused or not."""
    if hasattr(attn, "v_proj"):
        return attn.v_proj.weight, attn.v_proj.bias
    n = attn.config.num_key_value_heads * attn.head_dim  # fused: [q | k | v] rows, v last
    bias = attn.qkv_proj.bias
    return attn.qkv_proj.weight[-n:], None if bias is None else bias[-n:]


@pytest.mark.parametrize("family,changes", HEAD_CASES, ids=[f for f, _ in HEAD_CASES])
def test_head_rotation_keeps_the_logits(family, changes):
    from lpq.transforms.rotate import head_rotations

    x = ids()
    plain, model = build(family, **changes), build(family, **changes)
    ref = model(x).logits
    rotate_model(plain, seed=2)  # the residual rotation alone, to see what the heads add
    record = rotate_model(model, seed=2, heads=True)
    got = model(x).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert record["heads"] is True and record["max_check_error"] < 1e-5

    cfg = model.config
    kv, hd, heads = cfg.num_key_value_heads, record["head_dim"], cfg.num_attention_heads
    assert (record["num_heads"], record["kv_heads"]) == (heads, kv)
    assert hd == (32 if family in ("qwen3", "gemma") else 16)  # explicit head_dim != hidden / heads = 16
    r = head_rotations(hd, kv, 2)  # [kv, hd, hd]
    group = heads // kv
    for blk_plain, blk in zip(plain.model.layers, model.model.layers):
        (w0, b0), (w1, b1) = value_rows(blk_plain.self_attn), value_rows(blk.self_attn)
        assert (w1 - w0).abs().max() > 0.1 * w0.abs().max()  # the heads really were rotated
        for j in range(kv):  # value head j: R_j^T W_j, b_j <- R_j^T b_j
            rows = slice(j * hd, (j + 1) * hd)
            want = (r[j].T @ w0[rows].double()).float()
            torch.testing.assert_close(w1[rows], want, rtol=1e-5, atol=1e-6)
            if b0 is not None:
                torch.testing.assert_close(b1[rows], (r[j].T @ b0[rows].double()).float(), rtol=1e-5, atol=1e-6)
        o0, o1 = blk_plain.self_attn.o_proj.weight, blk.self_attn.o_proj.weight
        assert (o1 - o0).abs().max() > 0.1 * o0.abs().max()
        for h in range(heads):  # query head h reads kv head h // group: W_o[:, h] R_(h // group)
            cols = slice(h * hd, (h + 1) * hd)
            torch.testing.assert_close(o1[:, cols], (o0[:, cols].double() @ r[h // group]).float(), rtol=1e-5, atol=1e-6)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    # everything but the value rows and o_proj is as the residual rotation alone left it
    p_plain = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if not any(k in name for k in ("v_proj", "o_proj", "qkv_proj")):
            assert torch.equal(p, p_plain[name]), name
        elif "qkv_proj" in name:
            n_qk = (heads + kv) * hd
            assert torch.equal(p[:n_qk], p_plain[name][:n_qk]), name


def _value_side_uses_r(real):  # R W_j instead of R_j^T W_j: o_proj no longer undoes it
    return lambda lin, start, r: real(lin, start, r.transpose(1, 2))


def _wrong_gqa_grouping(real):  # query head h paired with kv head h % kv instead of h // (heads / kv)
    return lambda num_heads, kv_heads: torch.arange(num_heads) % kv_heads


@pytest.mark.parametrize("helper,mutate", [("_rotate_value_rows", _value_side_uses_r),
                                           ("_kv_head_of", _wrong_gqa_grouping)])
def test_a_wrong_head_rotation_is_caught(monkeypatch, helper, mutate):
    from lpq.transforms import rotate as rotate_mod

    monkeypatch.setattr(rotate_mod, helper, mutate(getattr(rotate_mod, helper)))
    model = build("llama")  # 4 heads on 2 kv heads: h // 2 = 0 0 1 1, h % 2 = 0 1 0 1
    with pytest.raises(UnsupportedModelError, match="changes its block 0 outputs"):
        rotate_model(model, heads=True)
    model = build("llama")
    x = ids()
    ref = model(x).logits
    rotate_model(model, heads=True, check=False)
    assert (model(x).logits - ref).abs().max() > 1e-2 * ref.abs().max()


def test_head_rotation_info_line(capsys, monkeypatch):
    from lpq import progress

    monkeypatch.setattr(progress, "_quiet", False)
    rotate_model(build("llama"), heads=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "rotated the residual stream and the value/output heads (2 blocks, hidden 64, 4 heads on 2 kv heads of 16" in err
    rotate_model(build("llama"))
    err = " ".join(capsys.readouterr().err.split())
    assert "rotated the residual stream (2 blocks" in err and "heads" not in err


def test_head_rotation_refusals():
    model = build("llama")
    model.model.layers[1].self_attn.v_norm = nn.Identity()  # no parameters: only the head rotation cares
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as err:
        rotate_model(model, heads=True)
    assert str(err.value) == ("--rotate-heads needs attention with plain per-head value and output projections; "
                              "LlamaForCausalLM has block 1.self_attn.v_norm, a norm on the values: "
                              "quantize it without --rotate-heads")
    assert_untouched(model, before)

    model = build("llama")
    model.config.head_dim = 8  # the config no longer describes the linears
    for attn in (layer.self_attn for layer in model.model.layers):
        attn.head_dim = 8
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"block 0\.self_attn\.q_proj of size 64, not the 32 that 4 heads"):
        rotate_model(model, heads=True)
    assert_untouched(model, before)

    model = build("llama")
    model.config.num_key_value_heads = 4  # attention modules still group 2 query heads per kv head
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="other head sizes than its config"):
        rotate_model(model, heads=True)
    assert_untouched(model, before)


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
    else:
        assert config["quantization_config"]["lpq_rotation"] == {"kind": "hadamard", "seed": 0}
    loaded = lpq.load(out, device="cpu")
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    assert rel(loaded(x).logits, ref) < 0.03  # 8-bit codes and 16-bit embeddings, nothing else


def test_unrotated_config_has_no_rotation(tokenizer, tmp_path):
    api.quantize(build("llama"), tmp_path / "q", tokenizer=tokenizer, method="rtn", bits=8, group_size=32)
    assert "rotation" not in json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    api.quantize(build("llama"), tmp_path / "g", tokenizer=tokenizer, method="rtn", bits=8, group_size=32,
                 save_format="gptq")
    assert "lpq_rotation" not in json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("save_format", ["lpq", "gptq"])
def test_quantize_with_rotated_heads(tokenizer, tmp_path, save_format):
    from transformers import AutoConfig, GPTQConfig

    x = ids()
    kwargs = dict(tokenizer=tokenizer, method="rtn", bits=8, group_size=32, save_format=save_format)
    api.quantize(build("qwen2", tie=True), tmp_path / "plain", **kwargs)
    res = api.quantize(build("qwen2", tie=True), tmp_path / "q", rotate=True, rotate_heads=True, **kwargs)
    assert res.seconds["rotate"] > 0
    want = {"kind": "hadamard", "seed": 0, "heads": True}
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if save_format == "lpq":
        assert qconfig["rotation"] == want
    else:
        assert qconfig["lpq_rotation"] == want and "rotation" not in qconfig
        # transformers' GPTQ config parsing takes the extra key (as an unused keyword argument)
        parsed = GPTQConfig.from_dict(qconfig)
        assert (parsed.bits, parsed.group_size) == (8, 32)
        assert AutoConfig.from_pretrained(tmp_path / "q").quantization_config["lpq_rotation"] == want
    plain = lpq.load(tmp_path / "plain", device="cpu")(x).logits
    got = lpq.load(tmp_path / "q", device="cpu")(x).logits
    assert rel(got, plain) < 0.03  # two 8-bit quantizations of the same model


def test_rotate_heads_needs_rotate(tokenizer, tmp_path):
    with pytest.raises(LpqError, match="--rotate-heads .*: add --rotate"):
        api.quantize(build("llama"), tmp_path / "q", tokenizer=tokenizer, rotate_heads=True)
    assert not any(tmp_path.iterdir())


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


def interrupt_in_block_1(monkeypatch, run) -> None:
    """Call ``run()`` with RTN interrupted (KeyboardInterrupt, as Ctrl-C) at block 1's first linear, so that
    a partial output with block 0 finished is left behind; RTN is restored afterwards."""
    from lpq.methods.rtn import RTN

    real, calls = RTN.quantize_layer, []

    def stop_in_block_1(self, *a, **k):  # 7 linears per block: the 8th call is block 1's first
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(RTN, "quantize_layer", stop_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(RTN, "quantize_layer", real)


def test_resume_checks_the_rotation(tokenizer, tmp_path, monkeypatch):
    from conftest import assert_same_saved_model

    kwargs = dict(tokenizer=tokenizer, method="rtn", bits=4, group_size=32, device="cpu")
    out = tmp_path / "q"
    interrupt_in_block_1(monkeypatch, lambda: api.quantize(build("llama", tie=True), out, rotate=True, **kwargs))
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama", tie=True), out, resume=True, **kwargs)
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama", tie=True), out, resume=True, rotate=True, rotate_seed=1, **kwargs)
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama", tie=True), out, resume=True, rotate=True, rotate_heads=True, **kwargs)
    api.quantize(build("llama", tie=True), out, resume=True, rotate=True, **kwargs)
    api.quantize(build("llama", tie=True), tmp_path / "fresh", rotate=True, **kwargs)
    assert_same_saved_model(out, tmp_path / "fresh")


def test_resume_checks_the_head_rotation(tokenizer, tmp_path, monkeypatch):
    from conftest import assert_same_saved_model

    kwargs = dict(tokenizer=tokenizer, method="rtn", bits=4, group_size=32, device="cpu", rotate=True)
    out = tmp_path / "q"
    interrupt_in_block_1(monkeypatch, lambda: api.quantize(build("llama"), out, rotate_heads=True, **kwargs))
    manifest = json.loads((tmp_path / ".q.lpq-partial" / "manifest.json").read_text())
    assert manifest["rotation"] == {"kind": "hadamard", "seed": 0, "heads": True}
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(build("llama"), out, resume=True, **kwargs)  # residual rotation only
    api.quantize(build("llama"), out, resume=True, rotate_heads=True, **kwargs)
    api.quantize(build("llama"), tmp_path / "fresh", rotate_heads=True, **kwargs)
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


def test_cli_rotate_heads(llama_dir, tmp_path, capsys):
    from lpq.recipe import load_recipe

    out, recipe = tmp_path / "q", tmp_path / "r.yaml"
    code, _, err = run_cli(capsys, "-q", "quantize", str(llama_dir), "--bits", "4", "--group-size", "32", "--rotate",
                           "--rotate-heads", "--out", str(out), "--save-recipe", str(recipe))
    assert code == 0, err
    want = {"kind": "hadamard", "seed": 0, "heads": True}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rotation"] == want
    plan = load_recipe(recipe)
    assert plan["rotate"] is True and plan["rotate_heads"] is True
    code, _, err = run_cli(capsys, "-q", "quantize", "--recipe", str(recipe), str(llama_dir), "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["rotation"] == want
    # a residual-only run writes no rotate_heads into its recipe
    code, _, err = run_cli(capsys, "-q", "quantize", str(llama_dir), "--bits", "4", "--group-size", "32", "--rotate",
                           "--out", str(tmp_path / "res"), "--save-recipe", str(tmp_path / "res.yaml"))
    assert code == 0, err
    assert "rotate_heads" not in load_recipe(tmp_path / "res.yaml")
    assert json.loads((tmp_path / "res" / "config.json").read_text())["quantization_config"]["rotation"] == {
        "kind": "hadamard", "seed": 0}


def test_cli_rotate_heads_without_rotate_is_refused(llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", str(llama_dir), "--rotate-heads", "--group-size", "32",
                           "--out", str(tmp_path / "o"))
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == "error: --rotate-heads rotates the attention heads on top of the residual rotation: add --rotate"
    assert not any(tmp_path.iterdir())


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
