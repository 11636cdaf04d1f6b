"""Shared parts of the four data steps (spec §2): config, case lists, the step runner, the CLI.

Each step module (``fix_data``, ``generate_mask``, ``resize``, ``preprocess``)
has per-case functions that only touch their own input and output paths, a
``run(data_root, split, *, overwrite, workers, shard, ...) -> RunSummary`` and a
thin ``main(argv=None) -> int``. The runner here:

- lists the cases (volume names such as ``train_1_a_2.nii.gz``), sorts them and
  keeps ``cases[K::N]`` for ``--shard K/N`` (K is 0-based), so N array jobs
  cover every volume exactly once;
- skips a case whose outputs all exist, unless ``overwrite``; outputs are always
  written to a ``.tmp-{name}`` sibling and renamed (``os.replace``), so a killed
  run never leaves a truncated file under the final name, and a stale
  ``.tmp-`` file is overwritten by the next attempt;
- runs the cases inline (``workers == 1``) or in a ``ProcessPoolExecutor`` whose
  futures are checked one by one: a case that raises, or whose worker process
  dies, is a failed case, never a hang;
- writes ``{step}_{split}_failures.csv`` (columns ``volume,reason``; header only
  when nothing failed) in the data root, replacing the previous run's file. With
  ``--shard K/N`` and N > 1 the name is ``{step}_{split}_shard{K}of{N}_failures.csv``,
  so concurrent shards never write the same file;
- logs one summary line (processed / skipped / failed).

``main`` returns 0 when nothing failed, 1 when some case failed, 2 when the run
could not start (missing input folder or metadata, bad config, TotalSegmentator
weights not installed).

Functions ``predict.py`` reuses on in-memory data: ``data.fix_data.fix_geometry``,
``data.resize.build_label_lut`` / ``merge_labels`` / ``resample_case`` (SimpleITK
images) and ``data.preprocess.crop_pad_case`` (``(D, H, W)`` arrays).
"""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml
from tqdm import tqdm

from data.io import write_case_csv
from utils.config import resolve_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/pipeline.yaml")
SPLITS = ("train", "valid")
METADATA_FILES = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
NIFTI_GZ = ".nii.gz"


class PipelineError(Exception):
    """A step cannot run at all (bad config, missing input folder or metadata, no weights)."""


class CaseError(PipelineError):
    """One volume cannot be processed; ``reason`` goes into the failures CSV."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class PipelineConfig:
    """Pipeline settings (``configs/pipeline.yaml``); anatomy id k is ``anatomy_names[k - 1]``."""

    anatomy_names: list[str]
    anatomy_classes: list[list[str]]
    target_spacing_xyz: tuple[float, float, float]
    hu_window: tuple[float, float]
    crop_margin_dhw: tuple[int, int, int]
    min_size_dhw: tuple[int, int, int]

    @property
    def n_anatomies(self) -> int:
        return len(self.anatomy_names)

    @property
    def pad_hu(self) -> int:
        """int16 value written for padding: the window's low end, which ``scale_hu`` maps to 0."""
        return max(int(self.hu_window[0] // 1), -32768)



def _numbers(cfg: dict, key: str, n: int, kind: type) -> tuple:
    value = cfg.get(key)
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise PipelineError(f"pipeline config: {key} must be a list of {n} numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise PipelineError(f"pipeline config: {key} must hold integers, got {value!r}")
    return tuple(kind(v) for v in value)


def load_pipeline_config(path: str | Path | None = None) -> PipelineConfig:
    """Read the pipeline YAML and its anatomy map (``anatomies: [{name, classes}]``)."""
    path = resolve_path(path if path is not None else DEFAULT_CONFIG)
    if not path.is_file():
        raise PipelineError(f"pipeline config not found: {path} (set --config)")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "anatomy_map" not in cfg:
        raise PipelineError(f"{path}: expected a mapping with an 'anatomy_map' key")
    map_path = resolve_path(cfg["anatomy_map"])
    if not map_path.is_file():
        raise PipelineError(f"{path}: anatomy map not found: {map_path}")
    with open(map_path) as f:
        anatomies = (yaml.safe_load(f) or {}).get("anatomies")
    if not isinstance(anatomies, list) or not anatomies or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("classes"), list)
            and a["classes"] for a in anatomies):
        raise PipelineError(f"{map_path}: 'anatomies' must be a non-empty list of {{name, classes}}")
    spacing = _numbers(cfg, "target_spacing_xyz", 3, float)
    window = _numbers(cfg, "hu_window", 2, float)
    margin = _numbers(cfg, "crop_margin_dhw", 3, int)
    min_size = _numbers(cfg, "min_size_dhw", 3, int)
    if min(spacing) <= 0 or window[1] <= window[0] or min(margin) < 0 or min(min_size) < 1:
        raise PipelineError(f"{path}: spacing must be > 0, hu_window increasing, margins >= 0, sizes >= 1")
    return PipelineConfig(
        anatomy_names=[a["name"] for a in anatomies],
        anatomy_classes=[[str(c) for c in a["classes"]] for a in anatomies],
        target_spacing_xyz=spacing, hu_window=window, crop_margin_dhw=margin, min_size_dhw=min_size)


# ---------------------------------------------------------------------------- case names and lists

def volume_relpath(name: str) -> Path:
    """``train_1_a_2.nii.gz`` -> ``train_1/train_1_a/train_1_a_2.nii.gz`` (CT-RATE layout)."""
    stem = nii_stem(name)
    return Path(stem.rsplit("_", 2)[0], stem.rsplit("_", 1)[0], name)


def nii_stem(name: str) -> str:
    """``x.nii.gz`` or ``x.nii`` -> ``x``."""
    for suffix in (NIFTI_GZ, ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"not a NIfTI file name: {name}")


def list_inputs(folder: Path, suffix: str = NIFTI_GZ) -> list[str]:
    """Sorted volume names under ``folder/{patient}/{scan}/``; temporary (dot) files are ignored."""
    if not folder.is_dir():
        raise PipelineError(f"input folder not found: {folder} (check --data-root and that the previous step ran)")
    return sorted(p.name for p in folder.glob(f"*/*/*{suffix}") if not p.name.startswith("."))


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def select_shard(names: Sequence[str], shard: tuple[int, int]) -> list[str]:
    """``sorted(names)[K::N]``."""
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard K/N needs 0 <= K < N, got {k}/{n}")
    return sorted(names)[k::n]


# ---------------------------------------------------------------------------- runner

@dataclass(frozen=True)
class Task:
    """One case: ``fn()`` (a picklable partial of a module-level function) writes ``outputs``."""

    name: str
    outputs: tuple[Path, ...]
    fn: Callable[[], object]


@dataclass
class RunSummary:
    step: str
    split: str
    shard: tuple[int, int]
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    failures_csv: Path | None = None

    def line(self) -> str:
        shard = f" shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""
        return (f"{self.step} {self.split}{shard}: processed {self.processed}, skipped {self.skipped}, "
                f"failed {len(self.failed)} (failures: {self.failures_csv})")


def failures_csv_path(data_root: Path, step: str, split: str, shard: tuple[int, int]) -> Path:
    part = f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    return Path(data_root) / f"{step}_{split}{part}_failures.csv"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CaseError):
        return exc.reason
    if isinstance(exc, BrokenProcessPool):
        return "worker process crashed (killed or out of memory)"
    return f"{type(exc).__name__}: {exc}"


def run_tasks(step: str, split: str, data_root: str | Path, tasks: Sequence[Task], *, overwrite: bool = False,
              workers: int = 1, shard: tuple[int, int] = (0, 1), pbar: bool = True) -> RunSummary:
    """Run this shard's tasks, skip finished ones, record failures; never raises for a single case."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    by_name = {t.name: t for t in tasks}
    mine = [by_name[name] for name in select_shard(list(by_name), shard)]
    summary = RunSummary(step, split, shard, failures_csv=failures_csv_path(Path(data_root), step, split, shard))
    todo = []
    for task in mine:
        if not overwrite and all(p.is_file() for p in task.outputs):
            summary.skipped += 1
        else:
            todo.append(task)

    def record(name: str, exc: BaseException | None) -> None:
        if exc is None:
            summary.processed += 1
            return
        summary.failed.append((name, _reason(exc)))
        logger.warning("%s %s failed: %s", step, name, _reason(exc), exc_info=None if isinstance(exc, CaseError) else exc)

    with tqdm(total=len(todo), desc=f"{step} {split}", disable=not pbar) as bar:
        if workers == 1:
            for task in todo:
                try:
                    task.fn()
                    record(task.name, None)
                except Exception as exc:  # recorded as a failed case
                    record(task.name, exc)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(task.fn): task.name for task in todo}
                for future in as_completed(futures):
                    record(futures[future], future.exception())
                    bar.update()
    write_case_csv(summary.failures_csv, summary.failed)
    logger.info(summary.line())
    return summary


# ---------------------------------------------------------------------------- CLI

def _shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def step_parser(description: str) -> argparse.ArgumentParser:
    """Flags shared by the four steps."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-root", type=Path, default=Path("."),
                        help="CT-RATE root holding {split}/ and metadata/ (default: current directory)")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--workers", type=_positive_int, default=1, help="parallel worker processes")
    parser.add_argument("--shard", type=_shard_arg, default=(0, 1), metavar="K/N",
                        help="process sorted(cases)[K::N] (K 0-based), for array jobs")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="pipeline config (default configs/pipeline.yaml, relative to the repo root)")
    parser.add_argument("--no-pbar", action="store_true", help="no progress bar (cluster logs)")
    return parser


def run_cli(run: Callable[[], RunSummary]) -> int:
    """Call a step's ``run``; map its outcome to an exit status (0 ok, 1 failed cases, 2 not started)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run()
    except PipelineError as exc:
        logger.error("%s", exc)
        return 2
    return 1 if summary.failed else 0
