"""The training preset (``configs/ctrate.yaml``, ``configs/demo.yaml``) as typed dataclasses.

:func:`load_preset` is the one loader of a preset: it reads the YAML, applies command-line
values (``flags``: dotted key -> value of each flag given) and then ``key=value`` overrides,
casts every value to its field's type (the only place values are cast: an int is accepted
where a float is expected, a YAML 1.1 string such as ``3e-4`` too), refuses unknown and
missing keys, and checks the constraints between files:

- ``data.crop_size`` fits in the volumes: each axis at most the pipeline config's
  ``min_size_dhw``, the size the preprocess step pads every volume to (the presets use
  equality: the paper crop is the paper's minimum size, the demo crop the demo pipeline's);
- ``data.crop_size`` is a multiple of ``model.patch_size`` on each axis.

The pipeline config (``pipeline_config``) is loaded with the preset: ``preset.pipeline``.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union, get_args, get_origin, get_type_hints

from data.common import PipelineConfig, load_pipeline_config
from models.builder import ModelConfig
from utils.config import ConfigError, apply_overrides, read_yaml, resolve_path, set_by_path

AMP_MODES = ("none", "bf16")


@dataclass
class PathsConfig:
    data_root: str
    mae_weights: str | None
    text_encoder: str
    output_dir: str


@dataclass
class DataConfig:
    split: str
    crop_size: tuple[int, int, int]
    flip_prob: float
    workers: int


@dataclass
class OptimConfig:
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    betas: tuple[float, float]
    weight_decay: float
    epochs: int
    batch_size: int
    accum_steps: int
    amp: str
    max_steps: int | None = None  # stop after this many optimiser steps in all (smoke tests); None: every epoch
    chunk_size: int | None = None  # scans per chunk of engine.GradCache; None: the batch in one pass

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"optim.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if min(self.epochs, self.batch_size, self.accum_steps) < 1:
            raise ValueError("optim.epochs, optim.batch_size and optim.accum_steps must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.chunk_size is not None and not 1 <= self.chunk_size <= self.batch_size:
            raise ValueError(f"optim.chunk_size must be null or 1..optim.batch_size ({self.batch_size}), "
                             f"got {self.chunk_size}")


@dataclass
class TextPretrainConfig:
    """pretrain_text.py's settings (presets without a pre-trained text encoder)."""

    init: str
    epochs: int
    lr: float
    batch_size: int
    temperature: float


@dataclass
class Preset:
    seed: int
    pipeline_config: str
    zeroshot_items: str
    paths: PathsConfig
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    pipeline: PipelineConfig  # loaded from pipeline_config; not a YAML key
    text_pretrain: TextPretrainConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping of this preset (lists, not tuples), as saved into run directories."""
        out = _plain(dataclasses.asdict(self))
        del out["pipeline"]
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cast(key: str, kind: Any, value: Any) -> Any:
    """``value`` as type ``kind`` (a field annotation); ValueError naming ``key`` otherwise."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):  # X | None
        return None if value is None else _cast(key, next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            n = "a list" if args[-1] is Ellipsis else f"a list of {len(args)}"
            raise ValueError(f"{key}: expected {n}, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_cast(f"{key}[{i}]", k, v) for i, (k, v) in enumerate(zip(kinds, value)))
    if dataclasses.is_dataclass(kind):
        return _section(kind, key, value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")


def _field_values(cls: type, name: str, raw: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass ``cls`` from the mapping ``raw`` (section ``name``): every value cast,
    no key unknown or missing (``skip``: fields not read from YAML)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{name or 'top level'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    prefix = f"{name}." if name else ""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(fields)}")
    missing = [k for k, f in fields.items() if k not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(prefix + k for k in missing)}")
    return {k: _cast(prefix + k, hints[k], v) for k, v in raw.items()}


def _section(cls: type, name: str, raw: Any) -> Any:
    return cls(**_field_values(cls, name, raw))


def given_flags(args: Any, flag_keys: Mapping[str, str]) -> dict[str, Any]:
    """``{preset key: value}`` of the command-line flags given (not None) in the ``args`` namespace,
    for the ``flags`` of :func:`load_preset`; ``flag_keys`` maps each flag's ``dest`` to its key."""
    return {key: getattr(args, dest) for dest, key in flag_keys.items() if getattr(args, dest) is not None}


def load_preset(path: str | Path, overrides: Iterable[str] = (), *,
                flags: Mapping[str, Any] | None = None) -> Preset:
    """The preset at ``path`` with ``flags`` (dotted key -> value) and then
    ``overrides`` (``key=value``) applied; see the module docstring. Raises ``ConfigError`` naming
    the file, or ``PipelineError`` when its pipeline config is unusable."""
    raw = read_yaml(path, flag="--config")
    for key, value in (flags or {}).items():
        set_by_path(raw, key, value)
    raw = apply_overrides(raw, overrides)
    try:
        values = _field_values(Preset, "", raw, skip=("pipeline",))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    pipeline = load_pipeline_config(resolve_path(values["pipeline_config"]))
    preset = Preset(**values, pipeline=pipeline)
    crop, patch, min_size = preset.data.crop_size, preset.model.patch_size, pipeline.min_size_dhw
    if any(c > m for c, m in zip(crop, min_size)):
        raise ConfigError(f"{path}: data.crop_size {list(crop)} exceeds min_size_dhw {list(min_size)} of "
                          f"{preset.pipeline_config}, the size volumes are padded to: set data.crop_size <= it")
    if any(c % p for c, p in zip(crop, patch)):
        raise ConfigError(f"{path}: data.crop_size {list(crop)} is not a multiple of model.patch_size {list(patch)}")
    return preset
