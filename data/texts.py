"""Anatomy-wise report texts (spec §3).

For anatomy ``o`` of scan ``s``:

- ``conc = conc_info[s][o]`` with a final "." added when missing, or the normal
  template ``"{o} shows no significant abnormalities."`` when there is no
  conclusion for ``o``;
- ``desc = desc_info[s][o]`` with a final "." added when missing, or "";
- text = conc + desc (no separator, as in the release), with ``"``, ``'``,
  ``(`` and ``)`` removed.

The anatomy is abnormal when its text does not start with the template.
Before encoding, a normal text longer than the bare template loses the template
prefix (spec §5); the raw text stays the identity used for the false-negative
targets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from utils.cli import MissingInputError


REPORT_JSONS = ("desc_info.json", "conc_info.json")  # the anatomy-wise texts under the data root (spec §1)
_REMOVED_CHARS = str.maketrans("", "", "\"'()")


def normal_template(anatomy: str) -> str:
    """The release's text for an anatomy without findings."""
    return f"{anatomy} shows no significant abnormalities."


def _with_period(text: str) -> str:
    return text if text.endswith(".") else text + "."


def compose_anatomy_text(
    scan_id: str,
    anatomy: str,
    desc_info: Mapping[str, Mapping[str, str]],
    conc_info: Mapping[str, Mapping[str, str]],
) -> str:
    """Text of ``anatomy`` for ``scan_id`` from the decomposed report (spec §3).

    An empty or whitespace-only entry counts as missing.
    """
    conc = (conc_info.get(scan_id) or {}).get(anatomy) or ""
    desc = (desc_info.get(scan_id) or {}).get(anatomy) or ""
    conc = _with_period(conc) if conc.strip() else normal_template(anatomy)
    desc = _with_period(desc) if desc.strip() else ""
    return (conc + desc).translate(_REMOVED_CHARS)


def is_abnormal(text: str, anatomy: str) -> bool:
    """True when ``text`` does not start with the anatomy's normal template."""
    return not text.startswith(normal_template(anatomy))


def text_for_encoding(text: str, anatomy: str) -> str:
    """The string fed to the text encoder (spec §5).

    A normal text longer than the bare template is encoded without the
    template prefix; the bare template and abnormal texts are encoded as is.
    """
    template = normal_template(anatomy)
    if text.startswith(template) and len(text) > len(template):
        return text[len(template):].strip()
    return text


def text_hash(text: str) -> int:
    """Stable signed 64-bit hash of a text, identical in every process.

    Python's ``hash`` is salted per process, so ranks could disagree on it.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def load_report_json(path: str | Path) -> dict[str, Any]:
    """``desc_info.json`` / ``conc_info.json``: ``{scan_id: {anatomy: text}}``; ``MissingInputError``
    names the file and the flag to set."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} not found (anatomy-wise report texts, spec §1; set --data-root)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
