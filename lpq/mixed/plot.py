"""Perplexity against true bits per weight: the size/quality Pareto front, as a PNG.

Reads quality records (PROTOCOL §6: ``bpw``, ``perplexity``, and ``series`` when the bench wrote one,
else the series is ``method`` plus ``options``). matplotlib is not a dependency of lpq: without it,
:func:`plot_records` raises a one-line error saying how to get it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LpqError


def read_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise LpqError(f"results file {p} not found: give a bench/results/*.json file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise LpqError(f"{p} is not valid JSON: give a bench/results/*.json file") from None
        if not isinstance(data, list):
            raise LpqError(f"{p} is not a list of records: give a quality results file")
        records.extend(r for r in data if isinstance(r, dict) and r.get("bpw") is not None
                       and r.get("perplexity") is not None)
    if not records:
        raise LpqError("no record with both bpw and perplexity in the given files")
    return records


def series_of(r: dict[str, Any]) -> str:
    if r.get("series"):
        return str(r["series"])
    opts = f" {r['options']}" if r.get("options") else ""
    return f"{r.get('method', '?')}{opts}"


def group_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """series -> [(bpw, perplexity, label)] sorted by bpw."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        label = r.get("label") or (f"w{r['bits']}" if r.get("bits") is not None else "")
        out.setdefault(series_of(r), []).append((float(r["bpw"]), float(r["perplexity"]), str(label)))
    return {k: sorted(v) for k, v in out.items()}


def plot_records(records: list[dict[str, Any]], out: str | Path, title: str = "", log_y: bool = True,
                 max_bpw: float | None = None) -> Path:
    """Draw each series as a line of (bpw, perplexity) points; unquantized runs (bpw 16) as a
    horizontal reference line. Writes ``out`` (PNG) and returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LpqError("lpq plot needs matplotlib, which lpq does not depend on: pip install matplotlib") from None
    groups = group_series(records)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, pts in groups.items():
        quant = [p for p in pts if p[0] < 16 and (max_bpw is None or p[0] <= max_bpw)]
        if not quant:
            ax.axhline(pts[0][1], linestyle=":", color="grey", label=f"{name} ({pts[0][1]:.2f})")
            continue
        xs, ys = [p[0] for p in quant], [p[1] for p in quant]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, lab in quant:
            if lab:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("bits per weight (quantized linears, all overheads counted)")
    ax.set_ylabel("perplexity")
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
