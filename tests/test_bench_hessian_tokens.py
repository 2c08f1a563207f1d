"""bench/hessian_tokens.py: the per-token shares of trace(H) it reports."""

from __future__ import annotations

import torch

from conftest import load_bench_script


def test_token_shares():
    """Two windows of 4 tokens; the first token of window 2 is 10x larger than every other (||x||^2 100x):
    it alone carries 100 / 107 of trace(H); the window starts carry (1 + 100) / 107."""
    shares = load_bench_script("hessian_tokens").token_shares
    x = torch.ones(8, 3)
    x[4] *= 10.0
    s = shares(x, seqlen=4, top=1)
    assert abs(s["top_share"] - 100 / 107) < 1e-6
    assert abs(s["start_share"] - 101 / 107) < 1e-6
    assert s["max_abs"] == 10.0 and s["median_col_max"] == 10.0
    x[6, 1] = 50.0  # one entry beyond all others: its column is reported
    assert shares(x, seqlen=4, top=1)["max_col"] == 1
    # trace(H) itself: the shares are of sum ||x_t||^2, which is trace(x^T x)
    y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    s = shares(y, seqlen=8, top=16)
    assert abs(s["top_share"] - 1.0) < 1e-6
    want = (y[0].pow(2).sum() + y[8].pow(2).sum()) / torch.trace(y.t() @ y)
    assert abs(s["start_share"] - float(want)) < 1e-6
