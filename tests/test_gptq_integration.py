"""GPTQ through the driver and the saved formats: lpq's own directory and GPTQ v1 checkpoints."""

import json

import pytest
import torch

import lpq.api as api
from lpq.cli.main import main
from lpq.errors import SpecError
from lpq.methods import get_method
from lpq.nn import QuantizedLinear

from conftest import make_model


def _quantize(tmp_path, tokenizer, text_file, name, **kw):
    out = tmp_path / name
    api.quantize(make_model("llama"), out, tokenizer=tokenizer, method="gptq", group_size=32, device="cpu",
                 calib=str(text_file), nsamples=8, seqlen=32, **kw)
    return out


@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True), (2, False)])
def test_gptq_export_loads_back_identically(tmp_path, tokenizer, text_file, bits, act_order):
    lpq_dir = _quantize(tmp_path, tokenizer, text_file, "lpq", bits=bits, act_order=act_order)
    gptq_dir = _quantize(tmp_path, tokenizer, text_file, "gptq", bits=bits, act_order=act_order, save_format="gptq")
    qc = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["desc_act"] == act_order
    assert qc["checkpoint_format"] == "gptq" and qc["group_size"] == 32
    a, b = api.load(lpq_dir, device="cpu"), api.load(gptq_dir, device="cpu")
    assert isinstance(b.model.layers[0].self_attn.q_proj, QuantizedLinear)
    x = torch.randint(3, 100, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_gptq_export_records_overrides_and_skipped_layers(tmp_path, tokenizer, text_file):
    out = tmp_path / "g"
    api.quantize(make_model("llama"), out, tokenizer=tokenizer, method="gptq", bits=4, group_size=32, device="cpu",
                 calib=str(text_file), nsamples=4, seqlen=32, save_format="gptq", ignore=["*.o_proj"],
                 overrides={"model.layers.1.mlp.*": {"bits": 8}})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"]["+:^model\\.layers\\.1\\.mlp\\.up_proj$"]["bits"] == 8
    assert "-:^model\\.layers\\.0\\.self_attn\\.o_proj$" in qc["dynamic"]
    loaded = api.load(out, device="cpu")
    assert loaded.model.layers[1].mlp.up_proj.spec.bits == 8
    assert not isinstance(loaded.model.layers[0].self_attn.o_proj, QuantizedLinear)


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_is_closer_to_the_original_than_rtn(tokenizer, text_file, sample_text, bits):
    """KL to the unquantized model on held-out text: GPTQ's is several times below RTN's."""
    from lpq.evaluate import kl_divergence

    kl = {}
    for method in ("rtn", "gptq"):
        m = api.quantize(make_model("llama"), None, tokenizer=tokenizer, method=method, bits=bits, group_size=32,
                         device="cpu", calib=str(text_file), nsamples=16, seqlen=64).model
        kl[method] = kl_divergence(m, make_model("llama"), tokenizer, sample_text[150000:170000], seqlen=64,
                                   max_windows=10).kl
    assert kl["gptq"] < 0.5 * kl["rtn"], kl


def test_method_options_are_checked():
    with pytest.raises(SpecError, match="does not take"):
        get_method("rtn", damp=0.1)
    assert get_method("gptq", damp=0.1, static_groups=True).static_groups


def test_cli_gptq_format(capsys, llama_dir, tmp_path, text_file):
    try:
        main(["-q", "quantize", str(llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
              str(text_file), "--nsamples", "4", "--seqlen", "32", "--format", "gptq", "--out", str(tmp_path / "g"),
              "--act-order", "--damp", "0.05"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["damp_percent"] == 0.05
    try:
        main(["-q", "eval", "perplexity", str(tmp_path / "g"), "--text", str(text_file), "--seqlen", "32",
              "--windows", "2", "--json"])
    except SystemExit as e:
        assert not e.code
    assert json.loads(capsys.readouterr().out)["windows"] == 2
