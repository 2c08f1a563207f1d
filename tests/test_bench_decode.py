"""bench/decode.py on a tiny Llama on the CPU: the decode loop's greedy tokens against model.generate's,
that the comparison catches a wrong position, the timing record, and the script end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lpq.errors import LpqError

from conftest import load_bench_script


decode = load_bench_script("decode")
STEPS = 12


@pytest.fixture(scope="module")
def fp16_model():
    return decode.build_model(decode.make_config(tiny=True), "cpu", torch.float32, seed=0)


@pytest.fixture(scope="module")
def w4_model(fp16_model):
    model, seconds = decode.quantize_copy(fp16_model, decode.Format("w4g128", 4, 128), "cpu")
    assert seconds > 0
    return model


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("which", ["fp16", "w4g128"])
def test_decode_loop_matches_generate(which, fp16_model, w4_model, prompt):
    from lpq.nn import QuantizedLinear

    model = fp16_model if which == "fp16" else w4_model
    assert any(isinstance(m, QuantizedLinear) for m in model.modules()) == (which != "fp16")
    dec = decode.Decoder(model, prompt, STEPS, "eager")
    got = decode.check_against_generate(dec, STEPS)  # raises if they differ
    assert got == decode.generate_tokens(model, prompt, STEPS) and len(got) == STEPS + 1
    assert len(set(got)) > 3  # a model that repeats one token would check nothing
    # a second prefill resets the cache: the same tokens again
    dec.prefill()
    dec.run(STEPS)
    assert dec.tokens(STEPS) == got


def test_quantized_copy_leaves_the_original(fp16_model, w4_model):
    """quantize_copy works on a copy: the model it started from equals a fresh build with the same seed."""
    from torch import nn

    assert w4_model is not fp16_model
    assert isinstance(fp16_model.model.layers[0].mlp.down_proj, nn.Linear)
    fresh = decode.build_model(decode.make_config(tiny=True), "cpu", torch.float32, seed=0).state_dict()
    kept = fp16_model.state_dict()
    assert fresh.keys() == kept.keys() and all(torch.equal(fresh[k], kept[k]) for k in fresh)


class ShiftedPositions(decode.Decoder):
    """Feeds each decode step the position one past its true one (the prefill is right)."""

    def _step_eager(self):
        logits = self._forward(self.ids, self.pos + 1, last_only=False)
        nxt = logits[:, -1].argmax(-1)
        self.pos.add_(1)
        self.ids.copy_(nxt.view(1, 1))
        self.seq.index_copy_(0, self.pos.view(1), nxt)


class StuckPosition(decode.Decoder):
    """Never advances the position."""

    def _step_eager(self):
        logits = self._forward(self.ids, self.pos, last_only=False)
        nxt = logits[:, -1].argmax(-1)
        self.ids.copy_(nxt.view(1, 1))
        self.seq.index_copy_(0, self.pos.view(1) + 1, nxt)


@pytest.mark.parametrize("broken", [ShiftedPositions, StuckPosition])
def test_check_catches_wrong_positions(broken, fp16_model, prompt):
    dec = broken(fp16_model, prompt, STEPS, "eager")
    with pytest.raises(AssertionError, match="differ from model.generate"):
        decode.check_against_generate(dec, STEPS)


def test_measure_record(fp16_model, w4_model, prompt):
    fp = decode.measure(fp16_model, decode.Format("fp16"), prompt, steps=6, repeats=2, mode="eager")
    q = decode.measure(w4_model, decode.Format("w4g128", 4, 128), prompt, steps=6, repeats=2, mode="eager")
    for rec in (fp, q):
        for key in ("format", "bits", "group_size", "mode", "batch", "prompt_len", "new_tokens", "repeats",
                    "ms_per_token", "tokens_per_s", "tokens_per_s_repeats", "weights_gb", "kernel_state_gb",
                    "kernel", "check", "generate_agree"):
            assert key in rec, key
        assert rec["check"] == "== generate, 8 steps" and rec["generate_agree"] == "9/9"
        assert len(rec["tokens_per_s_repeats"]) == 2 and rec["new_tokens"] == 6 and rec["prompt_len"] == 20
        assert rec["ms_per_token"] > 0
        assert rec["tokens_per_s"] == pytest.approx(1000.0 / rec["ms_per_token"])
        assert min(rec["tokens_per_s_repeats"]) <= rec["tokens_per_s"] <= max(rec["tokens_per_s_repeats"])
    assert (fp["bits"], fp["group_size"], q["bits"], q["group_size"]) == (16, None, 4, 128)
    assert q["kernel"].startswith("reference")
    # packed 4-bit linears take fewer bytes than the float32 ones they replace
    assert q["weights_gb"] < fp["weights_gb"]
    assert fp["weights_gb"] * 1e9 == sum(p.numel() * p.element_size() for p in fp16_model.parameters()) + \
        sum(b.numel() * b.element_size() for b in fp16_model.buffers())


def test_parse_formats():
    fmts = decode.parse_formats("w3g128,fp16,w2g64")
    assert [f.name for f in fmts] == ["fp16", "w3g128", "w2g64"]
    assert (fmts[1].bits, fmts[1].group_size, fmts[2].bits, fmts[2].group_size) == (3, 128, 2, 64)
    for bad in ("w4", "int4", "", "fp16,fp16", "s5", "s3s", "p16"):
        with pytest.raises(LpqError):
            decode.parse_formats(bad)
    fmts = decode.parse_formats("s3sp,p161,s4")
    assert [(f.name, f.method, f.bits, f.sparse) for f in fmts] == [
        ("s3sp", "squeezellm", 3, decode.SQUEEZELLM_SPARSE), ("p161", "ptq161", 4, 0.0), ("s4", "squeezellm", 4, 0.0)]


def test_script_squeezellm_and_ptq161_formats(capsys):
    """sXsp and p161 models: made in the formats asked for (their layers' specs say so, the sparse part present),
    decoding generate's tokens on the CPU; the section says how they were made."""
    master = decode.build_model(decode.make_config(tiny=True), "cpu", torch.float32)
    for name, fmt, key in (("s3sp", "squeezellm", "sp_val"), ("p161", "ptq161", "mask")):
        model, _ = decode.quantize_copy(master, decode.parse_formats(name)[0], "cpu")
        layers = [m for m in model.modules() if type(m).__name__ == "QuantizedLinear"]
        assert len(layers) == 14 and all(m.spec.format == fmt and key in m.tensors() for m in layers)
    rc = decode.main(["--tiny", "--device", "cpu", "--formats", "fp16,s3sp,p161", "--prompt-len", "12",
                      "--new-tokens", "4", "--repeats", "1", "--no-write"])
    out = capsys.readouterr().out
    assert rc == 0, out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["format"] for r in recs] == ["fp16", "s3sp", "p161"]
    assert all(r["check"].startswith("== generate") for r in recs)
    assert "sXsp the same with 0.45 %" in out and "p161: ptq161 in closed form" in out
    # joined siblings: squeezellm takes them, ptq161 is refused with one line
    assert decode.main(["--tiny", "--device", "cpu", "--formats", "s3sp", "--prompt-len", "12", "--new-tokens", "4",
                        "--repeats", "1", "--no-write", "--epilogues"]) == 0
    capsys.readouterr()
    assert decode.main(["--tiny", "--device", "cpu", "--formats", "p161", "--no-write", "--fuse"]) == 2
    assert "p161 layers cannot join" in capsys.readouterr().err


def test_script_end_to_end(capsys):
    rc = decode.main(["--tiny", "--device", "cpu", "--formats", "fp16,w3g128", "--prompt-len", "12",
                      "--new-tokens", "4", "--repeats", "1", "--no-write"])
    assert rc == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["format"] for r in recs] == ["fp16", "w3g128"]
    assert recs[0]["speedup_vs_fp16"] == 1.0
    assert recs[1]["speedup_vs_fp16"] == pytest.approx(recs[1]["tokens_per_s"] / recs[0]["tokens_per_s"])
    assert "| format | weights GB |" in out and "| w3g128 |" in out


def test_script_fused(capsys):
    """--fuse: fp16 and the packed format both run with joined q/k/v and gate/up, and still decode exactly
    generate's tokens (the check of a CPU run is enforced)."""
    rc = decode.main(["--tiny", "--device", "cpu", "--formats", "fp16,w4g128", "--prompt-len", "12",
                      "--new-tokens", "4", "--repeats", "1", "--no-write", "--fuse"])
    assert rc == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["format"], r["fused"]) for r in recs] == [("fp16", True), ("w4g128", True)]
    assert all(r["check"].startswith("== generate") for r in recs)
    assert "--fuse: in every format" in out


def test_script_epilogues(capsys):
    """--epilogues: every format runs fuse_for_decode (norms and silu(gate) * up folded into the linears) and still
    decodes generate's tokens; the section says so (whether the fused model equals the unfused one:
    tests/test_epilogue.py)."""
    rc = decode.main(["--tiny", "--device", "cpu", "--formats", "fp16,w4g128", "--prompt-len", "12",
                      "--new-tokens", "4", "--repeats", "1", "--no-write", "--epilogues"])
    assert rc == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["format"], r["fused"], r["epilogues"], r["attention_fusion"]) for r in recs] == [
        ("fp16", True, True, True), ("w4g128", True, True, True)]
    assert all(r["check"].startswith("== generate") for r in recs)
    assert "--epilogues: in every format" in out and "--fuse: in every format" not in out


def test_script_refuses_bad_input(capsys):
    assert decode.main(["--tiny", "--device", "cpu", "--mode", "graph", "--no-write"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert decode.main(["--tiny", "--device", "cpu", "--formats", "q4", "--no-write"]) == 2
    assert "not a format" in capsys.readouterr().err
    assert decode.main(["--tiny", "--device", "cpu", "--attn", "sdpa:fast", "--no-write"]) == 2
    assert "not an SDPA backend" in capsys.readouterr().err
    assert decode.main(["--tiny", "--device", "cpu", "--attn", "eager:math", "--no-write"]) == 2
    assert "only sdpa takes a backend" in capsys.readouterr().err


def test_attention_switches_and_restores(fp16_model, prompt):
    """--attn: the model runs with the named implementation (lpq: lpq.attention, SDPA on the CPU, the same
    tokens), SDPA backend switches are on only inside the block and restored after it."""
    assert decode.parse_attention("sdpa") == ("sdpa", None)
    assert decode.parse_attention("sdpa:math") == ("sdpa", "math")
    assert decode.parse_attention("lpq") == ("lpq", None)
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with decode.attention(fp16_model, "sdpa:math"):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert fp16_model.config._attn_implementation == "sdpa"
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    dec = decode.Decoder(fp16_model, prompt, STEPS, "eager")
    want = decode.check_against_generate(dec, STEPS)
    try:
        with decode.attention(fp16_model, "lpq"):
            assert fp16_model.config._attn_implementation == "lpq"
            assert decode.check_against_generate(decode.Decoder(fp16_model, prompt, STEPS, "eager"), STEPS) == want
    finally:
        fp16_model.set_attn_implementation("sdpa")


def test_profile_kernel_kinds():
    """bench/profile_decode.py sorts kernels by kind from their names; inductor's kernels named after lpq's op
    they were fused around are still Triton kernels."""
    profile = load_bench_script("profile_decode")
    assert profile.kernel_kind("void lpq::uniform_gemm_kc_kernel<4, __half, 128, 1, 2, 2, 1>(lpq::GemmArgs)") == "lpq"
    assert profile.kernel_kind("triton_poi_fused_mul_silu_slice_uniform_gemm_view_6") == "triton"
    assert profile.kernel_kind("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == "attention"
    assert profile.kernel_kind("void lpq::attn::decode_attention_kernel<__half, 128>(lpq::attn::DecodeArgs)") == "attention"
    assert profile.kernel_kind("nvjet_sm90_hsh_256x8_64x6_4x1_v_bz_TNT") == "cuBLAS"
    assert profile.kernel_kind("void at::native::elementwise_kernel<128, 4>") == "other"


def test_script_quantized_head(capsys):
    """--head quantized: the quantized formats' lm_head is packed too (fewer weight bytes), fp16 keeps its own, and
    the decode still gives generate's tokens."""
    common = ["--tiny", "--device", "cpu", "--formats", "fp16,w4g128", "--prompt-len", "12", "--new-tokens", "4",
              "--repeats", "1", "--no-write"]
    runs = {}
    for head in ("fp16", "quantized"):
        assert decode.main(common + ["--head", head]) == 0
        out = capsys.readouterr().out
        runs[head] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["format"], r["head"]) for r in runs["quantized"]] == [("fp16", "fp16"), ("w4g128", "quantized")]
    assert all(r["check"].startswith("== generate") for r in runs["quantized"])
    assert runs["quantized"][0]["weights_gb"] == runs["fp16"][0]["weights_gb"]
    assert runs["quantized"][1]["weights_gb"] < runs["fp16"][1]["weights_gb"]


def test_script_block_fusion(capsys):
    """--block-fusion on wraps every block (lpq.fuse.DecodeBlock; on the CPU its calls take the blocks' own forward)
    and records it; without --epilogues it is refused with one line."""
    common = ["--tiny", "--device", "cpu", "--formats", "fp16,w4g128", "--prompt-len", "12", "--new-tokens", "4",
              "--repeats", "1", "--no-write", "--attn", "lpq"]
    assert decode.main(common + ["--epilogues", "--block-fusion", "on"]) == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["block_fusion"] for r in recs] == [True, True]
    assert all(r["check"].startswith("== generate") for r in recs)
    assert decode.main(common + ["--block-fusion", "on"]) == 2
    assert "--block-fusion on needs --epilogues" in capsys.readouterr().err


decode_ab = load_bench_script("decode_ab")


def test_ab_script_on_the_cpu(capsys):
    """bench/decode_ab.py: both arms checked and timed in alternation, one record per format with a ratio per pair."""
    rc = decode_ab.main(["--tiny", "--device", "cpu", "--mode", "eager", "--formats", "fp16,w4g128", "--attn", "sdpa",
                         "--setting", "LPQ_PDL_EARLY=4", "--repeats", "3", "--new-tokens", "4", "--prompt-len", "10",
                         "--no-write"])
    out = capsys.readouterr().out
    assert rc == 0, out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["format"] for r in records] == ["fp16", "w4g128"]
    for r in records:
        assert r["check"] == "A == B, 8 steps" and r["pairs"] == 3
        assert len(r["a_ms_repeats"]) == len(r["b_ms_repeats"]) == 3
        assert r["b_over_a_min"] <= r["b_over_a"] <= r["b_over_a_max"]
        assert r["setting"] == "LPQ_PDL_EARLY=4"
    assert "| w4g128 |" in out and "B: LPQ_PDL_EARLY=4" in out


def test_ab_setting_is_applied_and_restored():
    """Inside launch_setting the uniform kernels' module settings are those of the variable; outside, as before."""
    from lpq.kernels import uniform_cuda

    before = (uniform_cuda.PDL, uniform_cuda.PDL_RULES, uniform_cuda.PDL_EARLY)
    with decode_ab.launch_setting("LPQ_PDL_EARLY", "3,4"):
        assert uniform_cuda.PDL_EARLY == {"w3", "w4"}
    with decode_ab.launch_setting("LPQ_PDL_EARLY", "s3,p161"):
        assert uniform_cuda.PDL_EARLY == {"s3", "p161"}
    with decode_ab.launch_setting("LPQ_PDL", "0"):
        assert uniform_cuda.PDL is False and uniform_cuda.PDL_RULES == {}
    tall = {"bits": 3, "n": 11008, "k": 4096}
    with decode_ab.launch_setting("LPQ_TALL_WARPS", "8"):
        assert uniform_cuda.default_warps(tall, 1, 5) == 8
    assert uniform_cuda.default_warps(tall, 1, 5) == uniform_cuda.TALL_LOW_BIT_WARPS
    assert (uniform_cuda.PDL, uniform_cuda.PDL_RULES, uniform_cuda.PDL_EARLY) == before
    from lpq.kernels import ptq161_cuda

    env = os.environ.get("LPQ_PTQ161_VARIANT")
    with decode_ab.launch_setting("LPQ_PTQ161_VARIANT", "ring4w8"):
        assert ptq161_cuda._variant_from_env() == "ring4w8"
    assert os.environ.get("LPQ_PTQ161_VARIANT") == env


@pytest.mark.parametrize("setting", ["LPQ_FOO=1", "LPQ_PDL", "LPQ_PDL=2", "LPQ_PDL_EARLY=8", "LPQ_PDL_EARLY=",
                                     "LPQ_PDL_EARLY=s5", "LPQ_TALL_WARPS=6",
                                     "LPQ_PTQ161_VARIANT=fastest"])
def test_ab_script_refuses_bad_settings(setting, capsys):
    assert decode_ab.main(["--tiny", "--device", "cpu", "--mode", "eager", "--setting", setting, "--no-write"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --setting") and "Traceback" not in err
