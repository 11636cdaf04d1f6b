"""Step 1, fix (spec §2.1): raw CT-RATE volume + metadata row -> its fix record: int16 HU, true geometry.

The raw headers are not trusted: spacing ``(x, y) = XYSpacing``, ``z = ZSpacing``;
origin = ``ImagePositionPatient``; direction columns = row cosine, column cosine
and their cross product (``ImageOrientationPatient``); HU = raw * RescaleSlope +
RescaleIntercept, rounded and cast to int16. Cases are the raw volumes found under
``{split}/``; a volume without a metadata row is a failed case (metadata rows without
a volume are ignored, so a partial download works).

What is written is not a second copy of the volume but its fix record,
``{split}_fixed/{patient}/{scan}/{stem}.fix.json`` (~0.5 kB: version, geometry, rescale
and the raw file's size and mtime). The next steps read a case's fixed volume with
``read_fixed``: the raw volume with its record applied in memory, one rescale pass.
A copy would be the largest file of the pipeline (~140 MB per 512x512x250 volume
stored, ~70 MB and +2 s of one core at gzip level 1; docs/benchmarks.md) and only
ever read back by the next two steps. A ``.nii.gz`` that is already in ``{split}_fixed/``
(the v2 download, ``data.import_ct``) is read as it is and wins over a record.

CT-RATE v1 or v2 (spec §2): the current download (v2, ``{split}_fixed/``) already
holds HU and the true geometry while the metadata still lists the rescale, so each
volume found under ``{split}/`` is classified before anything is applied:

- values (decisive when they are): a chest CT in HU holds air (>= 0.5 % of voxels in
  [-1100, -900] HU), almost nothing less dense than air short of a padding value
  (< 5 % in (-2000, -1100) HU) and something denser than water (max >= 100 HU).
  v1 when only ``stored * slope + intercept`` looks like that, v2 when only the
  stored values do, a failed case when neither does. The tests run on a sample
  (every 4th voxel along each axis).
- header geometry (tie-break, e.g. slope 1 and intercept 0, where both read alike):
  v2 when spacing, origin and direction equal the metadata row's (1e-3 mm, 1e-2 mm,
  1e-3), v1 otherwise (v1 headers do not carry the real geometry).

Only v1 is rescaled; both get the metadata geometry, so the two versions of a scan
give the same fixed volume. The decision per volume goes to
``fix_{split}_versions.csv`` (``volume,version,evidence``; ``_shardKofN`` like the
failures file; rebuilt after every run from the fix records of the shard's volumes, so a
killed run and its rerun leave the rows an uninterrupted run would). A data root with
``{split}_fixed/`` and no ``{split}/`` (the v2 download as is) has nothing to fix: the
step says so and exits 0.

``--config`` is accepted like in every step; fix needs no setting from it.

Usage: ``cd data && python fix_data.py --split train`` or
``python -m data.fix_data --data-root DIR --split valid``.
"""
from __future__ import annotations

import ast
import csv
import logging
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

if __package__ in (None, ""):  # run as `python fix_data.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.common import (METADATA_FILES, NIFTI_GZ, CaseError, PipelineError, RunSummary, Task, failures_csv_path,
                         list_inputs, nii_stem, run_cli, run_tasks, select_shard, step_parser, volume_relpath)
from data.io import (VolumeReadError, check_complete, count_non_finite, file_fingerprint, read_json, write_csv,
                     write_json)

logger = logging.getLogger(__name__)

FIX_RECORD = ".fix.json"
MIN_Z_EXTENT_MM = 100.0  # plausibility: a chest CT covers ~250-400 mm head to foot; less is a partial scan
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
    """``sitk.ReadImage`` with a ``CaseError`` for a missing, corrupt or truncated file (``check_complete``)
    or one holding NaN or inf voxels (``check_finite``)."""
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
    check_finite(count_non_finite(path), path.name)  # SimpleITK has already made them finite
    return image


def check_finite(non_finite: int, name: str) -> None:
    """``CaseError`` naming the count when a volume holds NaN or inf voxels (a float file)."""
    if non_finite:
        raise CaseError(f"{non_finite} non-finite voxels (NaN or inf) in {name}: replace or drop the volume")


def looks_like_hu(values: np.ndarray) -> bool:
    """A chest CT in HU: air present, hardly anything less dense than air (padding aside), max >= 100 HU."""
    n = values.size
    air = np.count_nonzero((values >= -1100) & (values <= -900))
    below_air = np.count_nonzero((values > -2000) & (values < -1100))
    return air >= 0.005 * n and below_air < 0.05 * n and values.max() >= 100


def implausible_ct(hu: np.ndarray, spacing_xyz: Sequence[float]) -> str | None:
    """One line saying why a volume (``(D, H, W)`` = (z, y, x), reoriented, HU) cannot be the chest CT the
    model expects, or ``None``: values that are not CT in HU (``looks_like_hu`` on every 4th voxel: e.g. MR,
    or stored values without their rescale), or fewer than ``MIN_Z_EXTENT_MM`` along z. The one check of
    ``import_ct`` and ``predict.py``."""
    problems = []
    sample = np.asarray(hu[::4, ::4, ::4], dtype=np.float32)
    if not looks_like_hu(sample):
        air = np.count_nonzero((sample >= -1100) & (sample <= -900)) / sample.size
        problems.append(f"values are not CT in HU (range {sample.min():g}..{sample.max():g}, {100 * air:.1f} % "
                        "air voxels): check the modality and the rescale")
    extent = hu.shape[0] * float(spacing_xyz[2])
    if extent < MIN_Z_EXTENT_MM:
        problems.append(f"covers only {extent:.0f} mm along z ({hu.shape[0]} slices): a chest CT covers "
                        f"~250-400 mm")
    return "; ".join(problems) or None


def header_matches(image: sitk.Image, geometry: FixGeometry) -> bool:
    """Header spacing, origin and direction equal the metadata row's (v2 headers carry the true geometry)."""
    return (np.allclose(image.GetSpacing(), geometry.spacing_xyz, rtol=0, atol=1e-3)
            and np.allclose(image.GetOrigin(), geometry.origin_xyz, rtol=0, atol=1e-2)
            and np.allclose(image.GetDirection(), geometry.direction, rtol=0, atol=1e-3))


def ctrate_version(image: sitk.Image, stored: np.ndarray, geometry: FixGeometry) -> tuple[int, str]:
    """(1 or 2, evidence) for one volume found under ``{split}/`` (module docstring); ``CaseError`` if neither."""
    sample = np.asarray(stored[::4, ::4, ::4], dtype=np.float32)
    as_stored = looks_like_hu(sample)
    rescaled = looks_like_hu(sample * np.float32(geometry.slope) + np.float32(geometry.intercept))
    header = 2 if header_matches(image, geometry) else 1
    rescale = f"slope {geometry.slope:g}, intercept {geometry.intercept:g}"
    if not (as_stored or rescaled):
        raise CaseError(f"neither CT-RATE v1 nor v2: the values are not HU as stored nor after the metadata "
                        f"rescale ({rescale}; stored range {stored.min()}..{stored.max()})")
    if as_stored != rescaled:
        version = 2 if as_stored else 1
        agree = "agrees" if header == version else "disagrees"
        return version, f"values are HU {'as stored' if as_stored else 'after ' + rescale}; header {agree}"
    return header, (f"values read as HU either way ({rescale}); header "
                    f"{'equals' if header == 2 else 'differs from'} the metadata geometry")


def fix_case(src: Path, record: Path, row: Mapping[str, str] | None) -> dict:
    """Classify one raw volume and write its fix record (rescale only if it is v1 raw)."""
    if row is None:
        raise CaseError("no metadata row")
    geometry = fix_geometry(row)
    image = read_sitk(src)
    stored = sitk.GetArrayViewFromImage(image)  # (D, H, W)
    version, evidence = ctrate_version(image, stored, geometry)
    applied = geometry if version == 1 else replace(geometry, slope=1.0, intercept=0.0)
    write_json(record, {"raw": file_fingerprint([src])[0], "version": version, "evidence": evidence,
                        "shape_dhw": list(stored.shape), **asdict(applied)})
    return {"shape_dhw": stored.shape, "spacing_xyz": geometry.spacing_xyz, "version": version,
            "evidence": evidence}


def fix_record_path(fixed: Path) -> Path:
    """``{split}_fixed/.../{stem}.nii.gz`` -> its fix record ``{stem}.fix.json`` beside it."""
    return fixed.with_name(nii_stem(fixed.name) + FIX_RECORD)


def fixed_sources(data_root: Path, split: str) -> dict[str, tuple[Path, ...]]:
    """``VolumeName -> files`` its fixed volume is read from (``read_fixed``): ``({split}_fixed/...nii.gz,)``,
    else ``(fix record, raw volume)``; ``PipelineError`` when there is no ``{split}_fixed/``."""
    folder = Path(data_root) / f"{split}_fixed"
    sources = {}
    for record in list_inputs(folder, FIX_RECORD):
        name = record[: -len(FIX_RECORD)] + NIFTI_GZ
        rel = volume_relpath(name)
        sources[name] = (folder / rel.with_name(record), Path(data_root) / split / rel)
    sources.update({name: (folder / volume_relpath(name),) for name in list_inputs(folder)})
    return dict(sorted(sources.items()))


def read_fixed(sources: Sequence[Path]) -> sitk.Image:
    """The fixed volume (int16 HU, true geometry) of one case from its ``fixed_sources`` entry."""
    if len(sources) == 1:
        return read_sitk(sources[0], "fixed volume")
    record_path, raw = sources
    record = read_json(record_path)
    keys = ("raw", "shape_dhw", *(f.name for f in fields(FixGeometry)))
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise CaseError(f"unreadable fix record {record_path}: rerun fix_data")
    if file_fingerprint([raw])[0] != record["raw"]:
        raise CaseError(f"{raw} is missing or changed since fix_data ran: rerun fix_data")
    image = read_sitk(raw)
    stored = sitk.GetArrayViewFromImage(image)
    if list(stored.shape) != record["shape_dhw"]:
        raise CaseError(f"{raw} is not the volume fix_data recorded (shape {list(stored.shape)}, recorded "
                        f"{record['shape_dhw']}): rerun fix_data")
    return fixed_image(stored, FixGeometry(tuple(record["spacing_xyz"]), tuple(record["origin_xyz"]),
                                           tuple(record["direction"]), float(record["slope"]),
                                           float(record["intercept"])))


def fixed_image(stored: np.ndarray, geometry: FixGeometry) -> sitk.Image:
    """The fixed volume of ``stored`` values: int16 HU (``to_hu`` with the geometry's rescale), true geometry."""
    fixed = sitk.GetImageFromArray(to_hu(stored, geometry.slope, geometry.intercept))
    fixed.SetSpacing(geometry.spacing_xyz), fixed.SetOrigin(geometry.origin_xyz)
    fixed.SetDirection(geometry.direction)
    return fixed


def read_metadata(data_root: Path, split: str) -> dict[str, dict[str, str]]:
    """``VolumeName -> {column: text}`` for the columns fix needs. Two rows of one volume that disagree on
    them are a ``PipelineError`` naming both lines; identical repeats are used once (logged)."""
    path = Path(data_root) / METADATA_FILES[split]
    if not path.is_file():
        raise PipelineError(f"metadata file not found: {path} (check --data-root)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("VolumeName",) + METADATA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: missing columns {missing}")
        rows: dict[str, dict[str, str]] = {}
        lines: dict[str, int] = {}
        repeated = 0
        for r in reader:
            name, row = r["VolumeName"], {c: r[c] for c in METADATA_COLUMNS}
            if name in rows and rows[name] != row:  # an identical repeated row says nothing new: used once
                differ = [c for c in METADATA_COLUMNS if rows[name][c] != row[c]]
                raise PipelineError(f"{path}: rows {lines[name]} and {reader.line_num} both describe {name} and "
                                    f"disagree on {', '.join(differ)}: keep the right one and delete the other")
            repeated += name in rows
            rows.setdefault(name, row)
            lines.setdefault(name, reader.line_num)
    if repeated:
        logger.info("%s: %d repeated row(s) identical to an earlier row of their volume: each volume used once",
                    path, repeated)
    return rows


def run(data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True) -> RunSummary:
    """Fix every volume of ``{data_root}/{split}/`` (this shard's part); nothing when only ``{split}_fixed/`` exists."""
    root = Path(data_root)
    if not (root / split).is_dir() and (root / f"{split}_fixed").is_dir():
        logger.info("fix %s: nothing to fix: %s holds the CT-RATE v2 download (already HU, true geometry) and "
                    "there is no %s", split, root / f"{split}_fixed", root / split)
        return run_tasks("fix", split, root, [], shard=shard, pbar=False)
    names = list_inputs(root / split)
    metadata = read_metadata(root, split)
    tasks = []
    for name in names:
        rel = volume_relpath(name)
        record = fix_record_path(root / f"{split}_fixed" / rel)
        tasks.append(Task(name, (record,), partial(fix_case, root / split / rel, record, metadata.get(name)),
                          inputs=(root / split / rel,), settings=repr(metadata.get(name))))
    summary = run_tasks("fix", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)
    versions = versions_csv_path(root, split, shard)
    rows = []  # from the fix records of this shard's cases: the same after a killed run and its rerun
    for name in select_shard(names, shard):
        record = read_json(fix_record_path(root / f"{split}_fixed" / volume_relpath(name)))
        if isinstance(record, dict) and "version" in record:
            rows.append((name, str(record["version"]), record.get("evidence", "")))
    write_csv(versions, ("volume", "version", "evidence"), rows)
    counts = [sum(r["version"] == v for r in summary.results.values()) for v in (1, 2)]
    logger.info("fix %s: this run CT-RATE v1 (rescaled) %d, v2 (already HU, not rescaled) %d (per volume: %s)",
                split, *counts, versions)
    return summary


def versions_csv_path(data_root: Path, split: str, shard: tuple[int, int]) -> Path:
    """``fix_{split}[_shardKofN]_versions.csv``, next to the failures file."""
    failures = failures_csv_path(data_root, "fix", split, shard)
    return failures.with_name(failures.name.replace("_failures.csv", "_versions.csv"))


def main(argv: Sequence[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    return run_cli("fix_data", lambda: run(args.data_root, args.split, overwrite=args.overwrite, workers=args.workers,
                               shard=args.shard, pbar=not args.no_pbar))


if __name__ == "__main__":
    sys.exit(main())
