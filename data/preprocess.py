"""Step 4, preprocess (spec §2.4): resized image + anatomy mask -> the training cache.

Crop, as the release does, to ``[max(first - ext, 0), min(last + ext, size))`` per
axis, ``first``/``last`` the extreme indices of non-zero anatomy voxels and ``ext`` =
``crop_margin_dhw``: the end is exclusive, so the margin is ``ext`` before the
anatomies and ``ext - 1`` after. Then pad to at least ``min_size_dhw``,
``(min - size) // 2`` before and the rest after, with ``pad_hu`` = the low end of
``hu_window`` (scales to 0) and mask 0. Every anatomy id present before is
checked to be present after; a mask without any anatomy is a failed case, and a
mask without some anatomy of the map is a warning row (``preprocess_{split}_warnings.csv``:
eval will leave that anatomy's cells empty).

Cache format: ``processed_{split}_images/{patient}/{scan}/{stem}.nii`` uncompressed
int16 HU (not scaled: ``data.io.scale_hu`` clips and scales at read time) and
``processed_{split}_masks/.../{stem}.nii`` uint8 anatomy ids, and beside it, written
last, the anatomy boxes ``{stem}.boxes.json`` (``data.anatomy_boxes``); the origin is moved
by the crop/pad offset, so the cache still overlays the fixed image in a viewer.
``data.io.open_volume`` memory-maps them: a random crop reads only its voxels.

``--delete-intermediates`` then deletes, for each cached case, the resized pair nothing
reads once the cache exists (``delete_intermediates``): ~30 of a 512x512x~250 volume's
~61 MB. Run the steps shard by shard (``--shard K/N``) to bound the peak as well.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python preprocess.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from data.anatomy_boxes import bounding_box, boxes_path, present_labels, write_boxes
from data.common import (NIFTI_GZ, CaseError, PipelineConfig, RunSummary, Task, list_inputs, load_pipeline_config,
                         nii_stem, run_cli, run_tasks, select_shard, step_parser, volume_relpath)
from data.io import VolumeReadError, atomic_outputs, open_volume, read_geometry, read_volume, save_volume
from data.resize import resized_paths

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropPad:
    """Crop ``[start, stop)`` then pad ``before``/``after`` voxels, per axis (D, H, W)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    before: tuple[int, int, int]
    after: tuple[int, int, int]

    @property
    def offset_dhw(self) -> tuple[int, int, int]:
        """Input index of output voxel (0, 0, 0)."""
        return tuple(s - b for s, b in zip(self.start, self.before))


def crop_pad_window(mask_dhw: np.ndarray, cfg: PipelineConfig) -> CropPad:
    """Window of spec §2.4 for this mask; ``CaseError('no anatomy found')`` when it is empty."""
    box = bounding_box(mask_dhw != 0)
    if box is None:
        raise CaseError("no anatomy found")
    start, stop, before, after = [], [], [], []
    for first, last, margin, size, minimum in zip(box[:3], box[3:], cfg.crop_margin_dhw, mask_dhw.shape,
                                                  cfg.min_size_dhw):
        lo, hi = max(first - margin, 0), min(last + margin, size)  # exclusive end, as the release
        need = max(minimum - (hi - lo), 0)
        start.append(lo), stop.append(hi), before.append(need // 2), after.append(need - need // 2)
    return CropPad(tuple(start), tuple(stop), tuple(before), tuple(after))


def apply_crop_pad(array: np.ndarray, window: CropPad, pad_value: int) -> np.ndarray:
    cropped = array[tuple(slice(a, b) for a, b in zip(window.start, window.stop))]
    return np.pad(cropped, list(zip(window.before, window.after)), constant_values=pad_value)


def crop_pad_case(image_dhw: np.ndarray, mask_dhw: np.ndarray, cfg: PipelineConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the anatomy bounding box + margin, pad to ``min_size_dhw``; returns (int16 HU, uint8 ids)."""
    return _crop_pad(image_dhw, mask_dhw, cfg)[:2]


def _crop_pad(image_dhw: np.ndarray, mask_dhw: np.ndarray, cfg: PipelineConfig
              ) -> tuple[np.ndarray, np.ndarray, CropPad]:
    if image_dhw.shape != mask_dhw.shape:
        raise CaseError(f"mask/image geometry mismatch: shape {mask_dhw.shape} vs image {image_dhw.shape}")
    before = present_labels(mask_dhw)
    if before.size and before[-1] > cfg.n_anatomies:
        raise CaseError(f"mask holds ids {before.tolist()}, the anatomy map has {cfg.n_anatomies}")
    window = crop_pad_window(mask_dhw, cfg)
    image = apply_crop_pad(np.asarray(image_dhw, dtype=np.int16), window, cfg.pad_hu)
    mask = apply_crop_pad(np.asarray(mask_dhw, dtype=np.uint8), window, 0)
    after = present_labels(mask)
    if not np.array_equal(before, after):
        raise CaseError(f"crop lost anatomies: {sorted(set(before.tolist()) - set(after.tolist()))}")
    return image, mask, window


def preprocess_case(image_src: Path, mask_src: Path, image_dst: Path, mask_dst: Path,
                    cfg: PipelineConfig) -> dict:
    """Crop/pad one resized case and write the cache pair together (``atomic_outputs``), then its boxes."""
    if not mask_src.is_file():
        raise CaseError(f"missing mask: {mask_src}")
    try:
        image_in, mask_in = open_volume(image_src), read_volume(mask_src)
        spacing, origin, direction = read_geometry(image_src)
        mask_geometry = read_geometry(mask_src)
    except VolumeReadError as exc:
        raise CaseError(str(exc)) from None
    if not np.allclose(np.concatenate(mask_geometry), np.concatenate((spacing, origin, direction)), atol=1e-3):
        raise CaseError("mask/image geometry mismatch: spacing/origin/direction differ")
    image, mask, window = _crop_pad(image_in, mask_in, cfg)
    shift_xyz = np.asarray(window.offset_dhw[::-1], dtype=np.float64) * spacing
    new_origin = np.asarray(origin) + np.asarray(direction).reshape(3, 3) @ shift_xyz
    boxes_path(mask_dst).unlink(missing_ok=True)  # a record never outlives its mask (kill during --overwrite)
    with atomic_outputs(image_dst, mask_dst) as (image_tmp, mask_tmp):
        save_volume(image_tmp, image, spacing, new_origin, direction)
        save_volume(mask_tmp, mask, spacing, new_origin, direction)
    write_boxes(mask, mask_dst)  # last: the case is complete once its record exists
    return {"shape_dhw": image.shape, "offset_dhw": window.offset_dhw, "warning": missing_anatomies(mask, cfg)}


def missing_anatomies(mask_dhw: np.ndarray, cfg: PipelineConfig) -> str | None:
    """``"missing anatomies: lung, ..."`` when some anatomy of the map has no voxel (eval leaves its cells empty)."""
    present = set(present_labels(mask_dhw).tolist())
    missing = [name for k, name in enumerate(cfg.anatomy_names, start=1) if k not in present]
    return f"missing anatomies: {', '.join(missing)}" if missing else None


def delete_intermediates(root: Path, split: str, names: Sequence[str]) -> int:
    """Delete the resized pair of each case whose cache is complete and newer; returns the count.

    The anatomy box record is written last and atomically, so its presence means the case
    is complete; a pair rewritten after it (resize re-run with --overwrite) is kept. The
    TotalSegmentator mask (~1 MB, GPU minutes) and the fixed volume (a fix record, or the
    download itself) stay. The resized image, by which this step lists a case, goes first:
    a kill can leave a case's mask (the next run, which also looks for them by the resized
    masks, deletes it) but never a listed case without its mask, which a rerun would take
    as a changed input.
    """
    deleted = 0
    for name in names:
        rel = volume_relpath(name)
        doomed = [p for p in resized_paths(root, split, name) if p.is_file()]
        cache_image, cache_mask = root / f"processed_{split}_images" / rel, root / f"processed_{split}_masks" / rel
        record = boxes_path(cache_mask)
        if not (doomed and cache_image.is_file() and cache_mask.is_file() and record.is_file()):
            continue
        if record.stat().st_mtime < max(p.stat().st_mtime for p in doomed):
            continue
        for path in doomed:
            path.unlink()
        deleted += 1
    return deleted


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, config: str | Path | None = None,
        delete_intermediates_after: bool = False) -> RunSummary:
    """Build the cache for every resized volume of this shard (then delete their intermediates if asked)."""
    root = Path(data_root)
    cfg = load_pipeline_config(config)
    tasks = []
    for name in list_inputs(root / f"resized_{split}_images", ".nii"):
        rel = volume_relpath(name)
        image_dst, mask_dst = root / f"processed_{split}_images" / rel, root / f"processed_{split}_masks" / rel
        fn = partial(preprocess_case, *resized_paths(root, split, name), image_dst, mask_dst, cfg)
        tasks.append(Task(name, (image_dst, mask_dst, boxes_path(mask_dst)), fn, inputs=fn.args[:2],
                          settings=repr(cfg)))
    summary = run_tasks("preprocess", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard,
                        pbar=pbar)
    if delete_intermediates_after:
        listed = {t.name for t in tasks} | {nii_stem(name) + ".nii"
                                            for name in list_inputs(root / f"resized_{split}_masks", NIFTI_GZ)}
        deleted = delete_intermediates(root, split, select_shard(sorted(listed), shard))
        logger.info("preprocess %s: deleted the intermediates of %d cached cases", split, deleted)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--delete-intermediates", action="store_true",
                        help="once a case's cache pair is complete, delete its resized pair (re-running resize "
                             "would redo those cases)")
    args = parser.parse_args(argv)
    return run_cli("preprocess", lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar, config=args.config,
                               delete_intermediates_after=args.delete_intermediates))


if __name__ == "__main__":
    sys.exit(main())
