"""End-to-end decode speed at batch 1: lpq's kernels against the fp16 model, both through transformers.

    python bench/decode.py [--formats fp16,w4g128,w3g128,w2g64] [--mode graph|compile|eager]
    python bench/decode.py --tiny --device cpu --mode eager --no-write      # a small CPU smoke run

--tiny: 2 blocks, hidden 256, MLP 512, 4 heads, vocabulary 1000, prompt 32, 32 decode steps by default.

A LLaMA-7B-shaped model (32 blocks, hidden 4096, MLP 11008, 32 heads, vocabulary 32000) is built from
its config with random weights (seeded), directly on the GPU. Each lpq format ``wXgY`` is RTN of those
same weights (X bits, groups of Y, asymmetric, the ``lpq`` uniform format) over the decoder linears;
``sX`` / ``sXsp`` are squeezellm (X-bit per-row codebooks by unweighted k-means; sp: 0.45 % of the weights
kept exactly) and ``p161`` ptq161 in closed form (no block-wise training): speed needs the formats' shapes
and sparse counts, not their quality. Embeddings, norms and lm_head stay fp16. Quantization runs on a CPU copy whose blocks stream through
the GPU (lpq.quantize), then the packed model moves to the GPU.

Every format decodes the same way: a transformers ``StaticCache`` of prompt + new tokens, one prefill
forward on a fixed random prompt, then greedy decode one token per step with explicit positions. One
step = forward of the token in a static [1, 1] buffer + argmax + in-place updates of the token,
position and output buffers, so that the step has no Python-side state and can be replayed:

    eager    the step is called from Python per token (the default on the CPU)
    graph    the step is captured once in a CUDA graph, each token is one replay (the default on CUDA)
    compile  the step is torch.compile'd (inductor, no cudagraphs of its own), then captured as in
             graph (on the CPU: called from Python). lpq's CUDA ops trace as opaque ops with fake
             implementations, so a step is one dynamo graph; the section reports how many graphs each
             format compiled (more than one: a graph break).

Only the decode loop is timed (CUDA events on the GPU), median over --repeats, each repeat after a
fresh prefill into the reset cache. Before timing, the first 8 greedy tokens of the replayed step must
equal those of the same step called from Python; on the CPU the decode loop's tokens must equal
``model.generate(do_sample=False)``'s. On CUDA, the agreement with generate is reported, not enforced
(generate attends through other SDPA kernels; fp16 rounding may flip a near tie).

Writes the section "## End to end: decode, LLaMA-7B-shaped model (random weights)" of bench/RESULTS.md
and bench/results/decode-h100.json (one record per format); --section / --records name others,
--no-write writes neither. One JSON line per format is printed as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import inspect
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lpq.errors import LpqError  # noqa: E402


def _pdl_on() -> bool:
    from lpq.kernels import uniform_cuda

    return bool(uniform_cuda.PDL)


def _pdl_words() -> str:
    from lpq.kernels import uniform_cuda

    if not uniform_cuda.PDL:
        return "plain launches"
    return ("the batch-1 uniform kernel and the attention kernel launch with programmatic dependent launch, the default; "
            + ("each such grid padded in shared memory so that no SM holds more than ceil(blocks / SMs) of its blocks"
               if uniform_cuda.PDL_BALANCE else "without the placement padding (LPQ_PDL_BALANCE=0)")
            + ("; the kernels of " + uniform_cuda.early_words() + " layers (W: uniform m = 1, S: squeezellm LUT m = 1, "
               "P161: ptq161 ring) let the next launch right after their own wait (the early trigger)"
               if uniform_cuda.PDL_EARLY else ""))
from results_io import device_name, versions, write_records, write_section  # noqa: E402

SECTION = "End to end: decode, LLaMA-7B-shaped model (random weights)"
DEFAULT_FORMATS = "fp16,w4g128,w3g128,w2g64"
CHECK_STEPS = 8  # greedy steps compared before timing
WARMUP_STEPS = 3  # eager steps on a side stream before a capture (kernel selection, cuBLAS handles, compile)
TARGETS = {3: 3.0, 4: 2.5}  # issue 4: decode speed-up over fp16 at batch 1, by bits

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, initializer_range=0.02)
# CPU smoke size; weights wider than the default 0.02 so that greedy tokens depend on every position
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
            initializer_range=0.08)
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


# -- what to run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    name: str  # "fp16" (the unquantized model, whatever --dtype is), "wXgY", "sX", "sXsp" or "p161"
    bits: int | None = None
    group_size: int | None = None
    method: str = "rtn"  # how the packed model is made: rtn, squeezellm or ptq161 (quantize_copy)
    sparse: float = 0.0  # squeezellm: percent of the weights kept exactly (the outliers)

    @property
    def quantized(self) -> bool:
        return self.bits is not None


# squeezellm and ptq161 models for decode speed: their layers need the formats' own shapes and sparse counts, not
# their quality, so they are made without calibration gradients or block-wise training (quantize_copy).
SQUEEZELLM_SPARSE = 0.45  # percent kept in fp16 for sXsp: issue 5's dense-and-sparse point
SQUEEZELLM_ITERS = 8  # k-means iterations
PTQ161_SALIENT = 0.2  # the method's default share of 4-bit input channels
PTQ161_CALIB = (4, 128)  # random-token windows x tokens for the salient-channel statistics
FORMAT_FORMS = "fp16, wXgY (RTN, X bits, groups of Y), sX or sXsp (squeezellm, X in 2-4; sp: 0.45 % sparse) or p161"


def parse_formats(text: str) -> list[Format]:
    """'fp16,w4g128,s3sp,p161' -> Formats, the unquantized one first (the speed-ups are relative to it)."""
    out: list[Format] = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        if name == "fp16":
            fmt = Format("fp16")
        elif name == "p161":
            fmt = Format(name, 4, -1, "ptq161")
        elif (sq := re.fullmatch(r"s([234])(sp)?", name)) is not None:
            fmt = Format(name, int(sq.group(1)), -1, "squeezellm", SQUEEZELLM_SPARSE if sq.group(2) else 0.0)
        else:
            m = re.fullmatch(r"w(\d+)g(-?\d+)", name)
            if m is None:
                raise LpqError(f"--formats: {name!r} is not a format: write {FORMAT_FORMS}, e.g. w4g128")
            fmt = Format(name, int(m.group(1)), int(m.group(2)))
        if fmt in out:
            raise LpqError(f"--formats: {name} is listed twice")
        out.append(fmt)
    if not out:
        raise LpqError("--formats is empty: name at least one format, e.g. fp16,w4g128")
    return sorted(out, key=lambda f: f.quantized)


def make_config(tiny: bool = False, layers: int | None = None):
    from transformers import LlamaConfig

    shape = TINY if tiny else SEVEN_B
    n_layers = layers if layers is not None else (2 if tiny else 32)
    if n_layers < 1:
        raise LpqError(f"--layers {n_layers}: need at least one decoder block")
    # no EOS: generate() must not stop early when a random model happens to emit it
    return LlamaConfig(num_hidden_layers=n_layers, max_position_embeddings=4096, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None, **shape)


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def parse_attention(spec: str) -> tuple[str, str | None]:
    """``sdpa``, ``eager``, ``flex_attention`` (a transformers attention implementation), ``lpq`` (lpq's decode
    kernel, SDPA otherwise: lpq.attention), or ``sdpa:B``: SDPA held to torch's backend B (cudnn, flash,
    efficient, math). Returns (implementation, backend or None)."""
    impl, _, backend = spec.strip().partition(":")
    if not impl:
        raise LpqError(f"--attn {spec!r}: name an attention implementation, e.g. sdpa or sdpa:efficient")
    if backend:
        if impl != "sdpa":
            raise LpqError(f"--attn {spec}: only sdpa takes a backend (sdpa:{'|'.join(SDPA_BACKENDS)})")
        if backend not in SDPA_BACKENDS:
            raise LpqError(f"--attn {spec}: {backend!r} is not an SDPA backend; choose one of {', '.join(SDPA_BACKENDS)}")
    return impl, backend or None


@contextlib.contextmanager
def attention(model, spec: str):
    """Run the model with the attention ``spec`` (parse_attention). A backend is chosen through torch's global
    SDPA switches, which SDPA reads when it dispatches (and torch.compile when it traces): only that backend
    is on inside the block, so a call it cannot serve fails loudly instead of falling back. The switches are
    restored on the way out; the model keeps its implementation."""
    impl, backend = parse_attention(spec)
    try:
        if impl == "lpq":  # lpq's decode kernel (lpq.attention): registered, built and its counters allocated
            import lpq

            print(lpq.attention.enable(model), flush=True)
        else:
            model.set_attn_implementation(impl)
    except Exception as e:  # an implementation this transformers or machine does not have
        raise LpqError(f"--attn {spec}: transformers refused it ({str(e).splitlines()[0][:160]})") from e
    cuda = torch.backends.cuda
    switches = {"cudnn": (cuda.cudnn_sdp_enabled, cuda.enable_cudnn_sdp),
                "flash": (cuda.flash_sdp_enabled, cuda.enable_flash_sdp),
                "efficient": (cuda.mem_efficient_sdp_enabled, cuda.enable_mem_efficient_sdp),
                "math": (cuda.math_sdp_enabled, cuda.enable_math_sdp)}
    before = {k: get() for k, (get, _) in switches.items()}
    try:
        if backend is not None:
            for k, (_, set_) in switches.items():
                set_(k == backend)
        yield
    finally:
        for k, (_, set_) in switches.items():
            set_(before[k])


def build_model(cfg, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with random weights (transformers' own init, seeded), built on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def check_fusion(formats: list[Format], args) -> None:
    """Refuses --fuse / --epilogues for a format whose sibling linears cannot join: ptq161 layers each have their
    own column scales, so q/k/v (and gate/up) stay separate linears."""
    if args.fuse and any(f.method == "ptq161" for f in formats):
        raise LpqError("--fuse / --epilogues: p161 layers cannot join (each linear has its own column scales); "
                       "time p161 without them, in a run of its own")


def format_words(formats: list[Format]) -> str:
    """How the quantized ``formats`` of a run were made, for a section's text."""
    words = []
    if any(f.method == "rtn" for f in formats if f.quantized):
        words.append("wXgY: RTN, X bits, groups of Y, asymmetric, lpq's uniform format")
    if any(f.method == "squeezellm" for f in formats):
        words.append(f"sX: squeezellm, per-row X-bit codebooks by unweighted k-means ({SQUEEZELLM_ITERS} iterations, no "
                     f"Fisher, nearest-centroid codes), sXsp the same with {SQUEEZELLM_SPARSE} % of the weights, the "
                     "outliers, kept exactly in CSR")
    if any(f.method == "ptq161" for f in formats):
        words.append(f"p161: ptq161 in closed form ({PTQ161_SALIENT:.0%} of the input channels by max |x| over "
                     f"{PTQ161_CALIB[0]} random-token windows of {PTQ161_CALIB[1]} at 4 bits, the rest binarized; no "
                     "block-wise training)")
    return "; ".join(words)


def quantize_copy(master, fmt: Format, device: str, head: bool = False):
    """A copy of ``master`` (left untouched) packed in ``fmt``; returns (packed model, seconds). RTN for wXgY;
    squeezellm and ptq161 without calibration gradients or block training (format_words). With ``head`` the
    lm_head too (RTN formats only, in the same format; lpq.quantize leaves it in full precision).

    lpq.quantize streams the blocks of a CPU model through ``device``; the packed model stays where
    ``master`` is (move it afterwards)."""
    import lpq
    from lpq.methods.rtn import rtn_quantize
    from lpq.nn import QuantizedLinear
    from lpq.spec import QuantSpec

    if head and fmt.method != "rtn":
        raise LpqError(f"--head quantized: only the RTN formats (wXgY) quantize the lm_head, not {fmt.name}")
    t0 = time.perf_counter()
    model = copy.deepcopy(master)
    if fmt.method == "squeezellm":
        res = lpq.quantize(model, None, method="squeezellm", bits=fmt.bits, group_size=-1, device=device,
                           method_options={"fisher": False, "gptq": False, "outliers": fmt.sparse, "sensitive": 0,
                                           "iters": SQUEEZELLM_ITERS})
    elif fmt.method == "ptq161":
        n, length = PTQ161_CALIB
        tokens = torch.randint(0, master.config.vocab_size, (n, min(length, master.config.max_position_embeddings)),
                               generator=torch.Generator().manual_seed(0))
        res = lpq.quantize(model, None, method="ptq161", bits=4, group_size=-1, device=device, calib=tokens,
                           method_options={"salient_ratio": PTQ161_SALIENT, "epochs": 0, "init": "closed",
                                           "sequential": False, "fp_targets": 0, "act_stat": "max"})
    else:
        res = lpq.quantize(model, None, method="rtn", bits=fmt.bits, group_size=fmt.group_size, sym=False,
                           device=device)
    model = res.model.eval()
    if head:
        lm = model.get_output_embeddings()
        if lm.bias is not None or lm.weight is model.get_input_embeddings().weight:
            raise LpqError("--head quantized: the lm_head must be a separate linear without a bias")
        qw = rtn_quantize(lm.weight.detach().to(device).float(), QuantSpec(bits=fmt.bits, group_size=fmt.group_size, sym=False))
        model.set_output_embeddings(QuantizedLinear.from_quantized(qw.to("cpu"), None, lm.weight.dtype))
    return model, time.perf_counter() - t0


# -- measuring -----------------------------------------------------------------------------------------

FOLD_NORMS = {"all": ("input_layernorm", "post_attention_layernorm"), "mlp": ("post_attention_layernorm",), "none": ()}


def fuse_model(model, epilogues: bool = False, fold: str = "none", attention: bool = True,
               block_fusion: bool = False) -> None:
    """q/k/v and gate/up of every block joined (lpq.fuse_siblings); every block must have both groups. With
    epilogues: lpq.fuse_for_decode (gated MLPs with silu(gate) * up in the joint linear, q/k/v joined, the RMSNorms
    of ``fold`` folded into the projections that read them, with ``attention`` the self-attention wrapped for
    the fused rotary + cache write + attention kernel, which acts under --attn lpq, and with ``block_fusion`` the
    blocks wrapped so that residual adds and RMSNorms run in the projections' epilogues); every block must take
    them."""
    from lpq.fuse import fuse_for_decode, fuse_siblings

    blocks = model.config.num_hidden_layers
    if epilogues:
        report = fuse_for_decode(model, FOLD_NORMS[fold], attention=attention, blocks=block_fusion)
        counts = {k: len(v) for k, v in report.items()}
        want = len(FOLD_NORMS[fold]) * blocks
        expected = {"gated_mlp": blocks, "siblings": blocks, "norms": want, "attention": blocks if attention else 0,
                    "blocks": blocks if block_fusion else 0}
        if counts != expected:
            raise LpqError(f"--epilogues changed {counts}, expected {expected}")
        return
    fused = fuse_siblings(model)
    if len(fused) != 2 * blocks:
        raise LpqError(f"--fuse joined {len(fused)} sibling groups, expected {2 * blocks} (q/k/v and gate/up a block)")


def model_bytes(model, device: torch.device | None = None) -> int:
    """Bytes of the model's parameters and buffers (each storage once: tied weights count once), only those
    on ``device`` if given (a QuantizedLinear whose kernel holds the weights keeps its canonical buffers in
    host memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if device is not None and t.device.type != torch.device(device).type:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def kernel_state_bytes(model) -> int:
    """Bytes the QuantizedLinears' kernels hold beside the packed weights (their repacked copies)."""
    from lpq.nn import QuantizedLinear

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.untyped_storage().nbytes()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0

    return sum(size(m.kernel_state) for m in model.modules() if isinstance(m, QuantizedLinear))


def kernel_names(model) -> str:
    """The kernels the QuantizedLinears run (after a forward), e.g. 'uniform_cuda'; '-' for none."""
    from lpq.nn import QuantizedLinear

    names = sorted({m.kernel.name if m.kernel is not None else "unselected"
                    for m in model.modules() if isinstance(m, QuantizedLinear)})
    return "+".join(names) or "-"


def make_static_cache(model, max_cache_len: int, device, dtype):
    """transformers' StaticCache, passing only the arguments this version's constructor names."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    offered = {"config": model.config, "max_cache_len": max_cache_len, "max_batch_size": 1, "batch_size": 1,
               "device": device, "dtype": dtype}
    return StaticCache(**{k: v for k, v in offered.items() if k in params})


def allow_recompiles(limit: int = 4096) -> None:
    """Let dynamo compile every frame of the step. Should a graph break appear inside the blocks (an op
    dynamo cannot trace), frames such as the cache update are specialised per layer index: 32 versions,
    over dynamo's default limit of 8, after which it would run the rest eagerly and the formats would
    not be compiled alike."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        try:
            current = getattr(dynamo_config, name)
        except AttributeError:
            continue
        setattr(dynamo_config, name, max(current, limit if not name.startswith("accumulated") else 64 * limit))


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


class Decoder:
    """Greedy batch-1 decode of one model through a StaticCache, one token per ``step()``.

    Buffers (fixed addresses, so that a captured step replays on the current values):
        ids [1, 1]    the token fed to the next step
        pos [1, 1]    its position (position_ids; also cache_position where the model takes one)
        seq [P + S + 1] the prompt, the token from the prefill, then one token per step
    The cache writes each step's keys/values at its own counter (cumulative length), which the prefill
    sets to P and each step advances by one, in step with ``pos``.
    """

    def __init__(self, model, prompt: torch.Tensor, steps: int, mode: str = "eager"):
        self.model = model
        self.device = prompt.device
        self.prompt = prompt  # [1, P] token ids
        self.plen = prompt.shape[1]
        self.steps = steps
        self.mode = mode
        dtype = next(model.parameters()).dtype
        self.cache = make_static_cache(model, self.plen + steps, self.device, dtype)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.seq = torch.zeros(self.plen + steps + 1, dtype=torch.long, device=self.device)
        fwd = inspect.signature(model.forward).parameters
        self._takes_cache_position = "cache_position" in fwd  # transformers v5 Llama: positions only
        self._takes_logits_to_keep = "logits_to_keep" in fwd
        self._cache_kwarg = "cache" if "cache" in fwd else "past_key_values"  # renamed in transformers 5.24
        self._step = self._step_eager
        if mode == "compile":
            allow_recompiles()
            self._step = torch.compile(self._step_eager, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.prefill_logits_finite = True

    def _forward(self, input_ids, position_ids, last_only: bool):
        kw = {}
        if self._takes_cache_position:
            kw["cache_position"] = position_ids[0]
        if last_only and self._takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        kw[self._cache_kwarg] = self.cache
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **kw)
        return out.logits  # [1, L, V]

    @torch.no_grad()
    def prefill(self) -> None:
        """Reset the cache (in place: a captured step keeps its addresses) and run the prompt."""
        self.cache.reset()
        positions = torch.arange(self.plen, device=self.device).unsqueeze(0)
        logits = self._forward(self.prompt, positions, last_only=True)
        self.prefill_logits_finite = bool(torch.isfinite(logits[:, -1]).all())
        nxt = logits[:, -1].argmax(-1)  # [1]
        self.seq.zero_()
        self.seq[: self.plen].copy_(self.prompt[0])
        self.seq[self.plen : self.plen + 1].copy_(nxt)
        self.ids.copy_(nxt.view(1, 1))
        self.pos.fill_(self.plen)

    def _step_eager(self) -> None:
        logits = self._forward(self.ids, self.pos, last_only=False)
        nxt = logits[:, -1].argmax(-1)  # [1]
        self.pos.add_(1)  # the new token's position
        self.ids.copy_(nxt.view(1, 1))
        self.seq.index_copy_(0, self.pos.view(1), nxt)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step called from Python (the compiled function in compile mode)."""
        self._step()

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up on a side stream, then capture one step in a CUDA graph (the cache is left reset)."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self.prefill()
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        self.prefill()  # the capture records but does not run: the state it leaves is the prefill's
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step()
        self.graph = g
        self.prefill()

    def advance(self) -> None:
        """One decode step the way this mode times it (a replay once captured)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def run(self, n: int) -> None:
        if n > self.steps:
            raise ValueError(f"{n} steps asked, the cache holds {self.steps}")
        for _ in range(n):
            self.advance()

    def tokens(self, n: int) -> list[int]:
        """The prefill's token and those of the first n steps."""
        return self.seq[self.plen : self.plen + n + 1].tolist()


def generate_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    """model.generate's greedy continuation: the prefill's token and n more (n + 1 in all)."""
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n + 1,
                             min_new_tokens=n + 1, do_sample=False)
    return out[0, prompt.shape[1] :].tolist()


def check_against_generate(dec: Decoder, n: int = CHECK_STEPS) -> list[int]:
    """Run n eager steps after a fresh prefill; raise if the tokens differ from model.generate's."""
    dec.prefill()
    for _ in range(n):
        dec.step()
    got = dec.tokens(n)
    want = generate_tokens(dec.model, dec.prompt, n)
    if got != want:
        raise AssertionError(f"the decode loop's greedy tokens {got} differ from model.generate's {want}")
    return got


def check_replay(dec: Decoder, n: int = CHECK_STEPS) -> tuple[list[int], list[int]]:
    """(tokens of the step called from Python, tokens of the captured step replayed), each after a fresh
    prefill; the caller compares them."""
    dec.prefill()
    for _ in range(n):
        dec.step()
    called = dec.tokens(n)
    dec.prefill()
    for _ in range(n):
        dec.graph.replay()
    return called, dec.tokens(n)


def time_decode(dec: Decoder, steps: int, repeats: int) -> list[float]:
    """Seconds of ``steps`` decode steps, once per repeat (each after a fresh prefill)."""
    cuda = dec.device.type == "cuda"
    out = []
    for _ in range(repeats):
        dec.prefill()
        if cuda:
            torch.cuda.synchronize(dec.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dec.run(steps)
            end.record()
            torch.cuda.synchronize(dec.device)
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            dec.run(steps)
            out.append(time.perf_counter() - t0)
    return out


def measure(model, fmt: Format, prompt: torch.Tensor, steps: int, repeats: int, mode: str,
            attn: str = "sdpa") -> dict:
    """Check, then time the decode of one model with attention ``attn`` (parse_attention); returns its record
    (without the fp16 ratio)."""
    with attention(model, attn):
        record = _measure(model, fmt, prompt, steps, repeats, mode)
    record["attn"] = attn
    return record


def _measure(model, fmt: Format, prompt: torch.Tensor, steps: int, repeats: int, mode: str) -> dict:
    graphs_before = compiled_graphs()
    dec = Decoder(model, prompt, max(steps, CHECK_STEPS), mode)
    dec.prefill()  # also selects the QuantizedLinears' kernels
    with contextlib.ExitStack() as stack:
        if fmt.quantized and dec.device.type == "cpu":
            # the CPU runs the reference kernel, which would unpack every layer on every step: a smoke
            # run keeps each layer's dequantized weight for its duration instead (lpq.evaluate does too)
            from lpq.evaluate import dense_weights

            stack.enter_context(dense_weights(model))
        record = _check_and_time(dec, fmt, prompt, steps, repeats, mode)
    record["kernel"] = (kernel_names(model) + (" (dense cache)" if dec.device.type == "cpu" else "")) if fmt.quantized \
        else "torch (cuBLAS)" if dec.device.type == "cuda" else "torch"
    record["compiled_graphs"] = compiled_graphs() - graphs_before if mode == "compile" else None
    record["weights_gb"] = model_bytes(model, dec.device) / 1e9
    record["kernel_state_gb"] = kernel_state_bytes(model) / 1e9
    del dec
    return record


def _check_and_time(dec: Decoder, fmt: Format, prompt: torch.Tensor, steps: int, repeats: int, mode: str) -> dict:
    model = dec.model
    record = {"check": None, "generate_agree": None}
    if not dec.prefill_logits_finite:
        record["check"] = "FAILED: the prefill's logits are not finite"
    elif dec.device.type == "cuda":
        with torch.no_grad():
            ref = generate_tokens(model, prompt, CHECK_STEPS)
        if mode in ("graph", "compile"):
            try:
                dec.capture()
            except Exception as e:  # e.g. a host sync inside the step: report it, go on with the next format
                dec.graph = None
                record["check"] = f"FAILED: capturing the step: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                return _finish_record(record, fmt, prompt, steps, repeats, mode, [], model)
            called, replayed = check_replay(dec)
            if called != replayed:
                record["check"] = (f"FAILED: greedy tokens through the CUDA graph {replayed} differ from the same "
                                   f"step called from Python {called}")
            else:
                record["check"] = f"graph == called, {CHECK_STEPS} steps"
        else:
            dec.prefill()
            dec.run(CHECK_STEPS)
            called = dec.tokens(CHECK_STEPS)
            record["check"] = "eager only"
        record["generate_agree"] = f"{sum(a == b for a, b in zip(called, ref))}/{len(ref)}"
    else:
        if mode != "eager" and mode != "compile":
            raise LpqError(f"--mode {mode} needs CUDA: use --mode eager on the CPU")
        try:
            check_against_generate(dec)
            record["check"] = f"== generate, {CHECK_STEPS} steps"
            record["generate_agree"] = f"{CHECK_STEPS + 1}/{CHECK_STEPS + 1}"
        except AssertionError as e:
            record["check"] = f"FAILED: {e}"
    times = [] if record["check"].startswith("FAILED") else time_decode(dec, steps, repeats)
    return _finish_record(record, fmt, prompt, steps, repeats, mode, times, model)


def _finish_record(record: dict, fmt: Format, prompt, steps: int, repeats: int, mode: str, times: list[float],
                   model) -> dict:
    sec = statistics.median(times) if times else None
    record.update({
        "format": fmt.name, "bits": fmt.bits if fmt.quantized else 16,
        "group_size": fmt.group_size if fmt.quantized else None,
        "mode": mode, "batch": 1, "prompt_len": prompt.shape[1], "new_tokens": steps, "repeats": repeats,
        "ms_per_token": sec * 1000.0 / steps if sec else None,
        "tokens_per_s": steps / sec if sec else None,
        "tokens_per_s_repeats": [steps / t for t in times],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    })
    return record


# -- output --------------------------------------------------------------------------------------------

def section_body(records: list[dict], args, gpu: str, date: str, command: str, cfg, model_label: str) -> str:
    steps, plen = args.new_tokens, args.prompt_len
    cuda = args.device.startswith("cuda")
    mode = records[0]["mode"] if records else "-"
    if mode in ("graph", "compile") and cuda:
        checked = (f"the first {CHECK_STEPS} greedy tokens of the replayed step equal those of the same step called "
                   "from Python (generate agree: tokens equal to model.generate's, which attends through other "
                   "kernels; reported only)")
    elif cuda:
        checked = "nothing enforced in eager mode (generate agree: tokens equal to model.generate's; reported only)"
    else:
        checked = f"the first {CHECK_STEPS} greedy tokens equal model.generate's"
    shape = (f"{cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
             f"{cfg.num_attention_heads} heads, vocabulary {cfg.vocab_size}")
    how = {"graph": "one decode step (forward, argmax, buffer updates) captured in a CUDA graph and replayed per token",
           "compile": "one decode step torch.compile'd (inductor) and " + (
               "captured in a CUDA graph, replayed per token" if cuda else "called from Python per token"),
           "eager": "each decode step called from Python"}[records[0]["mode"]] if records else ""
    lines = [
        f"{gpu}; {versions()}; date {date}.",
        f"Command: `{command}`. Model: {model_label.split(' (')[0]} ({shape}) built from its config with random weights "
        f"(seed {args.seed}), {args.dtype}; each lpq format packs the same weights over the decoder linears "
        f"({format_words(parse_formats(','.join(r['format'] for r in records))) if records else '-'}), "
        + ("and the lm_head too (--head quantized, RTN in the same format), embeddings left as they are. "
           if args.head == "quantized" else "embeddings and lm_head left as they are. ")
        + f"Batch 1: a random prompt of {plen} tokens prefilled, then {steps} greedy decode steps through transformers "
        f"(StaticCache of {plen + steps}, attention {records[0]['attn'] if records else '-'}); "
        f"{how}, the same for every format. Timed: the decode steps only "
        f"({'CUDA events' if cuda else 'wall clock'}), median of {args.repeats} repeats, each after a fresh prefill. "
        f"Checked before timing: {checked}. "
        + ("" if cuda else "On the CPU lpq runs its reference kernel, here on weights dequantized once "
           "(lpq.evaluate.dense_weights): a smoke run, not a speed figure. ")
        + "weights GB: parameters and buffers of the model on the device; kernel copies GB: the kernels' repacked "
        "copies (a kernel that holds its copy leaves the canonical packed buffers in host memory, lpq.nn). "
        + (f"LPQ_PDL={int(_pdl_on())} ({_pdl_words()}). "
           if cuda else "")
        + ("--fuse: in every format, fp16 included, each block's q/k/v and gate/up projections run as one linear each "
           "(lpq.fuse_siblings: 4 linears a block instead of 7). " if args.fuse and not args.epilogues else "")
        + ("--epilogues: in every format, fp16 included, lpq.fuse_for_decode: q/k/v joined, gate/up joined with "
           "silu(gate) * up computed by the joint linear, "
           + {"all": "both RMSNorms of a block", "mlp": "the RMSNorm before the MLP", "none": "no RMSNorm"}[args.fold_norms]
           + " folded into the projections that read them (lpq.epilogue; lpq's uniform kernel computes the epilogues "
           "in its own epilogue, fp16 runs them in torch)"
           + ("; each self-attention wrapped (lpq.fuse.DecodeAttention): under lpq attention a decode step's rotary "
              "embedding, cache write and attention run as one lpq kernel in every format" if args.attention_fusion == "on"
              else "; attentions not wrapped (--attention-fusion off)")
           + ("; each decoder block wrapped (lpq.fuse.DecodeBlock): under lpq attention a decode step's residual adds "
              "and RMSNorms run in the projections' epilogues (--block-fusion on)" if args.block_fusion == "on" else "")
           + ". " if args.epilogues else "")
        + "Targets (issue 4): W4 >= 2.5x, W3 >= 3x over fp16.",
        "",
        "| format | weights GB | kernel copies GB | ms/token | tokens/s | x fp16 | target | kernel | check | generate agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ms = "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.2f}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        x = "-" if r.get("speedup_vs_fp16") is None else f"{r['speedup_vs_fp16']:.2f}"
        target = TARGETS.get(r["bits"]) if r["format"].startswith("w") else None  # issue 4's targets: RTN formats
        if target is None or not cuda:  # a CPU smoke run says nothing about the GPU targets
            tgt = "-"
        elif r.get("speedup_vs_fp16") is None:
            tgt = f"{target}x: -"
        else:
            tgt = f"{target}x: {'met' if r['speedup_vs_fp16'] >= target else 'missed'}"
        lines.append(f"| {r['format']} | {r['weights_gb']:.3g} | {r['kernel_state_gb']:.3g} | {ms} | {tps} | {x} | "
                     f"{tgt} | {r['kernel']} | {r['check']} | {r['generate_agree'] or '-'} |")
    if mode == "compile":
        lines += ["", "Graphs dynamo compiled per format (more than a few: graph breaks): " +
                  ", ".join(f"{r['format']} {r['compiled_graphs']}" for r in records) + "."]
    return "\n".join(lines)


def free_device(device: torch.device, mode: str) -> None:
    if mode == "compile":
        torch._dynamo.reset()  # compiled code keeps the previous model alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_fusion_args(ap: argparse.ArgumentParser) -> None:
    """The model transforms every format gets (this script and bench/profile_decode.py): --fuse, --epilogues,
    --fold-norms, --attention-fusion. Call :func:`fusion_settled` on the parsed arguments."""
    ap.add_argument("--fuse", action="store_true",
                    help="join each block's q/k/v and gate/up projections into one linear each (lpq.fuse_siblings), "
                         "for every format, fp16 included")
    ap.add_argument("--epilogues", action="store_true",
                    help="--fuse, and also fold the MLP's silu(gate) * up (and --fold-norms) into the linears "
                         "(lpq.fuse_for_decode), for every format, fp16 included")
    ap.add_argument("--fold-norms", choices=tuple(FOLD_NORMS), default="none",
                    help="with --epilogues: which RMSNorms of a block fold into their projections (mlp: only the one "
                         "before the MLP)")
    ap.add_argument("--attention-fusion", choices=("on", "off"), default="on",
                    help="with --epilogues: wrap each self-attention (lpq.fuse.DecodeAttention) so that, under --attn lpq, "
                         "a decode step's rotary embedding, cache write and attention run as one lpq kernel")
    ap.add_argument("--block-fusion", choices=("on", "off"), default=None,
                    help="with --epilogues and --attention-fusion on: wrap each decoder block (lpq.fuse.DecodeBlock) so "
                         "that, under --attn lpq, a decode step's residual adds and RMSNorms run in the projections' "
                         "epilogues (five kernels a block); default: on where those settings allow it, as "
                         "lpq.fuse_for_decode does")


def fusion_settled(args: argparse.Namespace) -> argparse.Namespace:
    """--epilogues implies --fuse; --block-fusion on needs --epilogues with --attention-fusion on and no folded norm
    (and is the default there)."""
    args.fuse = args.fuse or args.epilogues
    allowed = args.epilogues and args.attention_fusion == "on" and args.fold_norms == "none"
    if args.block_fusion == "on" and not allowed:
        raise LpqError("--block-fusion on needs --epilogues, --attention-fusion on and --fold-norms none")
    if args.block_fusion is None:
        args.block_fusion = "on" if allowed else "off"
    return args


def fuse_as_asked(model, args: argparse.Namespace) -> None:
    """fuse_model with the settings of :func:`add_fusion_args` (nothing without --fuse)."""
    if args.fuse:
        fuse_model(model, args.epilogues, args.fold_norms, args.attention_fusion == "on", args.block_fusion == "on")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma list of " + FORMAT_FORMS)
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; 2 with --tiny)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (32 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed; default 256 (32 with --tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=("auto", "graph", "compile", "eager"), default="auto",
                    help="auto: graph on CUDA, eager on the CPU")
    ap.add_argument("--attn", default="sdpa",
                    help="attention, the same for every format: sdpa, eager, flex_attention (transformers' names), "
                         "lpq (lpq's decode kernel, SDPA otherwise), or sdpa:cudnn|flash|efficient|math (SDPA held to "
                         "one of torch's backends)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="float16 / bfloat16 / float32; auto: float16 on CUDA, float32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="2 blocks, hidden 256, MLP 512, 4 heads, vocabulary 1000")
    add_fusion_args(ap)
    ap.add_argument("--head", choices=("fp16", "quantized"), default="fp16",
                    help="the lm_head of the quantized formats: left in full precision (lpq.quantize's default) or RTN "
                         "in the format itself")
    ap.add_argument("--section", default=SECTION, help="RESULTS.md section (without '## ')")
    ap.add_argument("--records", default="decode-h100", help="bench/results/<name>.json")
    ap.add_argument("--no-write", action="store_true")
    return run_script(ap, argv, run)


def run_script(ap: argparse.ArgumentParser, argv: list[str] | None, run) -> int:
    """Parse argv, settle the fusion options (fusion_settled) and call run(args, argv): a decode bench script's main.
    A refused input (LpqError) prints one line and returns 2."""
    args = ap.parse_args(argv)
    try:
        return run(fusion_settled(args), argv)
    except LpqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    formats = parse_formats(args.formats)
    check_fusion(formats, args)
    parse_attention(args.attn)  # a bad --attn is refused before anything is built
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LpqError("--device cuda was asked for, but no CUDA GPU is available: use --device cpu (with --tiny)")
    if args.dtype == "auto":
        args.dtype = "float16" if device.type == "cuda" else "float32"
    if args.dtype not in DTYPES:
        raise LpqError(f"--dtype {args.dtype} is not known: choose float16, bfloat16 or float32")
    dtype = DTYPES[args.dtype]
    mode = args.mode if args.mode != "auto" else ("graph" if device.type == "cuda" else "eager")
    if mode == "graph" and device.type != "cuda":
        raise LpqError("--mode graph needs CUDA: use --mode eager on the CPU")
    if args.prompt_len is None:
        args.prompt_len = 32 if args.tiny else 128
    if args.new_tokens is None:
        args.new_tokens = 32 if args.tiny else 256
    if args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise LpqError("--prompt-len, --new-tokens and --repeats must be at least 1")
    cfg = make_config(args.tiny, args.layers)
    if args.prompt_len + max(args.new_tokens, CHECK_STEPS) > cfg.max_position_embeddings:
        raise LpqError(f"--prompt-len + --new-tokens exceeds the model's {cfg.max_position_embeddings} positions")
    gpu = device_name(str(device))
    date = datetime.date.today().isoformat()
    pdl_env = "".join(f"{k}={os.environ[k]} " for k in ("LPQ_PDL", "LPQ_PDL_BALANCE", "LPQ_PDL_EARLY") if k in os.environ)
    command = (pdl_env if device.type == "cuda" else "") + "python bench/decode.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    model_label = f"LLaMA-7B-shaped ({cfg.num_hidden_layers} blocks, random)" if not args.tiny else \
        f"tiny Llama ({cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, random)"

    t0 = time.perf_counter()
    base = build_model(cfg, device, dtype, args.seed)
    print(f"built the model on {device} in {time.perf_counter() - t0:.1f} s "
          f"({model_bytes(base) / 1e9:.2f} GB)", flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)

    records: list[dict] = []
    fp16_tps = None

    def finish(rec: dict) -> None:
        nonlocal fp16_tps
        if rec["format"] == "fp16":
            fp16_tps = rec["tokens_per_s"]
        rec["speedup_vs_fp16"] = (rec["tokens_per_s"] / fp16_tps) if fp16_tps and rec["tokens_per_s"] else None
        rec.update({"model": model_label, "device": gpu, "dtype": args.dtype, "date": date, "fused": bool(args.fuse),
                    "epilogues": bool(args.epilogues), "fold_norms": args.fold_norms if args.epilogues else None,
                    "attention_fusion": (args.attention_fusion == "on") if args.epilogues else None,
                    "block_fusion": args.block_fusion == "on",
                    "head": args.head if rec["format"] != "fp16" else "fp16"})
        records.append(rec)
        print(json.dumps(rec), flush=True)

    quantized = [f for f in formats if f.quantized]
    master = None
    if args.fuse and quantized and formats[0].name == "fp16":
        master = copy.deepcopy(base).to("cpu")  # the formats quantize the unfused weights
    if formats[0].name == "fp16":
        fuse_as_asked(base, args)
        rec = measure(base, formats[0], prompt, args.new_tokens, args.repeats, mode, args.attn)
        rec["quantize_s"] = None
        finish(rec)
    if quantized:
        if master is None:
            master = base.to("cpu")  # in place: the fp16 copy leaves the GPU; each format quantizes a CPU copy
        del base
        free_device(device, mode)
        for fmt in quantized:
            model, qs = quantize_copy(master, fmt, str(device), head=args.head == "quantized")
            model.to(device)
            fuse_as_asked(model, args)  # on the device: joining repacks the codes, faster there
            print(f"quantized {fmt.name} in {qs:.1f} s", flush=True)
            rec = measure(model, fmt, prompt, args.new_tokens, args.repeats, mode, args.attn)
            rec["quantize_s"] = qs
            finish(rec)
            del model
            free_device(device, mode)

    failed = [r["format"] for r in records if r["check"].startswith("FAILED")]
    if not args.no_write:
        write_records(args.records, records)
        write_section(args.section, section_body(records, args, gpu, date, command, cfg, model_label))
    print(section_body(records, args, gpu, date, command, cfg, model_label))
    if failed:
        print(f"error: the check failed for {', '.join(failed)} (see the check column); no timing for them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
