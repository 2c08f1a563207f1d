"""Shared fixtures: tiny models of several families built from configs, and an offline tokenizer."""

from __future__ import annotations

import contextlib
import importlib.util
import string
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.raw"
WIKI_VALID = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"

VOCAB = 128
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """Import bench/<name>.py as a module (bench/ on sys.path for its own imports, e.g. results_io)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"lpq_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_tokenizer(add_bos: bool = False):
    """A character-level fast tokenizer built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.printable))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _configs():
    from transformers import (GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig,
                              Qwen2Config)

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return {
        "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common),
        "mistral": MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common),
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common),
        "gemma": GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=16, max_position_embeddings=256, **common),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=0, **common),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common),
        "gpt_neox": GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, **common),
    }


FAMILIES = list(_configs())


def make_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[family], dtype=torch.float32)
    # give the weights some spread so that quantization has something to do
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return save_model(make_model("llama"), tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def sample_text() -> str:
    if WIKI_VALID.is_file():
        return WIKI_VALID.read_text(encoding="utf-8")[:200_000]
    return ("The quick brown fox jumps over the lazy dog. " * 4000)


@pytest.fixture(scope="session")
def qdir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama quantized with RTN w3 g32 (the fine-tuning tests' base; they only read it)."""
    import lpq

    out = tmp_path_factory.mktemp("ft") / "q3"
    lpq.quantize(make_model("llama"), out, tokenizer=tokenizer, method="rtn", bits=3, group_size=32)
    return out


@pytest.fixture(scope="session")
def train_file(tmp_path_factory, sample_text) -> Path:
    """12k characters of training text for the fine-tuning tests."""
    p = tmp_path_factory.mktemp("ftdata") / "train.txt"
    p.write_text(sample_text[:12000], encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, sample_text) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(sample_text, encoding="utf-8")
    return p


def interrupt_training_at(monkeypatch, at_step: int) -> None:
    """Make a fine-tuning run stop with KeyboardInterrupt when it reaches step ``at_step`` (as Ctrl-C
    would), through the learning-rate schedule that every step calls."""
    from lpq.finetune import train as train_mod

    real = train_mod.lr_factor

    def factor(step, steps, warmup):
        if step == at_step:
            raise KeyboardInterrupt
        return real(step, steps, warmup)

    monkeypatch.setattr(train_mod, "lr_factor", factor)


def assert_same_saved_model(a_dir, b_dir) -> None:
    """Two saved lpq directories load (on the CPU) to the same tensors, bit for bit, name by name."""
    import lpq

    a, b = lpq.load(a_dir, device="cpu").state_dict(), lpq.load(b_dir, device="cpu").state_dict()
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def run_cli(capsys, *argv):
    """Run the lpq CLI in-process; return (exit code, stdout, stderr). ``-q`` sets a process-wide quiet
    flag (lpq.progress); it is restored afterwards so that no later test runs quiet by accident."""
    from lpq import progress
    from lpq.cli.main import main

    quiet = progress._quiet
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        progress.set_quiet(quiet)
    out, err = capsys.readouterr()
    return code, out, err


def compile_recording_graphs(fn):
    """torch.compile(fn, fullgraph=True) with a backend that records each graph dynamo hands it (and runs it as
    traced) -> (compiled, graphs): len(graphs) > 1 after a call means a recompilation."""
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def decode_bench():
    """bench/decode.py as a module: its Decoder (a static cache, eager / compiled / graphed steps) drives the model
    tests of the decode kernels."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import decode

    return decode


def tiny_cuda_llama(kv_heads: int = 4):
    """A float16 Llama on the GPU with head size 64 (hidden 256, 4 heads, 2 blocks, vocabulary 300)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=kv_heads,
                      num_hidden_layers=2, vocab_size=300, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).cuda().eval()


def forced_step_logits(dec, tokens: list[int]) -> torch.Tensor:
    """Logits [steps, vocab] of each decode step of ``dec`` (a bench/decode.py Decoder) after its prefill, with the
    fed tokens fixed, so that no greedy path forks at a near tie."""
    dec.prefill()
    out = []
    for t in tokens:
        dec.ids.fill_(t)
        out.append(dec._forward(dec.ids, dec.pos, last_only=False)[:, -1].float().clone())
        dec.pos.add_(1)
    return torch.stack(out)


def decode_inputs() -> tuple[torch.Tensor, list[int]]:
    """A 12-token prompt on the GPU and 8 tokens to feed the decode steps (fixed seeds)."""
    prompt = torch.randint(0, 300, (1, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    return prompt, torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(6)).tolist()


def assert_step_compiles_whole_and_replays(decode, model, prompt) -> None:
    """The model's decode step compiles as one graph (no break in lpq's code), and replayed from a CUDA graph gives
    the same greedy tokens as the step called from Python."""
    decode.allow_recompiles()
    before = decode.compiled_graphs()
    dec = decode.Decoder(model, prompt, 12, "compile")
    dec.capture()
    called, replayed = decode.check_replay(dec)
    assert called == replayed
    assert decode.compiled_graphs() - before == 1


def assert_pdl_chain_matches_plain(layers, m: int, k: int, gen, pdl_call, plain_call) -> None:
    """A kernel launched with programmatic dependent launch starts while the previous kernel finishes and must wait
    for it before reading its input. Chains the layers (each reads the output of the one before, directly or through
    a torch kernel between two of them), captures the PDL chain (pdl_call(layer, h)) in a CUDA graph, replays it on
    five new inputs and checks each result equals the chain launched plainly (plain_call), bit for bit: a kernel that
    read its input too early would see the previous replay's values."""
    def chain(x, call):
        h = x
        for i, layer in enumerate(layers):
            h = call(layer, h)
            if i % 2:
                h = h * 0.25  # a torch kernel between two lpq kernels
        return h

    x_static = torch.randn((m, k), generator=gen).to(torch.float16).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x_static, pdl_call)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x_static, pdl_call)
    for _ in range(5):
        xi = torch.randn((m, k), generator=gen).to(torch.float16).cuda()
        x_static.copy_(xi)
        graph.replay()
        want = chain(xi, plain_call)
        torch.cuda.synchronize()
        assert torch.isfinite(want).all()
        assert torch.equal(out, want)


@contextlib.contextmanager
def counted_calls(owner, name: str):
    """Inside the block each call of ``owner.name`` goes through as before and is counted: yields the list that
    grows by one per call; the attribute is restored on the way out."""
    calls: list[int] = []
    real = getattr(owner, name)
    setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        yield calls
    finally:
        setattr(owner, name, real)

