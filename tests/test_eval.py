import math
import os

import pytest
import torch
import torch.nn.functional as F

import lpq.api as api
from lpq.evaluate import eval_windows, kl_divergence, perplexity
from lpq.inspect import inspect

from conftest import make_model, make_tokenizer


def test_windows_without_and_with_bos():
    text = "abcdefghij" * 10  # 100 characters = 100 tokens
    tok = make_tokenizer(add_bos=False)
    w = eval_windows(tok, text, seqlen=16)
    assert w.shape == (6, 16)  # the 4-token tail is dropped
    assert torch.equal(w.flatten(), torch.tensor(tok(text, add_special_tokens=False).input_ids[:96]))
    tok_bos = make_tokenizer(add_bos=True)
    w = eval_windows(tok_bos, text, seqlen=16)
    assert w.shape == (6, 16) and torch.all(w[:, 0] == tok_bos.bos_token_id)  # 100 // 15 windows of BOS + 15
    assert eval_windows(tok, text, seqlen=16, max_windows=2).shape == (2, 16)


def test_perplexity_equals_direct_computation(tokenizer, sample_text):
    model = make_model("llama")
    res = perplexity(model, tokenizer, sample_text[:2000], seqlen=64, max_windows=3, batch_size=2)
    windows = eval_windows(tokenizer, sample_text[:2000], 64, 3)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.windows == 3 and res.tokens == 3 * 63
    assert res.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_kl_is_zero_against_itself_and_positive_after_quantization(tokenizer, sample_text):
    model = make_model("llama")
    same = kl_divergence(model, model, tokenizer, sample_text[:3000], seqlen=64, max_windows=2)
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1_changed == 0
    q = api.quantize(make_model("llama"), None, tokenizer=tokenizer, bits=2, group_size=32, device="cpu").model
    res = kl_divergence(q, model, tokenizer, sample_text[:3000], seqlen=64, max_windows=2)
    assert res.kl > 1e-3 and res.tokens == 2 * 63


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, -1), (8, 32)])
def test_inspect_counts_every_byte(tokenizer, tmp_path, bits, group_size):
    out = tmp_path / "q"
    api.quantize(make_model("llama"), out, tokenizer=tokenizer, bits=bits, group_size=group_size, device="cpu")
    report = inspect(out)
    # expected bits per weight of the uniform format: codes + fp16 scales + packed zeros per group
    per_layer = []
    for layer in report["layers"]:
        k, n = layer["in_features"], layer["out_features"]
        g = 1 if group_size == -1 else -(-k // group_size)
        from lpq.formats.packing import chunk_shape

        per, words = chunk_shape(bits)
        nbytes = k * n * bits / 8 + g * n * 2 + g * (-(-n // per) * words) * 4
        assert layer["bytes"] == nbytes
        per_layer.append((nbytes, k * n))
    assert report["bpw"] == pytest.approx(8 * sum(b for b, _ in per_layer) / sum(w for _, w in per_layer))
    # and every tensor byte in the file is accounted for
    file_bytes = os.path.getsize(out / "model.safetensors")
    assert report["total_bytes"] <= file_bytes < report["total_bytes"] + 64 * 1024  # + the JSON header
