"""Step 2, mask (spec §2.2): fixed volume -> ``{split}_mask/`` TotalSegmentator ``total`` labels (uint8).

Cases: the fixed volumes of ``data.fix_data.fixed_sources`` (fix records and ``{split}_fixed/`` files).

Default: TotalSegmentator's python API, the full task ``total`` as the release runs
it (``totalsegmentator(image, quiet=True)``: all five parts, so where parts overlap
at organ borders the later part wins as in the release). ``--fast`` selects the
3 mm model, ``--device`` the device. ``--roi-subset`` (opt-in, faster, not the
release) passes ``roi_subset`` = the classes the anatomy map merges: a 6 mm pass
crops around them, then only the parts holding them run, so voxels at borders
with the other parts' organs can differ from the release's masks.
Before anything runs, the weights it needs are checked under its own lookup
(``$TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
``~/.totalsegmentator/nnunet/results``; see ``totalsegmentator.config.get_weights_dir``):
if any is missing the step stops with one line naming the download that fits the
options (``totalseg_download_weights -t total``, or ``-t total_fast`` with
``--fast``) and writes nothing, so TotalSegmentator never starts a download. Its usage
statistics (posted after every prediction unless its ``config.json`` says
``"send_usage_stats": false``) are switched off before the first call.

``--masks-from DIR`` instead takes existing label maps
``DIR/{split}/{patient}/{scan}/{name}`` (e.g. the synthetic ``totalseg_gt``, or the
masks ``import_ct --masks`` wrote): each must have the fixed image's shape and geometry
(tolerance 1e-3; a mismatch names each of size, spacing, origin, direction that differs)
and only labels of ``totalsegmentator.map_to_binary.class_map["total"]``. A volume whose
mask is absent from DIR keeps the mask it has (logged, counted as skipped; a folder of a
few corrected masks updates only those); without one it is a failed case.

Output: uint8 labels with the fixed image's geometry, ``.nii.gz`` at gzip level 1.
``--config`` gives the anatomy map (for ``--roi-subset``).
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python generate_mask.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.io import nifti_image, write_volume
from data.common import (CaseError, PipelineConfig, PipelineError, RunSummary, Task, load_pipeline_config,
                         run_cli, run_tasks, step_parser, volume_relpath)
from data.fix_data import fixed_sources, read_fixed, read_sitk

GEOMETRY_TOLERANCE = 1e-3
ORIENTATION_HINT = (" (the mask is not on the fixed image's axes: a mask made on a scan before import_ct reoriented "
                    "it must go through `import_ct --masks`; docs/evaluations.md)")
INSTALL_HINT = ("run `totalseg_download_weights -t {task}` on a machine with internet access, then copy its "
                "~/.totalsegmentator/nnunet/results folder to {path} (or point $TOTALSEG_WEIGHTS_PATH at it)")


class WeightsMissingError(PipelineError):
    """TotalSegmentator weights are not installed (it would try to download them)."""


def total_class_ids() -> set[int]:
    """Label ids of TotalSegmentator's ``total`` task (0 = background not included)."""
    from totalsegmentator.map_to_binary import class_map
    return set(class_map["total"])


def required_weight_dirs(*, fast: bool, roi_subset: bool) -> list[Path]:
    """Weight folders TotalSegmentator's ``total`` task will load (it downloads any that is missing)."""
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    task_ids = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]["task_id"]
    task_ids = list(task_ids) if isinstance(task_ids, list) else [task_ids]
    if roi_subset:
        task_ids.append(298)  # the 6 mm model it runs first to crop around the subset
    weights_dir = get_weights_dir()
    dirs = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        dirs.append(weights_dir / info.get("rel_path", "") / info["foldername"])
    return dirs


def weights_download_task(*, fast: bool) -> str:
    """``totalseg_download_weights -t`` task that installs every model the options need (both include the 6 mm one)."""
    return "total_fast" if fast else "total"


def check_totalseg_weights(*, fast: bool, roi_subset: bool) -> None:
    """Raise ``WeightsMissingError`` (one line, with the install recipe) unless all weights are present."""
    missing = [d for d in required_weight_dirs(fast=fast, roi_subset=roi_subset) if not d.is_dir()]
    if missing:
        raise WeightsMissingError(
            f"TotalSegmentator weights not installed ({', '.join(d.name for d in missing)}): "
            + INSTALL_HINT.format(task=weights_download_task(fast=fast), path=missing[0].parent))


def disable_usage_stats() -> Path:
    """Set ``send_usage_stats: false`` (and the disclaimer as shown) in TotalSegmentator's config.json."""
    from totalsegmentator.config import get_totalseg_dir, set_config_key, setup_totalseg

    setup_totalseg()  # creates config.json if missing (with send_usage_stats true), nothing is sent
    set_config_key("send_usage_stats", False)
    set_config_key("statistics_disclaimer_shown", True)
    return get_totalseg_dir() / "config.json"


def roi_classes(cfg: PipelineConfig) -> list[str]:
    """The TotalSegmentator classes the anatomy map merges, in map order."""
    return list(dict.fromkeys(c for classes in cfg.anatomy_classes for c in classes))


def check_same_geometry(image: sitk.Image, mask: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE,
                        direction_hint: str = "") -> None:
    """``CaseError('mask/image geometry mismatch: ...')`` naming every one of size, spacing, origin and direction
    that differs; ``direction_hint`` is added when the direction does."""
    differs = []
    if tuple(image.GetSize()) != tuple(mask.GetSize()):
        differs.append(f"size {list(mask.GetSize())} vs image {list(image.GetSize())}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = getattr(image, f"Get{what}")(), getattr(mask, f"Get{what}")()
        if not np.allclose(a, b, rtol=0, atol=tolerance):
            differs.append(f"{what.lower()} {[round(float(v), 4) for v in b]} vs image "
                           f"{[round(float(v), 4) for v in a]}")
    if differs:
        hint = direction_hint if direction_hint and any(d.startswith("direction") for d in differs) else ""
        raise CaseError(f"mask/image geometry mismatch: {'; '.join(differs)}{hint}")


def check_labels(labels: np.ndarray, valid_ids: set[int]) -> np.ndarray:
    """The labels as uint8; ``CaseError`` for ids outside the ``total`` class map."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise CaseError(f"labels must be integers, got {labels.dtype}")
    if labels.dtype != np.uint8:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 255:
            raise CaseError(f"labels outside the TotalSegmentator total class map: range {lo}..{hi}")
        labels = labels.astype(np.uint8)
    present = np.zeros(256, dtype=bool)
    present[labels.reshape(-1)] = True
    unknown = sorted(set(np.flatnonzero(present).tolist()) - valid_ids - {0})
    if unknown:
        raise CaseError(f"labels outside the TotalSegmentator total class map: {unknown}")
    return labels


def copy_mask_case(mask_src: Path, fixed: tuple[Path, ...], dst: Path, valid_ids: set[int]) -> dict:
    """Validate an existing label map against the fixed image and write it as ``dst`` (uint8).

    No ``mask_src`` while ``dst`` exists (a folder of a few corrected masks): ``dst`` is kept, once its
    geometry is checked against the fixed image (``{"kept": ...}``, data.common)."""
    image = read_fixed(fixed)
    if not mask_src.exists() and dst.is_file():
        check_same_geometry(image, read_sitk(dst, "existing mask"))
        return {"kept": f"no mask in --masks-from ({mask_src}): kept the existing {dst.name}"}
    mask = read_sitk(mask_src, "mask")
    check_same_geometry(image, mask, direction_hint=ORIENTATION_HINT)
    labels = check_labels(sitk.GetArrayViewFromImage(mask), valid_ids)
    write_volume(dst, labels, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), compresslevel=1)
    return {"shape_dhw": labels.shape}


def segment_case(fixed: tuple[Path, ...], dst: Path, *, roi_subset: list[str] | None, fast: bool,
                 device: str) -> dict:
    """Run TotalSegmentator ``total`` on one fixed volume (handed over in memory, as the release does) and write
    its labels as ``dst`` (uint8)."""
    from totalsegmentator.python_api import totalsegmentator

    image = read_fixed(fixed)
    geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    seg = totalsegmentator(nifti_image(sitk.GetArrayFromImage(image), *geometry), None, ml=True, task="total",
                           fast=fast, roi_subset=roi_subset, device=device, quiet=True, nr_thr_saving=1)
    labels = np.asarray(seg.dataobj).T  # (x, y, z) -> (D, H, W)
    if labels.shape[::-1] != tuple(image.GetSize()):
        raise CaseError(f"TotalSegmentator output shape {labels.shape} does not match the image")
    labels = check_labels(np.rint(labels).astype(np.int32) if labels.dtype.kind == "f" else labels,
                          total_class_ids())
    write_volume(dst, labels, *geometry, compresslevel=1)
    return {"shape_dhw": labels.shape}


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, config: str | Path | None = None,
        masks_from: str | Path | None = None, fast: bool = False, device: str = "gpu",
        roi_subset: bool = False) -> RunSummary:
    """Labels for every fixed volume of this shard; TotalSegmentator unless ``masks_from``."""
    root = Path(data_root)
    if masks_from is not None:
        source = Path(masks_from) / split
        if not source.is_dir():
            raise PipelineError(f"--masks-from: folder not found: {source}")
        valid_ids = total_class_ids()
    else:
        classes = roi_classes(load_pipeline_config(config)) if roi_subset else None
        check_totalseg_weights(fast=fast, roi_subset=roi_subset)
        disable_usage_stats()
    tasks = []
    for name, fixed in fixed_sources(root, split).items():
        rel = volume_relpath(name)
        dst = root / f"{split}_mask" / rel
        if masks_from is not None:
            fn = partial(copy_mask_case, source / rel, fixed, dst, valid_ids)
        else:
            fn = partial(segment_case, fixed, dst, roi_subset=classes, fast=fast, device=device)
        inputs = (*fixed, source / rel) if masks_from is not None else fixed
        settings = "copy" if masks_from is not None else repr(("totalsegmentator", classes, fast))
        tasks.append(Task(name, (dst,), fn, inputs=inputs, settings=settings))
    return run_tasks("mask", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)


def main(argv: Sequence[str] | None = None) -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--masks-from", type=Path, default=None,
                        help="take existing label maps from DIR/{split}/... instead of running TotalSegmentator")
    parser.add_argument("--device", default="gpu", help="TotalSegmentator device: gpu, gpu:N, cpu, mps")
    parser.add_argument("--fast", action="store_true", help="TotalSegmentator 3 mm model")
    parser.add_argument("--roi-subset", action="store_true",
                        help="segment only the classes the anatomy map needs (faster; masks differ from the "
                             "release's at organ borders)")
    args = parser.parse_args(argv)
    return run_cli("generate_mask", lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar, config=args.config,
                               masks_from=args.masks_from, fast=args.fast, device=args.device,
                               roi_subset=args.roi_subset))


if __name__ == "__main__":
    sys.exit(main())
