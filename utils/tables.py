"""Atomic writes of a result table and its Markdown twin (retrieval.py, probe.py)."""
from __future__ import annotations

from pathlib import Path

from data.io import atomic_output


def write_table(output: Path, csv_text: str, markdown: str) -> Path:
    """``output`` (CSV) and ``output.with_suffix(".md")``, each via a ``.tmp-`` sibling; returns the .md path."""
    md = output.with_suffix(".md")
    for path, text in ((output, csv_text), (md, markdown)):
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    return md
