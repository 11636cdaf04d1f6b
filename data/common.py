"""Shared parts of the four data steps (spec §2): config, case lists, the step runner, the CLI.

Each step module (``fix_data``, ``generate_mask``, ``resize``, ``preprocess``)
has per-case functions that only touch their own input and output paths, a
``run(data_root, split, *, overwrite, workers, shard, ...) -> RunSummary`` and a
thin ``main(argv=None) -> int``. The runner here:

- lists the cases (volume names such as ``train_1_a_2.nii.gz``), sorts them and
  keeps ``cases[K::N]`` for ``--shard K/N`` (K is 0-based), so N array jobs
  cover every volume exactly once;
- skips a case whose outputs all exist and whose inputs (size and mtime of each
  ``Task.inputs`` file) and settings (``Task.settings``: metadata row, pipeline
  config) are those recorded when it was made, in
  ``.manifests/{step}_{split}/{name}.json`` (written after the outputs: a kill
  in between at worst redoes the case; outputs without a manifest, from a run before
  manifests existed, are kept when they are newer than every input, as make would);
  ``overwrite`` redoes every case. A case that fails keeps what it had: its last good
  outputs and their manifest stay (nothing that existed is deleted by a failure, nor an
  output another run just wrote), the failures CSV names it, and the next run retries
  it. A case function may return ``{"kept": reason}`` instead of writing: its existing
  outputs stand (counted as skipped, logged; e.g. ``generate_mask --masks-from`` without
  a mask for a volume that has one). Outputs are written atomically
  (``data.io.atomic_output``, one temporary name per writer; an image and its mask
  together, ``atomic_outputs``, so a failure never leaves a new one beside an old one);
- runs the cases inline (``workers == 1``) or in a ``ProcessPoolExecutor`` with
  at most ``workers`` cases in flight: a case that raises is a failed case; a
  worker process that dies fails the cases in flight, and a new pool goes on. Workers
  die with the run (Linux ``PR_SET_PDEATHSIG``) and never hold its lock: a killed run
  leaves no orphan that blocks the next one;
- writes ``{step}_{split}_failures.csv`` (``volume,reason``) and
  ``{step}_{split}_warnings.csv`` (``volume,warning``; e.g. preprocess: anatomies
  absent from the mask) in the data root, header only when empty, replacing the
  previous run's files. With ``--shard K/N`` and N > 1 the names carry
  ``_shard{K}of{N}``, so concurrent shards never write the same file;
- holds ``fcntl.flock`` on ``.{step}_{split}.lock`` in the data root for the whole
  run: a second run of the step on the split exits 2, naming the holder (pid, host,
  start time); the shards of a ``--shard K/N`` run share it (and each holds its own
  ``_shard{K}of{N}`` lock);
- checks first that the data root and the output folders are writable (exit 2);
- logs one summary line (processed / skipped / failed / warnings).

``main`` returns 0 when nothing failed (warnings included), 1 when some case failed,
2 when the run could not start (missing input folder or metadata, bad config,
TotalSegmentator weights not installed, an output folder not writable, the step
in use by another run).

Functions ``predict.py`` reuses on in-memory data: ``data.fix_data.fix_geometry``,
``data.resize.build_label_lut`` / ``merge_labels`` / ``resample_case`` (SimpleITK
images) and ``data.preprocess.crop_pad_case`` (``(D, H, W)`` arrays).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml
from tqdm import tqdm

from data.io import (InUseError, NotWritableError, check_writable, close_inherited_locks, file_fingerprint,
                     read_json, run_lock, write_case_csv, write_json)
from utils.cli import UsageError, run_main
from utils.config import resolve_path

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/pipeline.yaml")
SPLITS = ("train", "valid")
METADATA_FILES = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
REPORT_FILES = {"train": "radiology_text_reports/train_reports.csv",
                "valid": "radiology_text_reports/validation_reports.csv"}
NIFTI_GZ = ".nii.gz"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Label resampling in resize: the release's legacy "nearest", or "nearest-exact" (the voxel nearest to
# the image's sample point; opt-in, docs/fidelity.md).
MASK_INTERPOLATIONS = ("nearest", "nearest-exact")


class PipelineError(UsageError):
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
    mask_interpolation: str = "nearest"  # F.interpolate mode of the labels in resize; "nearest" = the release

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


def _anatomy_entries(path: str | Path) -> list[dict]:
    """The ``anatomies`` list of an anatomy map YAML, checked; ``PipelineError`` names the file."""
    with open(path, encoding="utf-8") as f:
        anatomies = (yaml.safe_load(f) or {}).get("anatomies")
    if not isinstance(anatomies, list) or not anatomies or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("classes"), list)
            and a["classes"] for a in anatomies):
        raise PipelineError(f"{path}: 'anatomies' must be a non-empty list of {{name, classes}}")
    return anatomies


def load_anatomy_map(path: str | Path) -> list[tuple[str, list[str]]]:
    """(anatomy name, TotalSegmentator classes) in id order, from an anatomy map YAML
    (``anatomies: [{name, classes, terms}]``); ``PipelineError`` names the file when it is malformed."""
    return [(a["name"], [str(c) for c in a["classes"]]) for a in _anatomy_entries(path)]


def load_anatomy_terms(path: str | Path) -> dict[str, list[str]]:
    """Anatomy name -> the words that name it in a report (``terms``, what ``data.decompose`` matches), in
    id order; ``PipelineError`` names the file and the anatomy without terms."""
    out: dict[str, list[str]] = {}
    for a in _anatomy_entries(path):
        terms = a.get("terms")
        if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms):
            raise PipelineError(f"{path}: anatomy {a['name']!r} needs 'terms', a non-empty list of the words "
                                "that name it in reports (e.g. terms: [lung, pulmonary, lobe])")
        out[a["name"]] = [t.strip() for t in terms]
    return out


def load_pipeline_config(path: str | Path | None = None) -> PipelineConfig:
    """Read the pipeline YAML and its anatomy map (``anatomies: [{name, classes}]``)."""
    path = resolve_path(path if path is not None else DEFAULT_CONFIG)
    if not path.is_file():
        raise PipelineError(f"pipeline config not found: {path} (set --config)")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "anatomy_map" not in cfg:
        raise PipelineError(f"{path}: expected a mapping with an 'anatomy_map' key")
    map_path = resolve_path(cfg["anatomy_map"])
    if not map_path.is_file():
        raise PipelineError(f"{path}: anatomy map not found: {map_path}")
    anatomies = load_anatomy_map(map_path)
    spacing = _numbers(cfg, "target_spacing_xyz", 3, float)
    window = _numbers(cfg, "hu_window", 2, float)
    margin = _numbers(cfg, "crop_margin_dhw", 3, int)
    min_size = _numbers(cfg, "min_size_dhw", 3, int)
    if min(spacing) <= 0 or window[1] <= window[0] or min(margin) < 0 or min(min_size) < 1:
        raise PipelineError(f"{path}: spacing must be > 0, hu_window increasing, margins >= 0, sizes >= 1")
    mask_interpolation = cfg.get("mask_interpolation", "nearest")
    if mask_interpolation not in MASK_INTERPOLATIONS:
        raise PipelineError(f"{path}: mask_interpolation must be one of {MASK_INTERPOLATIONS}, "
                            f"got {mask_interpolation!r}")
    return PipelineConfig(
        anatomy_names=[name for name, _ in anatomies],
        anatomy_classes=[classes for _, classes in anatomies],
        target_spacing_xyz=spacing, hu_window=window, crop_margin_dhw=margin, min_size_dhw=min_size,
        mask_interpolation=mask_interpolation)


# ---------------------------------------------------------------------------- case names and lists

def volume_relpath(name: str) -> Path:
    """``train_1_a_2.nii.gz`` -> ``train_1/train_1_a/train_1_a_2.nii.gz`` (CT-RATE layout)."""
    return Path(patient_id_of(name), scan_id_of(name), name)


def scan_id_of(path: str | Path) -> str:
    """``.../train_1_a_2.nii`` or ``train_1_a_2.nii.gz`` -> its scan ``train_1_a`` (its reconstructions
    share the scan's report)."""
    return nii_stem(Path(path).name).rsplit("_", 1)[0]


def patient_id_of(path: str | Path) -> str:
    """``.../train_1_a_2.nii`` or ``train_1_a_2.nii.gz`` -> its patient ``train_1``."""
    return nii_stem(Path(path).name).rsplit("_", 2)[0]


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
    """One case: ``fn()`` (a picklable partial of a module-level function) reads ``inputs``, writes ``outputs``.

    ``fn`` may return a dict; its ``"warning"`` (a one-line text) goes into the warnings CSV.
    ``settings`` is any text that also decides the outputs (a metadata row, the pipeline config):
    a change of it, like a change of an input file, makes a rerun redo the case.
    """

    name: str
    outputs: tuple[Path, ...]
    fn: Callable[[], object]
    inputs: tuple[Path, ...] = ()
    settings: str = ""


@dataclass
class RunSummary:
    step: str
    split: str
    shard: tuple[int, int]
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warned: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # skipped: existing outputs stand (``"kept"``)
    failures_csv: Path | None = None
    warnings_csv: Path | None = None
    results: dict[str, object] = field(default_factory=dict)  # what each processed case's fn returned

    def line(self) -> str:
        shard = f" shard {self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else ""
        return (f"{self.step} {self.split}{shard}: processed {self.processed}, skipped {self.skipped}, "
                f"failed {len(self.failed)}, warnings {len(self.warned)} "
                f"(failures: {self.failures_csv}, warnings: {self.warnings_csv})")


def _shard_part(shard: tuple[int, int]) -> str:
    return f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""


def failures_csv_path(data_root: Path, step: str, split: str, shard: tuple[int, int]) -> Path:
    return Path(data_root) / f"{step}_{split}{_shard_part(shard)}_failures.csv"


def warnings_csv_path(data_root: Path, step: str, split: str, shard: tuple[int, int]) -> Path:
    return Path(data_root) / f"{step}_{split}{_shard_part(shard)}_warnings.csv"


def manifest_path(data_root: Path, step: str, split: str, name: str) -> Path:
    """Record of what a finished case was made from: ``.manifests/{step}_{split}/{name}.json``."""
    return Path(data_root) / ".manifests" / f"{step}_{split}" / f"{name}.json"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CaseError):
        return exc.reason
    if isinstance(exc, BrokenProcessPool):
        return "worker process crashed (killed or out of memory) while this case ran"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _output_folders(data_root: Path, tasks: Sequence[Task]) -> list[Path]:
    """The data root and the top folder of every output under it (one writability probe each)."""
    folders = {Path(data_root)}
    for task in tasks:
        for out in task.outputs:
            try:
                folders.add(Path(data_root) / out.relative_to(data_root).parts[0])
            except ValueError:  # an output outside the data root
                folders.add(out.parent)
    return sorted(folders)


@contextmanager
def _step_lock(data_root: Path, step: str, split: str, shard: tuple[int, int]):
    """One run per step and split: shards of one ``--shard K/N`` run side by side (a shared lock on the
    step, an exclusive one on their shard); a run of the whole split excludes them all."""
    root = Path(data_root)
    what = f"{step} {split} in {root}"
    with run_lock(root / f".{step}_{split}.lock", what, shared=shard[1] > 1):
        if shard[1] == 1:
            yield
            return
        with run_lock(root / f".{step}_{split}{_shard_part(shard)}.lock", f"{what} shard {shard[0]}/{shard[1]}"):
            yield


def run_tasks(step: str, split: str, data_root: str | Path, tasks: Sequence[Task], *, overwrite: bool = False,
              workers: int = 1, shard: tuple[int, int] = (0, 1), pbar: bool = True) -> RunSummary:
    """Run this shard's tasks, skip unchanged finished ones, record failures and warnings; never raises for a
    single case. ``PipelineError`` when an output folder is not writable or another run holds the step."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(data_root)
    by_name = {t.name: t for t in tasks}
    mine = [by_name[name] for name in select_shard(list(by_name), shard)]
    try:
        for folder in _output_folders(root, mine):
            check_writable(folder)
        with _step_lock(root, step, split, shard):
            return _run_locked(step, split, root, mine, overwrite=overwrite, workers=workers, shard=shard,
                               pbar=pbar)
    except (InUseError, NotWritableError) as exc:
        raise PipelineError(str(exc)) from None


def _run_locked(step: str, split: str, root: Path, mine: list[Task], *, overwrite: bool, workers: int,
                shard: tuple[int, int], pbar: bool) -> RunSummary:
    summary = RunSummary(step, split, shard, failures_csv=failures_csv_path(root, step, split, shard),
                         warnings_csv=warnings_csv_path(root, step, split, shard))
    todo, made_from = [], {}
    for task in mine:
        made_from[task.name] = {"inputs": file_fingerprint(task.inputs), "settings": task.settings}
        record = read_json(manifest_path(root, step, split, task.name)) if not overwrite else None
        if record is None and not overwrite and _outputs_newer_than_inputs(task):
            record = {**made_from[task.name], "warning": None}  # written before manifests existed: adopted
            write_json(manifest_path(root, step, split, task.name), record)
        if (isinstance(record, dict) and {k: record.get(k) for k in made_from[task.name]} == made_from[task.name]
                and all(p.is_file() for p in task.outputs)):
            summary.skipped += 1
            if record.get("warning"):  # still true of the kept outputs
                summary.warned.append((task.name, record["warning"]))
        else:
            todo.append(task)

    def finish(task: Task, result: object, exc: BaseException | None) -> None:
        manifest = manifest_path(root, step, split, task.name)
        if exc is None and isinstance(result, dict) and result.get("kept"):
            write_json(manifest, {**made_from[task.name], "warning": None})
            summary.skipped += 1
            summary.kept.append((task.name, result["kept"]))
            return
        if exc is None:
            warning = result.get("warning") if isinstance(result, dict) else None
            write_json(manifest, {**made_from[task.name], "warning": warning})
            summary.processed += 1
            summary.results[task.name] = result
            if warning:
                summary.warned.append((task.name, warning))
            return
        # its outputs and manifest stay: the last good result (or another run's fresh one) is never lost, and the
        # manifest, which records older inputs, makes the next run retry the case
        summary.failed.append((task.name, _reason(exc)))
        logger.warning("%s %s failed: %s", step, task.name, _reason(exc),
                       exc_info=None if isinstance(exc, (CaseError, BrokenProcessPool)) else exc)

    with tqdm(total=len(todo), desc=f"{step} {split}", disable=not pbar) as bar:
        if workers == 1:
            for task in todo:
                try:
                    result = task.fn()
                except Exception as exc:  # recorded as a failed case
                    finish(task, None, exc)
                else:
                    finish(task, result, None)
                bar.update()
        else:
            _run_pool(todo, workers, finish, bar)
    if summary.kept:
        logger.info("%s %s: kept the existing outputs of %d case(s) (%s: %s)", step, split, len(summary.kept),
                    summary.kept[0][0], summary.kept[0][1])
    write_case_csv(summary.failures_csv, summary.failed)
    write_case_csv(summary.warnings_csv, summary.warned, header=("volume", "warning"))
    logger.info(summary.line())
    return summary


def _outputs_newer_than_inputs(task: Task) -> bool:
    """make's rule, for outputs without a manifest: every output exists and is newer than every input."""
    outputs, inputs = file_fingerprint(task.outputs), file_fingerprint(task.inputs)
    if not outputs or None in outputs or None in inputs:
        return False
    return min(o[1] for o in outputs) >= max((i[1] for i in inputs), default=0)


def _worker_init(parent_pid: int) -> None:
    """In each pool worker: die with the parent (a killed run leaves no orphan worker) and close the parent's
    lock fds, so that no worker ever holds the step's lock."""
    close_inherited_locks()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run_pool(todo: list[Task], workers: int, finish: Callable[[Task, object, BaseException | None], None],
              bar: tqdm) -> None:
    """Run ``todo`` on ``workers`` processes, never more cases in flight than workers, so that a worker that dies
    (killed, out of memory) fails only the cases in flight; a new pool then goes on with the rest."""
    pending = list(reversed(todo))
    while pending:
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            in_flight: dict = {}
            broken = False
            while pending or in_flight:
                while pending and not broken and len(in_flight) < workers:
                    task = pending.pop()
                    in_flight[pool.submit(task.fn)] = task
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    exc = future.exception()
                    broken |= isinstance(exc, BrokenProcessPool)
                    finish(in_flight.pop(future), None if exc else future.result(), exc)
                    bar.update()


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
                        help="CT-RATE root holding {split}_fixed/ (v2 download) or {split}/ (v1) and metadata/ "
                             "(default: current directory)")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--workers", type=_positive_int, default=1, help="parallel worker processes")
    parser.add_argument("--shard", type=_shard_arg, default=(0, 1), metavar="K/N",
                        help="process sorted(cases)[K::N] (K 0-based), for array jobs")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="pipeline config (default configs/pipeline.yaml, relative to the repo root)")
    parser.add_argument("--no-pbar", action="store_true", help="no progress bar (cluster logs)")
    return parser


def run_cli(prog: str, run: Callable[[], RunSummary]) -> int:
    """Call a step's ``run``; map its outcome to an exit status (0 ok, 1 failed cases, 2 not started)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(prog, lambda: 1 if run().failed else 0)
