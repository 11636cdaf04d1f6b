"""Step 1, fix (spec §2.1): raw CT-RATE volume + metadata row -> ``{split}_fixed/`` int16 HU, true geometry.

The raw headers are not trusted: spacing ``(x, y) = XYSpacing``, ``z = ZSpacing``;
origin = ``ImagePositionPatient``; direction columns = row cosine, column cosine
and their cross product (``ImageOrientationPatient``); HU = raw * RescaleSlope +
RescaleIntercept, rounded and cast to int16. The output keeps the ``.nii.gz``
name. It is written as gzip level 0 by default ("stored": a valid ``.nii.gz`` that
every reader opens, with no deflate work): on a noisy 512x512x240 CT, level 1
costs ~2.5-3 s of one core to write and ~0.7 s more to read back in ``resize``,
while shrinking the file only ~2x; ``--compresslevel 1..9`` trades that CPU for disk.
Cases are the raw volumes found under ``{split}/``; a volume without a metadata
row is a failed case (metadata rows without a volume are ignored, so a partial
download works).

``--config`` is accepted like in every step; fix needs no setting from it.

Usage: ``cd data && python fix_data.py --split train`` or
``python -m data.fix_data --data-root DIR --split valid``.
"""
from __future__ import annotations

import ast
import csv
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

if __package__ in (None, ""):  # run as `python fix_data.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.io import VolumeReadError, check_complete, count_non_finite, write_volume
from data.common import (METADATA_FILES, CaseError, PipelineError, RunSummary, Task, list_inputs, run_cli,
                         run_tasks, step_parser, volume_relpath)

METADATA_COLUMNS = ("XYSpacing", "ZSpacing", "ImagePositionPatient", "ImageOrientationPatient",
                    "RescaleSlope", "RescaleIntercept")


@dataclass(frozen=True)
class FixGeometry:
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # SimpleITK order: row-major 3x3, columns = axis directions
    slope: float
    intercept: float


def _floats(row: Mapping[str, str], key: str, n: int | None, what: str) -> list[float]:
    text = row.get(key)
    try:
        value = ast.literal_eval(text.strip()) if isinstance(text, str) else text
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (ValueError, SyntaxError, TypeError, AttributeError):
        raise CaseError(f"unparsable {what}: {key}={text!r}") from None
    if (n is not None and len(values) != n) or not all(math.isfinite(v) for v in values):
        raise CaseError(f"unparsable {what}: {key}={text!r}")
    return values


def fix_geometry(row: Mapping[str, str]) -> FixGeometry:
    """Geometry and HU rescale of one metadata row; ``CaseError`` names the bad field."""
    xy = _floats(row, "XYSpacing", 2, "spacing")
    z = _floats(row, "ZSpacing", 1, "spacing")
    spacing = (xy[0], xy[1], z[0])
    if min(spacing) <= 0:
        raise CaseError(f"unparsable spacing: non-positive {spacing}")
    origin = _floats(row, "ImagePositionPatient", 3, "origin")
    cosines = np.asarray(_floats(row, "ImageOrientationPatient", 6, "orientation"))
    row_cos, col_cos = cosines[:3], cosines[3:]
    if (abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3
            or abs(row_cos @ col_cos) > 1e-3):
        raise CaseError(f"unparsable orientation: not orthonormal {cosines.tolist()}")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    direction = np.stack([row_cos, col_cos, np.cross(row_cos, col_cos)], axis=1)
    slope = _floats(row, "RescaleSlope", 1, "rescale")[0]
    intercept = _floats(row, "RescaleIntercept", 1, "rescale")[0]
    return FixGeometry(spacing, (origin[0], origin[1], origin[2]), tuple(direction.ravel().tolist()),
                       slope, intercept)


def to_hu(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``raw * slope + intercept`` rounded to int16 (saturating); one pass in the common integer case."""
    if slope == 1.0 and intercept.is_integer() and np.issubdtype(raw.dtype, np.integer):
        lo, hi = int(raw.min()), int(raw.max())
        if -32768 <= lo + intercept and hi + intercept <= 32767:
            return np.add(raw, int(intercept), dtype=np.int16, casting="unsafe")
    hu = raw.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.rint(hu, out=hu)
    np.clip(hu, -32768, 32767, out=hu)
    return hu.astype(np.int16)


def read_sitk(path: Path, what: str = "NIfTI") -> sitk.Image:
    """``sitk.ReadImage`` with a ``CaseError`` for a missing, corrupt or truncated file (``check_complete``)."""
    if not path.is_file():
        raise CaseError(f"missing {what}: {path}")
    try:
        check_complete(path)
    except VolumeReadError as exc:
        raise CaseError(f"corrupt or truncated {what} {path.name}: {exc}") from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[-160:]
        raise CaseError(f"corrupt or truncated {what} {path.name}: {detail}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{what} {path.name} is not a 3D scalar volume (size {image.GetSize()})")
    return image


def fix_case(src: Path, dst: Path, row: Mapping[str, str] | None, *, compresslevel: int = 0) -> dict:
    """Fix one raw volume: write ``dst`` (int16 HU, metadata geometry). Returns the geometry."""
    if row is None:
        raise CaseError("no metadata row")
    geometry = fix_geometry(row)
    image = read_sitk(src)
    non_finite = count_non_finite(src)
    if non_finite:
        raise CaseError(f"{non_finite} non-finite voxels (NaN or inf) in {src.name}: replace or drop the volume")
    hu = to_hu(sitk.GetArrayViewFromImage(image), geometry.slope, geometry.intercept)  # (D, H, W)
    write_volume(dst, hu, geometry.spacing_xyz, geometry.origin_xyz, geometry.direction,
                 compresslevel=compresslevel)
    return {"shape_dhw": hu.shape, "spacing_xyz": geometry.spacing_xyz}


def read_metadata(data_root: Path, split: str) -> dict[str, dict[str, str]]:
    """``VolumeName -> {column: text}`` for the columns fix needs."""
    path = Path(data_root) / METADATA_FILES[split]
    if not path.is_file():
        raise PipelineError(f"metadata file not found: {path} (check --data-root)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("VolumeName",) + METADATA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: missing columns {missing}")
        return {r["VolumeName"]: {c: r[c] for c in METADATA_COLUMNS} for r in reader}


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, compresslevel: int = 0) -> RunSummary:
    """Fix every raw volume of ``{data_root}/{split}/`` (this shard's part)."""
    root = Path(data_root)
    names = list_inputs(root / split)
    metadata = read_metadata(root, split)
    tasks = []
    for name in names:
        rel = volume_relpath(name)
        dst = root / f"{split}_fixed" / rel
        tasks.append(Task(name, (dst,), partial(fix_case, root / split / rel, dst, metadata.get(name),
                                                compresslevel=compresslevel),
                          inputs=(root / split / rel,), settings=repr((metadata.get(name), compresslevel))))
    return run_tasks("fix", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)


def main(argv: Sequence[str] | None = None) -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--compresslevel", type=int, choices=range(0, 10), default=0, metavar="0-9",
                        help="gzip level of the .nii.gz output (default 0: stored, fastest; 1 halves the size)")
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar, compresslevel=args.compresslevel))


if __name__ == "__main__":
    sys.exit(main())
