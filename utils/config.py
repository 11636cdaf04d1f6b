"""YAML files and ``key=value`` command-line overrides (the typed preset is ``utils/preset.py``).

A preset is read as a nested mapping. An override names a dotted key that must exist
in the preset (``optim.lr=3e-4``, ``data.crop_size=[40,48,72]``); its value is parsed as
YAML (its type is checked with the rest of the preset by ``utils.preset``). The resolved
config is written into the run directory so a run can be repeated.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from data.io import atomic_output
from utils.cli import UsageError


class ConfigError(UsageError, ValueError):
    """A preset or an override is malformed."""


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one from the current directory if it exists there,
    else from the repository root (so ``--config configs/x.yaml`` works from ``data/`` too)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def read_yaml(path: str | Path, *, flag: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (``path`` through :func:`resolve_path`);
    errors name the file and the command-line ``flag`` that sets it."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (set {flag})")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    return cfg


def set_by_path(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (which must exist) in ``cfg`` in place; types are checked by ``utils.preset``."""
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r} ({'.'.join(parts[: i + 1])} is not a section)")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}; known here: {', '.join(sorted(node))}")
    node[parts[-1]] = value


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``cfg`` with ``key=value`` strings applied in order."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        set_by_path(cfg, key.strip(), value)
    return cfg


def save_config(cfg: dict[str, Any], run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``run_dir/name`` and return the path."""
    path = Path(run_dir) / name
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path
