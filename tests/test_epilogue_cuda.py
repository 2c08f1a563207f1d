"""The fused epilogues of lpq's uniform CUDA kernel (RMSNorm folded in from h or from sums of squares, swiglu of
interleaved rows, the residual add with the next norm's input and sums of squares) against the generic torch path of
lpq.epilogue, for every kernel variant; and decoder models fused for decode on the GPU (blocks included).
Skips without CUDA (CI has none): run on the device."""

from __future__ import annotations

import pytest
import torch

import lpq
from lpq.epilogue import rms_scale, swiglu_interleaved
from lpq.formats.uniform import UNIFORM
import lpq.attention
import lpq.fuse
from lpq.fuse import BLOCK_NORMS, DecodeBlock, GatedMLP, fuse_for_decode
from lpq.kernels import cuda_build, uniform_cuda
from lpq.nn import QuantizedLinear
from lpq.spec import QuantSpec

from conftest import (assert_step_compiles_whole_and_replays, compile_recording_graphs, counted_calls, decode_bench,
                      decode_inputs, forced_step_logits, make_model, tiny_cuda_llama)
from test_kernels_cuda import PDL_VARIANTS, TOL, poison_cache, random_qweight, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); run on the device")
EPS = 1e-5
CASES = ((True, False), (False, True), (True, True))  # (norm_x, swiglu)


def reference(x, h, w_ref, bias, norm: bool, swiglu: bool):
    """fp32: W (x * r(h)) + b, then silu(gate) * up of the interleaved rows."""
    xf = x.float() * rms_scale(h, EPS) if norm else x.float()
    y = xf @ w_ref.t() + (bias.float() if bias is not None else 0)
    return swiglu_interleaved(y) if swiglu else y


def epilogue_layers(bits: int, group_sizes, gen: torch.Generator):
    """Random packed layers on the GPU for the epilogue tests: n = 208 (13 n-tiles: the two-tile kernels' last tile is
    padding) with each group size in fp16 and bf16, then a long K with a partial chunk. Yields (n, k, dtype, qw, the
    kernel state, the fp32 dequantized weight, c): c scales the inputs (8-bit codes span 16x the 4-bit range; smaller
    inputs keep gate * up inside fp16, where the fp32 reference would not overflow but the kernel's output would)."""
    assert cuda_build.load(), cuda_build.failure_reason()
    shapes = [((208, 320), gs, dt) for gs in group_sizes for dt in (torch.float16, torch.bfloat16)]
    shapes.append(((48, 4104), 128, torch.float16))
    step = {2: 16, 3: 32, 4: 8, 8: 8}[bits]  # K a multiple of the codes' packing
    for (n, k), gs, dtype in shapes:
        k = -(-k // step) * step
        qw = random_qweight(n, k, QuantSpec(bits=bits, group_size=gs), device="cuda", gen=gen)
        st = uniform_cuda.repack(qw.tensors, qw.spec, k, n)
        yield n, k, dtype, qw, st, UNIFORM.dequantize(qw.tensors, qw.spec, k, n).float(), 1 / 16 if bits == 8 else 1.0


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", uniform_cuda.GEMM_VARIANTS + PDL_VARIANTS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_epilogues_of_every_variant_match_reference(bits, variant):
    """Each variant with 4 and 8 warps, every group size, fp16/bf16, with and without bias; m from 1 to 33 (one
    token tile, several, a partial one); n = 208 (13 n-tiles: the two-tile kernels' last tile is padding) and a
    long K with a partial chunk. Hidden states with a wide range of magnitudes; outputs poisoned before each call."""
    gen = torch.Generator().manual_seed(1000 + bits * 16 + variant)
    for n, k, dtype, qw, st, w_ref, c in epilogue_layers(bits, (32, 64, 128, -1), gen):
        for m in (1, 3, 8, 9, 17, 33):
            h = (torch.randn((m, k), generator=gen) * torch.logspace(-1, 1, k) * c).to(dtype).cuda()
            wn = ((torch.rand(k, generator=gen) + 0.5) * c).to(dtype).cuda()
            x = (wn * h).to(dtype)
            bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if m % 2 else None
            # the same rms scale from sums of squares split in slots: one, a few, and more than a block's threads
            sq_split = {s_: split_squares(h, s_, gen) for s_ in (1, 5, 300)}
            for norm, swiglu in CASES + ((("sq", 1), False), (("sq", 5), True), (("sq", 300), False)):
                ref = reference(x, h, w_ref, bias, bool(norm), swiglu)
                for warps in (4, 8):
                    poison_cache(m * n * 4 + (1 << 16), dtype)
                    y = uniform_cuda.gemm(st, x, bias, warps=warps, variant=variant,
                                          norm_x=h if norm is True else None, norm_eps=EPS, swiglu=swiglu,
                                          norm_sq=sq_split[norm[1]] if isinstance(norm, tuple) else None)
                    torch.cuda.synchronize()
                    label = f"v{variant} w{warps} {qw.spec.label()} {n}x{k} m={m} {dtype} norm={norm} swiglu={swiglu}"
                    assert y.shape == (m, n // 2 if swiglu else n) and y.dtype == dtype, label
                    assert torch.isfinite(y).all(), f"{label}: unwritten outputs"
                    err = rel_err(y, ref)
                    assert err < 2 * TOL[dtype], f"{label}: rel err {err:.2e}"


def split_squares(h: torch.Tensor, slots: int, gen: torch.Generator) -> torch.Tensor:
    """sum(h^2) of each row [m, k] split into ``slots`` float32 parts at random cut points -> [m, slots]."""
    sq = h.float().pow(2)
    cuts = torch.sort(torch.randint(0, h.shape[1] + 1, (slots - 1,), generator=gen)).values.tolist()
    edges = [0, *cuts, h.shape[1]]
    return torch.stack([sq[:, a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], dim=1).contiguous()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", uniform_cuda.GEMM_VARIANTS + PDL_VARIANTS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_residual_epilogue_of_every_variant_matches_reference(bits, variant):
    """gemm_residual: h = y + residual, next_w * h exactly as torch forms it from h, and each 16-output tile's sum of
    h^2 (padding tiles 0), deterministic; every variant with 4 and 8 warps, fp16/bf16, m from 1 to 33, n = 208 (the
    last tile is padding for the two-tile kernels) and a long K; outputs poisoned before each call."""
    gen = torch.Generator().manual_seed(2000 + bits * 16 + variant)
    for n, k, dtype, qw, st, w_ref, c in epilogue_layers(bits, (32, 128, -1), gen):
        n_tiles = st["sc"].shape[1]
        for m in (1, 3, 8, 9, 17, 33):
            x = (torch.randn((m, k), generator=gen) * c).to(dtype).cuda()
            res = (torch.randn((m, n), generator=gen) * 4).to(dtype).cuda()
            nw = (torch.rand(n, generator=gen) + 0.5).to(dtype).cuda()
            bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if m % 2 else None
            want_h = reference(x, None, w_ref, bias, False, False) + res.float()
            for warps in (4, 8):
                label = f"v{variant} w{warps} {qw.spec.label()} {n}x{k} m={m} {dtype}"
                outs = []
                for _ in range(2):
                    poison_cache(3 * m * n * 4 + (1 << 16), dtype)
                    outs.append(uniform_cuda.gemm_residual(st, x, bias, res, nw, warps=warps, variant=variant))
                    torch.cuda.synchronize()
                h, x_next, sq = outs[0]
                assert h.shape == x_next.shape == (m, n) and sq.shape == (m, n_tiles) and sq.dtype == torch.float32
                assert torch.isfinite(h).all() and torch.isfinite(x_next).all(), f"{label}: unwritten outputs"
                err = rel_err(h, want_h)
                assert err < 2 * TOL[dtype], f"{label}: rel err {err:.2e}"
                assert torch.equal(x_next, nw * h), f"{label}: next_w * h"
                tiles = torch.zeros((m, n_tiles * 16), device="cuda")
                tiles[:, :n] = h.float().pow(2)
                torch.testing.assert_close(sq, tiles.view(m, n_tiles, 16).sum(-1), rtol=1e-5, atol=1e-5, msg=label)
                assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])), f"{label}: not deterministic"


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
    sq = torch.ones(2, 3, device="cuda")
    with pytest.raises(ValueError, match="norm_sq must be"):
        uniform_cuda.gemm(st, x, None, norm_sq=sq.half())
    with pytest.raises(ValueError, match="not both"):
        uniform_cuda.gemm(st, x, None, norm_x=x, norm_sq=sq)
    res = torch.zeros(2, 40, device="cuda", dtype=torch.float16)
    nw = torch.ones(40, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="residual must be"):
        uniform_cuda.gemm_residual(st, x, None, res[:, :8], nw)
    with pytest.raises(ValueError, match="next_w must be"):
        uniform_cuda.gemm_residual(st, x, None, res, nw.float())
    with pytest.raises(RuntimeError, match="residual must be"):  # the op's own check
        torch.ops.lpq_cuda.uniform_gemm_residual(x, st["qw"], st["sc"], st["zp"], None, 4, st["fold"], st["gs"], 40, 256,
                                                 4, 0, res[:1], nw)


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


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("bits,pdl", [(None, False), (4, False), (3, False), (4, True), (3, True)])
def test_model_with_fused_blocks_matches_unfused_eager_compiled_and_graphed(bits, pdl, monkeypatch):
    """A tiny Llama (fp16, head size 64, no grouped heads), fp16 or quantized, decoding through a static cache under
    lpq attention with its blocks fused (lpq.fuse.DecodeBlock): every decode step of every block takes the fused
    path (o_proj and down_proj with the residual epilogue: 3 calls a step for 2 blocks), the logits equal the
    unfused model's, the compiled step is one graph, and the graph's replay gives the step's own tokens. With pdl
    the projections launch with programmatic dependent launch (LPQ_PDL=1), each after the attention kernel or another
    projection that lets it in early: one that read its inputs before they were written would break the equality."""
    import copy

    monkeypatch.setattr(uniform_cuda, "PDL", pdl)
    decode = decode_bench()
    model = tiny_cuda_llama(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
    if bits is not None:
        model = lpq.quantize(model.float().cpu(), None, method="rtn", bits=bits, group_size=64,
                             device="cpu").model.eval().to("cuda", torch.float16)
    prompt, forced = decode_inputs()
    with torch.no_grad():
        want = forced_step_logits(decode.Decoder(model, prompt, 10, "eager"), forced)
        fused = copy.deepcopy(model)
        lpq.attention.enable(fused)
        assert len(fuse_for_decode(fused, blocks=True)["blocks"]) == 2
        with counted_calls(lpq.fuse, "linear_residual") as calls:
            got = forced_step_logits(decode.Decoder(fused, prompt, 10, "eager"), forced)
        assert len(calls) == 8 * 3
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
        if bits is not None:
            kernels = {type(m.kernel).__name__ for m in fused.modules() if isinstance(m, QuantizedLinear)}
            assert kernels == {"UniformCudaKernel"}, kernels
        assert_step_compiles_whole_and_replays(decode, fused, prompt)
    assert isinstance(fused.model.layers[0], DecodeBlock)
    torch._dynamo.reset()
