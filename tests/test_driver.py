"""The block-by-block driver: calibration capture, observers, stages, resume, calibration sources."""

import pytest
import torch

import lpq.api as api
from lpq.calibration import calibration_tokens, random_windows
from lpq.errors import CalibrationError, LpqError
from lpq.methods import Method, Observer, register_method
from lpq.methods.rtn import rtn_quantize

from conftest import make_model


class ShapeObserver(Observer):
    def __init__(self):
        self.rows = 0
        self.width = None

    def update(self, inputs):
        self.width = inputs.shape[-1]
        self.rows += inputs.reshape(-1, inputs.shape[-1]).shape[0]


@register_method
class Probe(Method):
    """RTN that insists on seeing calibration inputs, and records what the driver did."""

    name = "probe-test"
    needs_calibration = True
    sequential = True
    calls: list = []
    stop_at_block: int | None = None

    def make_observer(self, name, in_features, spec, device):
        return ShapeObserver()

    def quantize_block(self, ctx):
        if Probe.stop_at_block is not None and ctx.index == Probe.stop_at_block:
            raise KeyboardInterrupt
        Probe.calls.append((ctx.index, ctx.stages()))
        super().quantize_block(ctx)

    def quantize_layer(self, name, weight, observer, spec):
        assert observer.width == weight.shape[1]
        assert observer.rows == 4 * 16  # every calibration token of every window
        return rtn_quantize(weight, spec)


def test_observers_see_every_calibration_token_and_stages_follow_execution(tokenizer, text_file, tmp_path):
    Probe.calls, Probe.stop_at_block = [], None
    model = make_model("llama")
    api.quantize(model, None, tokenizer=tokenizer, method="probe-test", bits=4, group_size=32, device="cpu",
                 calib=str(text_file), nsamples=4, seqlen=16, calib_batch_size=2)
    assert [c[0] for c in Probe.calls] == [0, 1]
    assert Probe.calls[0][1] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                                 ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_gpt2_stages(tokenizer, text_file):
    Probe.calls, Probe.stop_at_block = [], None
    api.quantize(make_model("gpt2"), None, tokenizer=tokenizer, method="probe-test", bits=4, group_size=32,
                 device="cpu", calib=str(text_file), nsamples=4, seqlen=16)
    assert Probe.calls[0][1] == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


def test_interrupted_run_resumes_from_the_last_finished_block(tokenizer, text_file, tmp_path):
    out = tmp_path / "q"
    kwargs = dict(tokenizer=tokenizer, method="probe-test", bits=4, group_size=32, device="cpu",
                  calib=str(text_file), nsamples=4, seqlen=16)
    Probe.calls, Probe.stop_at_block = [], 1
    with pytest.raises(KeyboardInterrupt):
        api.quantize(make_model("llama"), out, **kwargs)
    assert not out.exists()  # nothing half-written
    partial = tmp_path / ".q.lpq-partial"
    assert (partial / "blocks" / "00000.safetensors").is_file()
    assert not (partial / "blocks" / "00001.safetensors").exists()
    with pytest.raises(LpqError, match="--resume"):
        api.quantize(make_model("llama"), out, **kwargs)
    Probe.calls, Probe.stop_at_block = [], None
    api.quantize(make_model("llama"), out, resume=True, **kwargs)
    assert [c[0] for c in Probe.calls] == [1]  # block 0 came from disk
    assert not partial.exists()
    resumed = api.load(out, device="cpu").state_dict()
    Probe.calls = []
    api.quantize(make_model("llama"), tmp_path / "fresh", **kwargs)
    fresh = api.load(tmp_path / "fresh", device="cpu").state_dict()
    assert resumed.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(resumed[k], fresh[k]), k


def test_resume_with_other_settings_is_refused(tokenizer, text_file, tmp_path):
    out = tmp_path / "q"
    kwargs = dict(tokenizer=tokenizer, method="probe-test", group_size=32, device="cpu", calib=str(text_file),
                  nsamples=4, seqlen=16)
    Probe.stop_at_block = 1
    with pytest.raises(KeyboardInterrupt):
        api.quantize(make_model("llama"), out, bits=4, **kwargs)
    Probe.stop_at_block = None
    with pytest.raises(LpqError, match="other settings"):
        api.quantize(make_model("llama"), out, bits=3, resume=True, **kwargs)


def test_random_windows_are_seeded_and_prepend_bos():
    tokens = torch.arange(1000)
    a = random_windows(tokens, 5, 32, seed=1, bos=None)
    b = random_windows(tokens, 5, 32, seed=1, bos=None)
    c = random_windows(tokens, 5, 32, seed=2, bos=None)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous spans of the text
    w = random_windows(tokens, 3, 32, seed=0, bos=7)
    assert w.shape == (3, 32) and torch.all(w[:, 0] == 7)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        random_windows(torch.arange(10), 1, 32, seed=0, bos=None)


def test_self_calibration_samples_from_the_model(tokenizer):
    model = make_model("llama")
    tokens = calibration_tokens("self", model, tokenizer, nsamples=3, seqlen=12, seed=0, device="cpu")
    again = calibration_tokens("self", model, tokenizer, nsamples=3, seqlen=12, seed=0, device="cpu")
    assert tokens.shape == (3, 12) and torch.equal(tokens, again)
    assert torch.all(tokens[:, 0] == tokenizer.bos_token_id)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 5  # sampled, not one repeated token


def test_self_is_the_default_calibration(tokenizer):
    Probe.calls, Probe.stop_at_block = [], None
    result = api.quantize(make_model("llama"), None, tokenizer=tokenizer, method="probe-test", bits=4, group_size=32,
                          device="cpu", nsamples=4, seqlen=16)
    assert result.model.config.quantization_config["calibration"]["source"] == "self"


def test_wikitext2_offline_gives_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="--calib FILE"):
        calibration_tokens("wikitext2", make_model("llama"), tokenizer, 2, 16, 0, "cpu")
