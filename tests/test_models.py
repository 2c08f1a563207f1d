"""End to end on tiny models of several families: quantize -> save -> load -> logits."""

import copy

import pytest
import torch

import lpq.api as api
from lpq.models.arch import find_blocks, find_linears, is_conv1d, linear_weight, set_linear_weight
from lpq.nn import QuantizedLinear
from lpq.quant import fake_quantize

from conftest import FAMILIES, make_model

BLOCK_PATHS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gemma": "model.layers",
               "opt": "model.decoder.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def fake_quantized_copy(model, bits, group_size, sym=False):
    """The model with its block linears fake-quantized and every other tensor rounded to fp16, as saved."""
    ref = copy.deepcopy(model)
    _, blocks = find_blocks(ref)
    quantized = set()
    for block in blocks:
        for _, m in find_linears(block).items():
            set_linear_weight(m, fake_quantize(linear_weight(m).detach().float(), bits, group_size, sym))
            quantized.add(id(m.weight))
    with torch.no_grad():
        for p in ref.parameters():
            if id(p) not in quantized:
                p.copy_(p.half().float())
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_linears_are_found(family):
    model = make_model(family)
    path, blocks = find_blocks(model)
    assert path == BLOCK_PATHS[family]
    assert len(blocks) == 2
    linears = find_linears(blocks[0])
    assert len(linears) >= 4
    assert not any("lm_head" in n or "embed" in n for n in linears)
    if family == "gpt2":
        assert all(is_conv1d(m) for m in linears.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_load_matches_fake_quantized(family, tokenizer, tmp_path):
    model = make_model(family)
    ref = fake_quantized_copy(model, 4, 32)
    out = tmp_path / "q"
    result = api.quantize(model, out, tokenizer=tokenizer, method="rtn", bits=4, group_size=32, device="cpu")
    assert result.layers == 2 * len(find_linears(find_blocks(ref)[1][0]))
    loaded = api.load(out, device="cpu")
    qlayers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(qlayers) == result.layers
    x = torch.randint(3, 100, (2, 24))
    with torch.no_grad():
        expected = ref(x).logits
        got = loaded(x).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # and the unquantized parts are untouched: the embedding equals the original (stored in 16 bits)
    emb = loaded.get_input_embeddings().weight
    assert torch.allclose(emb, model.get_input_embeddings().weight.half().float())
    gen = loaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_ignore_patterns_and_overrides(tokenizer, tmp_path):
    model = make_model("llama")
    out = tmp_path / "q"
    api.quantize(model, out, tokenizer=tokenizer, bits=4, group_size=32, device="cpu",
                 ignore=["*.mlp.down_proj"], overrides={"model.layers.1.*": {"bits": 8}})
    loaded = api.load(out, device="cpu")
    layer0 = loaded.model.layers[0]
    assert isinstance(layer0.mlp.down_proj, torch.nn.Linear) and not isinstance(layer0.mlp.down_proj, QuantizedLinear)
    assert layer0.self_attn.q_proj.spec.bits == 4
    assert loaded.model.layers[1].self_attn.q_proj.spec.bits == 8
    assert not isinstance(loaded.lm_head, QuantizedLinear)


def test_tied_embeddings_stay_tied(tokenizer, tmp_path):
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    api.quantize(model, tmp_path / "q", tokenizer=tokenizer, bits=4, group_size=32, device="cpu")
    loaded = api.load(tmp_path / "q", device="cpu")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_transformers_from_pretrained_loads_lpq_directories(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    import lpq  # noqa: F401  (registers the 'lpq' quant_method with transformers)

    api.quantize(make_model("llama"), tmp_path / "q", tokenizer=tokenizer, bits=3, group_size=32, device="cpu")
    ours = api.load(tmp_path / "q", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(theirs.model.layers[0].mlp.up_proj, QuantizedLinear)
    x = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)


def test_bad_override_is_a_spec_error(tokenizer):
    from lpq.errors import SpecError

    with pytest.raises(SpecError, match="unknown key"):
        api.quantize(make_model("llama"), None, tokenizer=tokenizer, device="cpu", overrides={"*": {"bitz": 3}})
    with pytest.raises(SpecError, match="--bits 7"):
        api.quantize(make_model("llama"), None, tokenizer=tokenizer, device="cpu", overrides={"*": {"bits": 7}})
