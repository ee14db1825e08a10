"""Shared by the benchmark scripts: the machine's description and docs/performance.md sections."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"


def machine() -> str:
    """CPU model, cores, RAM and the versions that matter, in one line."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import ray
    import torch

    return (f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, {ram:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")


def write_section(begin: str, end: str, heading: str, text: str) -> None:
    """Put ``text`` between the ``begin`` and ``end`` markers of docs/performance.md, or append
    it under ``heading`` (a markdown heading line) when the markers are not there yet."""
    doc = DOC.read_text() if DOC.is_file() else "# Performance\n\n"
    body = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + body + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + f"\n\n{heading}\n\n{body}\n"
    DOC.write_text(doc)
