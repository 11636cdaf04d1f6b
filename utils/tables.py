"""Atomic writes of a result table and its Markdown twin (retrieval.py, probe.py)."""
from __future__ import annotations

import os
from pathlib import Path

from data.cache import tmp_path_for


def write_table(output: Path, csv_text: str, markdown: str) -> Path:
    """``output`` (CSV) and ``output.with_suffix(".md")``, each via a ``.tmp-`` sibling; returns the .md path."""
    md = output.with_suffix(".md")
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((output, csv_text), (md, markdown)):
        tmp = tmp_path_for(path)
        tmp.write_text(text)
        os.replace(tmp, path)
    return md
