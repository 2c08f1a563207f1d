"""The ``squeezellm`` format: per-row codebooks (lookup tables) plus an exact sparse part in CSR.

Per linear layer (N = out_features, K = in_features, b = bits in 2, 3, 4, nnz = spec.options["nnz"]):
  qweight    int32 [K * b / 32, N]  b-bit codebook indices, packed along K exactly as in ``uniform``
  lut        fp16  [N, 2**b]        the codebook of each output row
  sp_rowptr  int32 [N + 1]          CSR row pointers of the sparse part   } only when nnz > 0
  sp_col     int32 [nnz]            column of each sparse weight          }
  sp_val     fp16  [nnz]            its exact (fp16) value                }

Weight: W[n, k] = lut[n, idx[n, k]], except at the sparse positions, where W[n, k] = sp_val: the
dense part counts as zero there and the sparse value is added. (The index stored at a sparse position
is the row's centroid nearest to zero; a kernel that adds the sparse part on top of the full dense
product subtracts lut[n, idx[n, k]] for those entries.) The number of sparse weights depends on the
data, so it is recorded per module in ``spec.options["nnz"]`` and the tensor shapes follow from
(K, N, spec) alone.
"""

from __future__ import annotations

import torch

from ..errors import FormatError
from ..progress import GLOBAL_TIMER
from ..spec import QuantSpec
from . import PackedFormat, QuantizedWeight, register_format
from .packing import chunk_shape, pack_rows, packed_length, unpack_rows

SQUEEZELLM_BITS = (2, 3, 4)


def spec_nnz(spec: QuantSpec) -> int:
    return int((spec.options or {}).get("nnz", 0) or 0)


class SqueezeLLMFormat(PackedFormat):
    name = "squeezellm"
    version = 1

    def check_shape(self, in_features: int, out_features: int, spec: QuantSpec, layer: str = "") -> None:
        where = f"layer {layer} " if layer else ""
        if spec.bits not in SQUEEZELLM_BITS:
            raise FormatError(
                f"{where}asks for {spec.bits}-bit squeezellm codebooks: the format holds 2, 3 or 4 bits"
            )
        per_chunk, _ = chunk_shape(spec.bits)
        if in_features % per_chunk:
            raise FormatError(
                f"{where}has in_features={in_features}, but {spec.bits}-bit packing needs a multiple of "
                f"{per_chunk}: choose other bits or exclude it with --ignore"
            )
        nnz = spec_nnz(spec)
        if nnz < 0 or nnz > in_features * out_features:
            raise FormatError(f"{where}records nnz={nnz} sparse weights, impossible for its shape: the config is damaged")

    def tensor_shapes(self, in_features, out_features, spec):
        self.check_shape(in_features, out_features, spec)
        shapes = {
            "qweight": ((packed_length(in_features, spec.bits), out_features), torch.int32),
            "lut": ((out_features, 1 << spec.bits), torch.float16),
        }
        nnz = spec_nnz(spec)
        if nnz:
            shapes["sp_rowptr"] = ((out_features + 1,), torch.int32)
            shapes["sp_col"] = ((nnz,), torch.int32)
            shapes["sp_val"] = ((nnz,), torch.float16)
        return shapes

    def unpack(self, tensors, spec: QuantSpec, in_features: int, out_features: int):
        """-> idx [N, K] int64, lut [N, 2**b] float32, (rows, cols, vals) of the sparse part (or None)."""
        idx = unpack_rows(tensors["qweight"], spec.bits, in_features).t().long()
        lut = tensors["lut"].float()
        if "sp_val" not in tensors or tensors["sp_val"].numel() == 0:
            return idx, lut, None
        rowptr = tensors["sp_rowptr"].long()
        counts = rowptr[1:] - rowptr[:-1]
        rows = torch.repeat_interleave(torch.arange(out_features, device=rowptr.device), counts)
        return idx, lut, (rows, tensors["sp_col"].long(), tensors["sp_val"].float())

    def dequantize(self, tensors, spec, in_features, out_features):
        idx, lut, sparse = self.unpack(tensors, spec, in_features, out_features)
        w = torch.gather(lut, 1, idx)  # [N, K]
        if sparse is not None:
            rows, cols, vals = sparse
            w[rows, cols] = 0.0  # the dense part is zero at the sparse positions ...
            w.index_put_((rows, cols), vals, accumulate=True)  # ... and the exact value is added
        return w

    def _parts(self, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> idx [N, K], lut [N, 2**b] fp16, and the sparse part as a mask [N, K] with its values [N, K] fp16
        (None, None for a dense-only layer): what :func:`pack_squeezellm` takes."""
        idx, _, sparse = self.unpack(weight.tensors, weight.spec, weight.in_features, weight.out_features)
        lut = weight.tensors["lut"]
        if sparse is None:
            return idx, lut, None, None
        rows, cols, vals = sparse
        mask = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        mask[rows, cols] = True
        values = torch.zeros(idx.shape, dtype=torch.float16, device=idx.device)
        values[rows, cols] = vals.to(torch.float16)
        return idx, lut, mask, values

    @staticmethod
    def _without_nnz(spec: QuantSpec) -> QuantSpec:
        return spec.replace(options={k: v for k, v in (spec.options or {}).items() if k != "nnz"})

    def concat_outputs(self, weights):
        """Rows joined: indices, codebooks and sparse parts (a dense-only layer contributes no entries) packed again.
        Only layers of one width and one spec (but for their sparse counts) join."""
        first = weights[0]
        if any(self._without_nnz(w.spec) != self._without_nnz(first.spec) or w.in_features != first.in_features
               for w in weights):
            return None
        parts = [self._parts(w) for w in weights]
        idx = torch.cat([p[0] for p in parts])
        lut = torch.cat([p[1] for p in parts])
        mask = values = None
        if any(p[2] is not None for p in parts):
            mask = torch.cat([p[2] if p[2] is not None else torch.zeros_like(p[0], dtype=torch.bool) for p in parts])
            values = torch.cat([p[3] if p[3] is not None else torch.zeros_like(p[0], dtype=torch.float16) for p in parts])
        return pack_squeezellm(idx, lut, mask, values, first.spec)

    def permute_outputs(self, weight, order):
        """Rows (indices, codebook and sparse entries) taken in ``order`` and packed again."""
        idx, lut, mask, values = self._parts(weight)
        order = order.to(idx.device).long()
        if order.numel() != weight.out_features or not torch.equal(
                torch.sort(order).values, torch.arange(weight.out_features, device=order.device)):
            raise ValueError(f"permute_outputs: order must be a permutation of range({weight.out_features})")
        return pack_squeezellm(idx[order], lut[order], mask[order] if mask is not None else None,
                               values[order] if values is not None else None, weight.spec)


SQUEEZELLM = register_format(SqueezeLLMFormat())


def to_csr(mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask [N, K] bool, values [N, K] -> (rowptr int32 [N+1], col int32 [nnz], val fp16 [nnz]), row-major."""
    n = mask.shape[0]
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order, columns ascending within a row
    counts = torch.bincount(rows, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    return rowptr.to(torch.int32), cols.to(torch.int32), values[rows, cols].to(torch.float16)


def pack_squeezellm(
    idx: torch.Tensor,
    lut: torch.Tensor,
    sparse_mask: torch.Tensor | None,
    weight: torch.Tensor | None,
    spec: QuantSpec,
    layer: str = "",
) -> QuantizedWeight:
    """idx [N, K] codebook indices, lut [N, 2**b], the sparse positions [N, K] bool and the weight whose
    values they keep (fp16) -> a packed QuantizedWeight whose spec records format and nnz."""
    n, k = idx.shape
    nnz = int(sparse_mask.sum()) if sparse_mask is not None else 0
    spec = spec.replace(format="squeezellm", group_size=-1, act_order=False,
                        options={**(spec.options or {}), "nnz": nnz})
    SQUEEZELLM.check_shape(k, n, spec, layer)
    if lut.shape != (n, 1 << spec.bits):
        raise ValueError(f"lut must be [{n}, {1 << spec.bits}], got {tuple(lut.shape)}")
    with GLOBAL_TIMER.phase("pack"):
        tensors = {
            "qweight": pack_rows(idx.t(), spec.bits),
            "lut": lut.to(torch.float16).contiguous(),
        }
        if nnz:
            rowptr, col, val = to_csr(sparse_mask, weight)
            tensors.update(sp_rowptr=rowptr, sp_col=col, sp_val=val)
        if idx.is_cuda:
            torch.cuda.synchronize(idx.device)
    return QuantizedWeight(spec, k, n, tensors)
