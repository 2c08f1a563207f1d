"""The fused epilogues of lpq's uniform CUDA kernel (RMSNorm folded in, swiglu of interleaved rows) against the
generic torch path of lpq.epilogue, for every kernel variant; and a decoder model fused for decode on the GPU.
Skips without CUDA (CI has none): run on the device."""

from __future__ import annotations

import pytest
import torch

import lpq
from lpq.epilogue import rms_scale, swiglu_interleaved
from lpq.formats.uniform import UNIFORM
from lpq.fuse import BLOCK_NORMS, GatedMLP, fuse_for_decode
from lpq.kernels import cuda_build, uniform_cuda
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

from conftest import compile_recording_graphs, make_model
from test_kernels_cuda import PDL_VARIANTS, TOL, poison_cache, random_qweight, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); run on the device")
EPS = 1e-5
CASES = ((True, False), (False, True), (True, True))  # (norm_x, swiglu)


def reference(x, h, w_ref, bias, norm: bool, swiglu: bool):
    """fp32: W (x * r(h)) + b, then silu(gate) * up of the interleaved rows."""
    xf = x.float() * rms_scale(h, EPS) if norm else x.float()
    y = xf @ w_ref.t() + (bias.float() if bias is not None else 0)
    return swiglu_interleaved(y) if swiglu else y


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", uniform_cuda.GEMM_VARIANTS + PDL_VARIANTS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_epilogues_of_every_variant_match_reference(bits, variant):
    """Each variant with 4 and 8 warps, every group size, fp16/bf16, with and without bias; m from 1 to 33 (one
    token tile, several, a partial one); n = 208 (13 n-tiles: the two-tile kernels' last tile is padding) and a
    long K with a partial chunk. Hidden states with a wide range of magnitudes; outputs poisoned before each call."""
    assert cuda_build.load(), cuda_build.failure_reason()
    gen = torch.Generator().manual_seed(1000 + bits * 16 + variant)
    shapes = [((208, 320), gs, dt) for gs in (32, 64, 128, -1) for dt in (torch.float16, torch.bfloat16)]
    shapes.append(((48, 4104), 128, torch.float16))
    for (n, k), gs, dtype in shapes:
        k = -(-k // {2: 16, 3: 32, 4: 8, 8: 8}[bits]) * {2: 16, 3: 32, 4: 8, 8: 8}[bits]
        qw = random_qweight(n, k, QuantSpec(bits=bits, group_size=gs), device="cuda", gen=gen)
        st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
        w_ref = UNIFORM.dequantize(qw.tensors, qw.spec, k, n).float()
        # 8-bit codes span 16x the 4-bit range: smaller inputs keep gate * up inside fp16 (the fp32 reference
        # does not overflow where the kernel's fp16 output would)
        c = 1 / 16 if bits == 8 else 1.0
        for m in (1, 3, 8, 9, 17, 33):
            h = (torch.randn((m, k), generator=gen) * torch.logspace(-1, 1, k) * c).to(dtype).cuda()
            wn = ((torch.rand(k, generator=gen) + 0.5) * c).to(dtype).cuda()
            x = (wn * h).to(dtype)
            bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if m % 2 else None
            for norm, swiglu in CASES:
                ref = reference(x, h, w_ref, bias, norm, swiglu)
                for warps in (4, 8):
                    poison_cache(m * n * 4 + (1 << 16), dtype)
                    y = uniform_cuda.gemm(st, x, bias, warps=warps, variant=variant, norm_x=h if norm else None,
                                          norm_eps=EPS, swiglu=swiglu)
                    torch.cuda.synchronize()
                    label = f"v{variant} w{warps} {qw.spec.label()} {n}x{k} m={m} {dtype} norm={norm} swiglu={swiglu}"
                    assert y.shape == (m, n // 2 if swiglu else n) and y.dtype == dtype, label
                    assert torch.isfinite(y).all(), f"{label}: unwritten outputs"
                    err = rel_err(y, ref)
                    assert err < 2 * TOL[dtype], f"{label}: rel err {err:.2e}"


@needs_cuda
@pytest.mark.cuda
def test_epilogue_argument_errors():
    assert cuda_build.load(), cuda_build.failure_reason()
    gen = torch.Generator().manual_seed(7)
    qw = random_qweight(40, 256, QuantSpec(bits=4, group_size=128), device="cuda", gen=gen)
    st = uniform_cuda.repack(qw.tensors, qw.spec, 256, 40)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="norm_x must be shaped"):
        uniform_cuda.gemm(st, x, None, norm_x=x[:1])
    with pytest.raises(ValueError, match="multiple of 16"):
        uniform_cuda.gemm(st, x, None, swiglu=True)  # 40 rows: not whole gate/up tiles


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 3])
def test_model_fused_for_decode_on_cuda(bits):
    """A quantized tiny Llama on the GPU (fp16): fuse_for_decode gives the unfused model's logits to fp16 error at
    m = 1 and in a batch (the dequantize path above LPQ_FUSED_MAX_M takes the torch epilogues), its linears run
    the CUDA kernel, and torch.compile traces a decode step as one graph."""
    model = make_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
    model = lpq.quantize(model, None, method="rtn", bits=bits, group_size=32, device="cpu").model.eval()
    model = model.to("cuda", torch.float16)
    inputs = [torch.randint(0, 100, s, generator=torch.Generator().manual_seed(4)).cuda() for s in ((1, 1), (2, 9), (1, 80))]
    with torch.no_grad():
        want = [model(ids).logits.float() for ids in inputs]
        report = fuse_for_decode(model, norms=BLOCK_NORMS)
        assert len(report["norms"]) == 4 and isinstance(model.model.layers[0].mlp, GatedMLP)
        for ids, w in zip(inputs, want):
            got = model(ids).logits.float()
            assert ((got - w).norm() / w.norm()).item() < 3e-3
    kernels = {type(m.kernel).__name__ for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert kernels == {"UniformCudaKernel"}, kernels
    compiled, graphs = compile_recording_graphs(model)
    with torch.no_grad():
        got = compiled(inputs[0]).logits.float()
    assert ((got - want[0]).norm() / want[0].norm()).item() < 3e-3
    assert len(graphs) == 1
