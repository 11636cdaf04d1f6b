"""Step 3, resize (spec §2.3): fixed image + TotalSegmentator labels -> anatomy ids on the release's grid.

a. Merge: TotalSegmentator ``total`` class ids -> anatomy ids (1-based order of
   the anatomy map YAML, 0 = everything else) through one 256-entry lookup table.
b. Resample exactly as the release does (its weights were trained on this grid):
   ``m = int(n * spacing / target)`` voxels per axis (``target_spacing_xyz``), the
   image by ``torch.nn.functional.interpolate(size=m, mode="trilinear",
   align_corners=False)`` (output voxel i samples input coordinate
   ``(i + 0.5) * n / m - 0.5``, clamped at the edges), rounded to int16; the labels
   by PyTorch's legacy ``mode="nearest"`` (input index ``min(floor(i * n / m), n - 1)``,
   ``n / m`` in float32, half a voxel from the image's sample point, as in the release). The pipeline
   setting ``mask_interpolation: nearest-exact`` instead takes the input voxel
   nearest to the image's sample point (not the release; docs/fidelity.md).

Headers: spacing ``n * spacing / m`` (the field of view is kept, so it is only
about the target) and origin = the physical position of the image's sample point
of voxel 0, ``origin + direction @ ((n / m - 1) / 2 * spacing)``, so the image
overlays the fixed volume exactly (the mask, by the release's rule, sits up to half
an output voxel off). The calls are PyTorch's own, on the threads torch is given
(``OMP_NUM_THREADS``); on one thread they are faster than the SimpleITK resampler
they replaced (docs/fidelity.md).

Nearest-neighbour resampling commutes with the voxel-wise merge, so the labels
are resampled first and merged on the (smaller) output grid: same result, fewer
voxels. Outputs (``resized_paths``): ``resized_{split}_images/.../{stem}.nii``, int16 HU,
uncompressed; ``resized_{split}_masks/.../{stem}.nii.gz``, uint8 anatomy ids, gzip level 1.
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
import torch
import torch.nn.functional as F

from data.io import atomic_outputs, save_volume
from data.common import (NIFTI_GZ, PipelineConfig, PipelineError, RunSummary, Task, load_pipeline_config,
                         nii_stem, run_cli, run_tasks, step_parser, volume_relpath)
from data.fix_data import fixed_sources, read_fixed, read_sitk
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


def resampled_geometry(image: sitk.Image, size_xyz: Sequence[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin) of ``image`` stretched onto ``size_xyz`` voxels with the field of view kept."""
    n = np.asarray(image.GetSize(), dtype=np.float64)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    ratio = n / np.asarray(size_xyz, dtype=np.float64)
    shift = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ ((ratio - 1) / 2 * spacing)
    return tuple((ratio * spacing).tolist()), tuple((np.asarray(image.GetOrigin()) + shift).tolist())


def resample_case(image: sitk.Image, labels: sitk.Image, target_spacing_xyz: Sequence[float], *,
                  mask_interpolation: str = "nearest") -> tuple[sitk.Image, sitk.Image]:
    """Image (trilinear, rounded to int16) and labels (uint8) on the release's grid (module docstring).

    ``labels`` may be TotalSegmentator ids or merged anatomy ids; ``mask_interpolation``
    is the ``F.interpolate`` mode of the labels (``nearest``: the release).
    """
    size_xyz = target_size(image.GetSize(), image.GetSpacing(), target_spacing_xyz)
    size_dhw = size_xyz[::-1]
    hu = torch.from_numpy(sitk.GetArrayViewFromImage(image).astype(np.float32))
    hu = F.interpolate(hu[None, None], size=size_dhw, mode="trilinear", align_corners=False)[0, 0].numpy()
    np.clip(np.rint(hu, out=hu), -32768, 32767, out=hu)  # predict.py may pass HU that is not int16
    ids = torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.uint8, copy=False))
    ids = F.interpolate(ids[None, None], size=size_dhw, mode=mask_interpolation)[0, 0].numpy()
    spacing, origin = resampled_geometry(image, size_xyz)
    out = []
    for array in (hu.astype(np.int16), ids):
        volume = sitk.GetImageFromArray(array, isVector=False)
        volume.SetSpacing(spacing), volume.SetOrigin(origin), volume.SetDirection(image.GetDirection())
        out.append(volume)
    return out[0], out[1]


def resize_case(fixed: tuple[Path, ...], mask_src: Path, image_dst: Path, mask_dst: Path, cfg: PipelineConfig,
                lut: np.ndarray) -> dict:
    """Merge + resample one case; writes ``image_dst`` and ``mask_dst`` together (``atomic_outputs``)."""
    image = read_fixed(fixed)
    labels = read_sitk(mask_src, "mask")
    check_same_geometry(image, labels)
    out_image, out_labels = resample_case(image, labels, cfg.target_spacing_xyz,
                                          mask_interpolation=cfg.mask_interpolation)
    anatomy = merge_labels(sitk.GetArrayViewFromImage(out_labels), lut)
    geometry = (out_image.GetSpacing(), out_image.GetOrigin(), out_image.GetDirection())
    with atomic_outputs(image_dst, mask_dst) as (image_tmp, mask_tmp):
        save_volume(image_tmp, sitk.GetArrayViewFromImage(out_image), *geometry)
        save_volume(mask_tmp, anatomy, *geometry, compresslevel=1)
    return {"shape_dhw": anatomy.shape}


def resized_paths(data_root: Path, split: str, name: str) -> tuple[Path, Path]:
    """(image, mask) this step writes for ``name``: ``resized_{split}_images/.../{stem}.nii`` (int16, stored for
    preprocess's memory map) and ``resized_{split}_masks/.../{stem}.nii.gz`` (uint8, gzip level 1: ~1/70 of its
    size for a few ms)."""
    rel = volume_relpath(name)
    stem = nii_stem(name)
    return (Path(data_root) / f"resized_{split}_images" / rel.with_name(stem + ".nii"),
            Path(data_root) / f"resized_{split}_masks" / rel.with_name(stem + NIFTI_GZ))


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, config: str | Path | None = None) -> RunSummary:
    """Resize every fixed volume of this shard (its mask from ``{split}_mask/``)."""
    root = Path(data_root)
    cfg = load_pipeline_config(config)
    lut = build_label_lut(cfg)
    tasks = []
    for name, fixed in fixed_sources(root, split).items():
        image_dst, mask_dst = resized_paths(root, split, name)
        labels = root / f"{split}_mask" / volume_relpath(name)
        fn = partial(resize_case, fixed, labels, image_dst, mask_dst, cfg, lut)
        tasks.append(Task(name, (image_dst, mask_dst), fn, inputs=(*fixed, labels), settings=repr(cfg)))
    return run_tasks("resize", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)


def main(argv: Sequence[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run_cli("resize", lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar, config=args.config))


if __name__ == "__main__":
    sys.exit(main())
