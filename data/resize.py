"""Step 3, resize (spec §2.3): fixed image + TotalSegmentator labels -> anatomy ids at the target spacing.

a. Merge: TotalSegmentator ``total`` class ids -> anatomy ids (1-based order of
   the anatomy map YAML, 0 = everything else) through one 256-entry lookup table.
b. Resample the image (trilinear) and the labels (nearest) onto the grid with
   the target spacing (``target_spacing_xyz``), the same origin and direction,
   and ``int(size * spacing / target)`` voxels per axis.

Nearest-neighbour resampling commutes with the voxel-wise merge, so the labels
are resampled first and merged on the (smaller) output grid: same result, fewer
voxels. Outputs are uncompressed ``.nii`` (``resized_{split}_images``: int16 HU,
``resized_{split}_masks``: uint8 anatomy ids), named ``{stem}.nii``.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python resize.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.io import write_volume
from data.common import (PipelineConfig, PipelineError, RunSummary, Task, list_inputs, load_pipeline_config,
                         nii_stem, run_cli, run_tasks, step_parser, volume_relpath)
from data.fix_data import read_sitk
from data.generate_mask import check_same_geometry


def build_label_lut(cfg: PipelineConfig, class_map: dict[int, str] | None = None) -> np.ndarray:
    """256-entry uint8 table: TotalSegmentator ``total`` id -> anatomy id (0 when not merged)."""
    if class_map is None:
        from totalsegmentator.map_to_binary import class_map as maps
        class_map = maps["total"]
    ids = {name: idx for idx, name in class_map.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for anatomy_id, (anatomy, classes) in enumerate(zip(cfg.anatomy_names, cfg.anatomy_classes), start=1):
        for cls in classes:
            if cls not in ids:
                raise PipelineError(f"anatomy map: {anatomy!r} lists {cls!r}, not a TotalSegmentator total class")
            if lut[ids[cls]]:
                raise PipelineError(f"anatomy map: class {cls!r} is listed under two anatomies")
            lut[ids[cls]] = anatomy_id
    return lut


def merge_labels(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Anatomy ids of a uint8 label array (one table lookup)."""
    return lut[labels]


def target_size(size_xyz: Sequence[int], spacing_xyz: Sequence[float], target_xyz: Sequence[float]) -> list[int]:
    """``int(size * spacing / target)`` per axis (at least 1)."""
    return [max(int(n * s / t), 1) for n, s, t in zip(size_xyz, spacing_xyz, target_xyz)]


def resample_case(image: sitk.Image, labels: sitk.Image, target_spacing_xyz: Sequence[float], *,
                  pad_hu: int = -1150) -> tuple[sitk.Image, sitk.Image]:
    """Image (trilinear, rounded to int16) and labels (nearest, uint8) on the target-spacing grid.

    Same origin and direction; points beyond the input get ``pad_hu`` / 0.
    ``labels`` may be TotalSegmentator ids or merged anatomy ids.
    """
    size = target_size(image.GetSize(), image.GetSpacing(), target_spacing_xyz)
    spacing = tuple(float(s) for s in target_spacing_xyz)
    grid = (size, sitk.Transform())
    geometry = (image.GetOrigin(), spacing, image.GetDirection())
    resampled = sitk.Resample(image, *grid, sitk.sitkLinear, *geometry, float(pad_hu), sitk.sitkFloat32)
    hu = np.rint(sitk.GetArrayViewFromImage(resampled)).astype(np.int16)
    out_image = sitk.GetImageFromArray(hu, isVector=False)
    out_image.CopyInformation(resampled)
    out_labels = sitk.Resample(labels, *grid, sitk.sitkNearestNeighbor, *geometry, 0, sitk.sitkUInt8)
    return out_image, out_labels


def resize_case(image_src: Path, mask_src: Path, image_dst: Path, mask_dst: Path, cfg: PipelineConfig,
                lut: np.ndarray) -> dict:
    """Merge + resample one case; writes ``image_dst`` and ``mask_dst`` (mask last)."""
    image = read_sitk(image_src, "image")
    labels = read_sitk(mask_src, "mask")
    check_same_geometry(image, labels)
    out_image, out_labels = resample_case(image, labels, cfg.target_spacing_xyz, pad_hu=cfg.pad_hu)
    anatomy = merge_labels(sitk.GetArrayViewFromImage(out_labels), lut)
    geometry = (out_image.GetSpacing(), out_image.GetOrigin(), out_image.GetDirection())
    write_volume(image_dst, sitk.GetArrayViewFromImage(out_image), *geometry)
    write_volume(mask_dst, anatomy, *geometry)
    return {"shape_dhw": anatomy.shape}


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, config: str | Path | None = None) -> RunSummary:
    """Resize every fixed volume of this shard (its mask from ``{split}_mask/``)."""
    root = Path(data_root)
    cfg = load_pipeline_config(config)
    lut = build_label_lut(cfg)
    tasks = []
    for name in list_inputs(root / f"{split}_fixed"):
        rel = volume_relpath(name)
        out_rel = rel.with_name(nii_stem(name) + ".nii")
        image_dst, mask_dst = root / f"resized_{split}_images" / out_rel, root / f"resized_{split}_masks" / out_rel
        fn = partial(resize_case, root / f"{split}_fixed" / rel, root / f"{split}_mask" / rel,
                     image_dst, mask_dst, cfg, lut)
        tasks.append(Task(name, (image_dst, mask_dst), fn, inputs=fn.args[:2], settings=repr(cfg)))
    return run_tasks("resize", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)


def main(argv: Sequence[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run_cli(lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar, config=args.config))


if __name__ == "__main__":
    sys.exit(main())
