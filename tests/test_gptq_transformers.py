"""GPTQ interoperability with the tools that read GPTQ checkpoints: lpq's ``--format gptq`` output
loaded by transformers' own GPTQ path (transformers -> optimum -> GPTQModel's CPU torch kernels), and
GPTQModel's packer and checkpoints read back by lpq.

optimum and gptqmodel are NOT lpq dependencies; every test here skips without them. Checked with
optimum 2.3.0 and gptqmodel 7.6.0 (the newest release that accepts torch 2.13; 7.7.0 needs torch
>= 2.14.1) on CPU-only torch 2.13.0 and transformers 5.23.0, installed as

    pip install optimum==2.3.0 && pip install --no-deps gptqmodel==7.6.0 && pip install device-smi==0.5.7 \
        pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28 threadpoolctl==3.8.0 pillow==13.0.0

--no-deps because gptqmodel's declared dependencies pin numpy==2.2.6 (a downgrade) and pull torchao,
which transformers then imports in every process, printing "Failed to load ..." lines on stderr of
every lpq command; neither is needed to load or pack GPTQ checkpoints on the CPU. Nothing is built
for CUDA: gptqmodel's CPU kernels are plain torch or ATen ops.

What "reads it" means here, per case:
* every layer lpq quantized comes back as a GPTQModel quantized linear, and GPTQModel's own
  dequantization of it is bit-identical to lpq's dequantized weight rounded to fp16. Exact by
  construction: GPTQModel computes scale * (code - zero) in fp16, lpq in fp32, where that product is
  exact (an 11-bit scale times an integer below 2**9 fits fp32's 24 bits), so rounding lpq's value to
  fp16 gives the same number;
* transformers' model (GPTQModel's "gptq_torch" kernel, dequantize + matmul) gives the same logits as
  lpq.load at fp16 (the dtype the checkpoint is stored in and transformers' default for it), to one
  fp16 ulp of the largest logit (bit-equal on this machine);
* in fp32 it gives the same logits as a plain float transformers model holding lpq's weights
  rounded to fp16 (identical weights and arithmetic: only the matmul summation order may differ);
* the call exactly as a user writes it, ``from_pretrained(dir, device_map="cpu")``, loads, runs
  generate() and agrees with that reference within the precision of the kernel GPTQModel picks.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

try:  # any import failure means "not available here"
    import optimum.gptq  # noqa: F401 - transformers' GPTQ integration imports it
    import gptqmodel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module
except Exception as e:  # noqa: BLE001
    pytest.skip(
        f"optimum + gptqmodel (transformers' GPTQ backend; optional, not lpq dependencies) are not importable "
        f"({type(e).__name__}: {e}): see this file's docstring for the install command",
        allow_module_level=True,
    )

from lpq import api
from lpq.formats import QuantizedWeight
from lpq.formats.gptq_compat import from_gptq, to_gptq
from lpq.nn import QuantizedLinear
from lpq.quant import group_index

from conftest import make_model, save_model
from test_gptq import random_layer

# bits, group size, sym, act-order (desc_act), method: 4 and 3 bits (the widths GPTQ checkpoints are
# mostly made at), each of sym / asym / act-order / group 32 / group 64 at both widths in the fast set;
# the other combinations and 2 and 8 bits are marked slow (each case costs a few seconds of loads).
FAST = [
    (4, 32, False, False, "rtn"),
    (4, 64, True, True, "gptq"),
    (3, 32, False, True, "gptq"),
    (3, 64, True, False, "rtn"),
]
SLOW = [
    (4, 32, False, True, "gptq"),
    (4, 64, True, False, "rtn"),
    (3, 64, False, False, "gptq"),
    (3, 32, True, True, "gptq"),
    (2, 32, False, False, "gptq"),
    (8, 64, False, True, "gptq"),
]


def case_id(c) -> str:
    bits, gs, sym, act, method = c
    return f"{method}-w{bits}g{gs}-{'sym' if sym else 'asym'}{'-desc_act' if act else ''}"


CASES = [pytest.param(c, id=case_id(c)) for c in FAST] + [pytest.param(c, id=case_id(c), marks=pytest.mark.slow)
                                                          for c in SLOW]


def transformers_load(path, dtype=None, backend: str | None = None):
    """transformers' own GPTQ loading path; ``backend`` picks GPTQModel's kernel (None: its own choice)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {"device_map": "cpu"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if backend is not None:
        # only the loading attributes (backend) of a passed GPTQConfig are used; the rest comes from config.json
        kwargs["quantization_config"] = GPTQConfig(bits=4, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def lpq_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def dense_reference(ours, round_to_fp16: bool):
    """A plain float32 transformers model with lpq's dequantized weights (optionally rounded to fp16)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(ours.config)
    del config.quantization_config
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        own = ref.state_dict()
        ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items() if k in own}, strict=False)
        for name, layer in lpq_layers(ours).items():
            w = layer.dequantize().float()
            ref.get_submodule(name).weight.copy_(w.half().float() if round_to_fp16 else w)
    return ref


def assert_same_weights(theirs, ours):
    """Every lpq-quantized layer is a GPTQModel quantized linear whose dequantized weight is bit-identical to
    lpq's rounded to fp16 (call before the first forward: some kernels repack on it)."""
    ql = {n: m for n, m in theirs.named_modules() if isinstance(m, BaseQuantLinear)}
    layers = lpq_layers(ours)
    assert set(ql) == set(layers) and layers
    for name, layer in layers.items():
        w_theirs = ql[name].dequantize_weight().t()  # [N, K], fp16
        assert torch.equal(w_theirs.half(), layer.dequantize().half()), name


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(autouse=True, scope="module")
def eager_gptqmodel_kernels():
    """GPTQModel wraps its dequantization in torch.compile (a speed-up only: the same torch ops), which costs
    minutes of inductor compilation on 2 cores with a cold cache; run it eagerly."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module", params=CASES)
def lpq_gptq_dir(request, tmp_path_factory, tokenizer, text_file):
    bits, gs, sym, act, method = request.param
    out = tmp_path_factory.mktemp("gptq-export") / case_id(request.param)
    calib = dict(calib=str(text_file), nsamples=4, seqlen=32) if method == "gptq" else {}
    api.quantize(make_model("llama"), out, tokenizer=tokenizer, method=method, bits=bits, group_size=gs, sym=sym,
                 act_order=act, device="cpu", save_format="gptq", **calib)
    return out, request.param


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def test_transformers_reads_lpq_gptq_checkpoint(lpq_gptq_dir, ids):
    out, (bits, gs, sym, act, _) = lpq_gptq_dir
    ours16 = api.load(out, device="cpu", dtype=torch.float16)
    theirs16 = transformers_load(out, torch.float16, backend="gptq_torch")
    qc = theirs16.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, gs, sym, act)
    assert_same_weights(theirs16, ours16)
    a, b = logits(ours16, ids), logits(theirs16, ids)
    # same fp16 weights (checked bitwise above) and the same fp16 modelling code: allow one fp16 ulp of
    # the largest logit for a different summation order inside the matmuls (equal on this machine)
    ulp = 2.0 ** (math.floor(math.log2(float(a.abs().max()))) - 10)
    torch.testing.assert_close(b, a, rtol=0, atol=ulp)

    theirs32 = transformers_load(out, torch.float32, backend="gptq_torch")
    ref = dense_reference(api.load(out, device="cpu", dtype=torch.float32), round_to_fp16=True)
    torch.testing.assert_close(logits(theirs32, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_transformers_default_kernel_runs_lpq_gptq_checkpoint(lpq_gptq_dir, ids, tokenizer):
    """``from_pretrained(dir, device_map="cpu")`` as a user writes it: GPTQModel chooses the kernel (the
    ATen int4pack kernel at 4 bits, which rounds activations and scales to bf16; dequantize + matmul
    otherwise) and the model dtype comes from config.json (fp16)."""
    out, (bits, *_rest) = lpq_gptq_dir
    theirs = transformers_load(out)
    assert theirs.dtype == torch.float16
    ours32 = api.load(out, device="cpu", dtype=torch.float32)
    assert_same_weights(theirs, ours32)
    ref = logits(dense_reference(ours32, round_to_fp16=True), ids)
    got = logits(theirs, ids)
    # bf16 keeps 8 significant bits (relative rounding 2**-9) on activations and scales, through 2
    # blocks of 7 matmuls: allow 2**-6 (1.6%) of the largest logit; a wrong zero point, scale or
    # permutation in any layer moves the logits by the quantization step itself, far more.
    torch.testing.assert_close(got, ref, rtol=0, atol=2.0**-6 * float(ref.abs().max()))
    gen = theirs.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


# ---- GPTQModel's packer and its v1 <-> v2 zero-point conversion, layer by layer ------------------
# GPTQModel packs in the v2 convention in memory and converts to v1 (qzeros = zero - 1) when it saves;
# on load it converts v1 back to v2. These are the functions its save and load call.


@pytest.mark.parametrize("zero_min", [1, 0], ids=["zeros>=1", "zeros-from-0"])
@pytest.mark.parametrize("bits,gs,sym,act", [(4, 32, False, False), (4, 64, False, True), (3, 64, False, True),
                                             (3, 32, True, False), (2, 32, False, False), (8, 128, False, True),
                                             (4, -1, True, False)])
def test_gptqmodel_reads_lpq_layer_and_lpq_reads_gptqmodel_layer(bits, gs, sym, act, zero_min):
    """Both directions through GPTQModel's v1 conversion, including zero points of 0 (a group whose
    weights are all >= 0 on an asymmetric grid), which v1 can only hold as a wrapped field."""
    n, k = 64, 256
    spec, qw, (codes, scales, zeros, g_idx) = random_layer(bits, gs, sym, act, n=n, k=k, seed=bits, zero_min=zero_min)
    w = qw.dequantize()

    # lpq -> GPTQModel: our v1 tensors, converted by GPTQModel's loader, dequantized by its kernel
    ours = to_gptq(qw.tensors, spec, k, n)
    ql = TorchLinear(bits=bits, group_size=gs, sym=sym, desc_act=act, in_features=k, out_features=n, bias=False)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert getattr(ql, key).shape == ours[key].shape, key
        setattr(ql, key, ours[key].clone())
    convert_gptq_v1_to_v2_format_module(ql, bits=bits, pack_dtype=torch.int32)
    ql.post_init()
    assert torch.equal(ql.dequantize_weight().t().half(), w.half())

    # GPTQModel -> lpq: its packer (v2 in memory), then its save-time conversion to v1
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w.clone()
    ql = TorchLinear(bits=bits, group_size=gs, sym=sym, desc_act=act, in_features=k, out_features=n, bias=False)
    ql.pack_original(linear, scales.t().contiguous(), zeros.t().contiguous(),
                     (g_idx if g_idx is not None else group_index(k, gs)).clone())
    assert torch.equal(ql.qweight, ours["qweight"]) and torch.equal(ql.scales, ours["scales"])
    assert torch.equal(ql.qzeros, qw.tensors["qzeros"])  # v2: zero points as they are, as lpq stores them
    convert_gptq_v2_to_v1_format_module(ql, gptqmodel.QuantizeConfig(bits=bits, group_size=gs, sym=sym, desc_act=act))
    theirs = {key: getattr(ql, key) for key in ("qweight", "qzeros", "scales", "g_idx")}
    assert torch.equal(theirs["qzeros"], ours["qzeros"])  # the same v1 bytes as lpq's export
    spec2, back = from_gptq(theirs, bits, gs, sym, desc_act=act)
    assert torch.equal(QuantizedWeight(spec2, k, n, back).dequantize(), w)


# ---- a whole checkpoint written by GPTQModel, read by lpq ----------------------------------------


@pytest.mark.parametrize("bits,gs,sym,act", [(4, 32, False, True), (3, 64, True, False)])
def test_lpq_reads_gptqmodel_checkpoint(tmp_path, tokenizer, ids, monkeypatch, bits, gs, sym, act):
    # GPTQModel's CPU thread pool asks for 2 loader workers and refuses a machine where its default
    # (half the cores) gives fewer
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    # its packer otherwise JIT-builds a C++ speed-up (~45 s of g++ on 2 cores, once); the torch packer
    # writes the same words
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes its quantization logs under ./logs
    model = make_model("llama")
    model.config.dtype = torch.float16
    src = save_model(model, tokenizer, tmp_path / "tiny-llama")
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 100, (64,), generator=g).tolist(), "attention_mask": [1] * 64}
             for _ in range(16)]
    qconfig = gptqmodel.QuantizeConfig(bits=bits, group_size=gs, sym=sym, desc_act=act)
    gm = gptqmodel.GPTQModel.load(str(src), qconfig, device="cpu")
    gm.quantize(calib, batch_size=1, tokenizer=tokenizer, calibration_data_min_length=8)
    out = tmp_path / "gptqmodel-out"
    gm.save(str(out))

    ours16 = api.load(out, device="cpu", dtype=torch.float16)
    specs = [layer.spec for layer in lpq_layers(ours16).values()]
    assert specs and {(s.bits, s.group_size, s.sym, s.act_order) for s in specs} == {(bits, gs, sym, act)}
    theirs16 = transformers_load(out, torch.float16, backend="gptq_torch")
    assert_same_weights(theirs16, ours16)
    a, b = logits(ours16, ids), logits(theirs16, ids)
    ulp = 2.0 ** (math.floor(math.log2(float(a.abs().max()))) - 10)
    torch.testing.assert_close(a, b, rtol=0, atol=ulp)
