"""Helpers shared by the bench scripts: replace one section of bench/RESULTS.md, write JSON records."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS_MD = BENCH / "RESULTS.md"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> str:
    import transformers

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return f"torch {torch.__version__}{cuda}, transformers {transformers.__version__}, Python {platform.python_version()}"


def write_section(heading: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the '## heading' section of RESULTS.md (or append it), leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# lpq benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    new = [f"## {heading}", "", *body.strip("\n").splitlines(), ""]
    if start is None:
        lines = lines + [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + new + lines[end:]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def write_records(name: str, records: list[dict]) -> Path:
    out = BENCH / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    return out


def publish(section: str, records_name: str, records: list[dict], body: str, write: bool = True) -> None:
    """Print a bench's section body; unless ``write`` is false, also write its records (bench/results/<records_name>
    .json) and its section of RESULTS.md."""
    if write:
        write_records(records_name, records)
        write_section(section, body)
    print(body)

