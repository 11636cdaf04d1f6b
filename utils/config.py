"""YAML presets with ``key=value`` command-line overrides.

A preset is a nested mapping. An override names a dotted key that must exist
in the preset (``optim.lr=3e-4``, ``data.crop_size=[40,48,72]``); its value
is parsed as YAML and must have the preset's type (an int is accepted where a
float is expected; a ``null`` preset value accepts anything). The resolved
config is written into the run directory so a run can be repeated.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from data.io import atomic_output


class ConfigError(ValueError):
    """A preset or an override is malformed."""


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one from the current directory if it exists there,
    else from the repository root (so ``--config configs/x.yaml`` works from ``data/`` too)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset; the top level must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (set --config)")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    return cfg


def _check_type(key: str, old: Any, new: Any) -> Any:
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, float)):
        return float(new)
    elif isinstance(old, float) and isinstance(new, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(new)
        except ValueError:
            pass
    elif isinstance(old, int) and isinstance(new, int):
        return new
    elif isinstance(old, str) and isinstance(new, str):
        return new
    elif isinstance(old, list) and isinstance(new, list):
        if old and new:
            return [_check_type(f"{key}[{i}]", old[0], v) for i, v in enumerate(new)]
        return new
    elif isinstance(old, dict) and isinstance(new, dict):
        return new
    raise ConfigError(
        f"override {key}: expected {type(old).__name__} like {old!r}, got {type(new).__name__} {new!r}"
    )


def set_by_path(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg`` in place, with the type check of the module docstring."""
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r} ({'.'.join(parts[: i + 1])} is not a section)")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}; known here: {', '.join(sorted(node))}")
    node[parts[-1]] = _check_type(key, node[parts[-1]], value)


def get_by_path(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    return node


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
