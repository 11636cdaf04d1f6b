"""What every entry point shares: the error a user can act on, and how ``main`` turns it into exit 2.

Library code raises a subclass of :class:`UsageError` for any input or state it cannot use; the
message is one line that names the file or flag, says what is wrong and what to do. Entry points
wrap their work in :func:`run_main`, which prints ``{prog}: error: {message}`` on stderr and
returns 2. Nothing else is caught there: a bug still ends in a traceback (exit 1).

Entry points parse their flags before importing torch and the model code (those imports live in the functions
that do the work), so ``--help`` and flag errors come at once; this module therefore imports nothing heavy, and
holds the flags shared by the tools that score a checkpoint (:func:`checkpoint_args_parser`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Mapping

DEFAULT_PRESET = "configs/ctrate.yaml"  # every entry point's default --config
EXIT_UNUSABLE = 2  # the run did not start or stopped on an input it cannot use; nothing was written


class UsageError(Exception):
    """An input, flag or on-disk state the run cannot use (one-line message: what, why, what to do)."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the run needs does not exist (the message names it and the flag that sets it)."""


def run_main(prog: str, work: Callable[[], object]) -> int:
    """The exit status ``work()`` returns (an int; any other result, e.g. a report, means 0); a
    :class:`UsageError` becomes one line on stderr and exit 2."""
    try:
        status = work()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNUSABLE
    return status if isinstance(status, int) else 0


# the feature arrays of an embeddings file (utils.embeddings), probe.py's --features choices
FEATURE_KINDS = ("projected", "pooled")
# command-line flag -> preset key (the flag wins over the preset; key=value overrides win over both)
CHECKPOINT_FLAG_KEYS = {"data_root": "paths.data_root", "text_encoder": "paths.text_encoder",
                        "output_dir": "paths.output_dir", "items": "zeroshot_items"}


def checkpoint_args_parser() -> argparse.ArgumentParser:
    """The flags of the tools that score a checkpoint on a processed split (eval, embed, retrieval)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=DEFAULT_PRESET,
                   help=f"training preset (model size, pipeline config; default: {DEFAULT_PRESET})")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint: ours or the released fVLM weights (default: latest checkpoint_*.pth in --output-dir)")
    p.add_argument("--output-dir", dest="output_dir",
                   help="training output directory searched for the default checkpoint (default: the preset's)")
    p.add_argument("--data-root", dest="data_root",
                   help="root holding processed_{split}_images/ and _masks/ (default: the preset's, 'data')")
    p.add_argument("--items", help="test items, prompts and roi (default: the preset's zeroshot_items)")
    p.add_argument("--text-encoder", dest="text_encoder",
                   help="text encoder directory for config + vocabulary (default: the preset's)")
    p.add_argument("--split", default="valid", help="processed split (default: valid)")
    p.add_argument("--no-pbar", dest="pbar", action="store_false", help="no progress bar (cluster logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. model.depth=4")
    return p


def preset_defaults(flag_keys: Mapping[str, str], preset: str = DEFAULT_PRESET) -> str:
    """``--help``'s epilog: the value each flag of ``flag_keys`` (dest -> dotted preset key) takes from the default
    preset when it is not given (read as plain YAML: no model code is imported)."""
    import yaml

    with open(Path(__file__).resolve().parents[1] / preset, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    lines = []
    for dest, key in flag_keys.items():
        value = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        lines.append(f"  --{dest.replace('_', '-'):<20} {value}")
    return f"flags not given take the --config preset's values; {preset}'s:\n" + "\n".join(lines)
