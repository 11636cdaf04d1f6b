"""Step 1 for data that is not CT-RATE: CT volumes already in HU -> ``{split}_fixed/``, like ``fix_data``.

Inputs: ``--input`` is a folder, or a CSV listing volumes (column ``path``, relative to
the CSV's folder or absolute; optionally ``id``, and ``spacing_x``, ``spacing_y``, ``spacing_z``
in mm for NPZ files that do not hold their spacing). In a folder every entry is one
volume: a ``.nii``/``.nii.gz`` file, a ``.npz`` file, or a folder holding one DICOM series.

- NIfTI and DICOM: HU values and geometry are read from the file (SimpleITK; a DICOM
  series gets its RescaleSlope/Intercept applied by GDCM).
- NPZ (the format of Rad-ChestCT): the array under ``ct`` (or the file's only array), laid
  out ``(z, y, x)``, and its voxel spacing under ``spacing``, ordered as ``--npz-spacing-order``
  says (``zyx`` by default, the array's order), or else the listing's spacing columns. Optional keys ``origin`` (x, y, z mm) and
  ``direction`` (9 floats, SimpleITK order); without ``direction`` the array is taken as
  +x = patient left, +y = posterior, +z = superior (CT-RATE's orientation).

Every volume is reoriented to that same orientation (``DICOMOrient(.., "LPS")``: axis
flips and permutations only, no resampling), rounded to int16 HU and written with its
geometry, so that one patient gives the same fixed array whatever the source format, and
``generate_mask``, ``resize``, ``preprocess`` and ``eval.py`` run unchanged.

Checks: a DICOM series whose slices are not evenly spaced (a missing or repeated slice;
gaps must agree within max(0.01 mm, 1 %)) is a failed case, not read on an averaged
spacing; a volume whose values cannot be CT in HU or that covers under 100 mm along z
(``data.fix_data.implausible_ct``) is imported with a warning (``import_{split}_warnings.csv``).
A rerun redoes a volume whose source files (size, mtime) or settings (``--npz-spacing-order``
for an NPZ, listed spacing, ``--compresslevel``) changed.

Own masks: ``--masks DIR`` takes each volume's TotalSegmentator ``total`` label map
``DIR/{ID}.nii.gz`` (or ``.nii``), on the source's grid (e.g. made on the user's RAS
NIfTI), checks it against the source's geometry, reorients it with its volume and writes it,
renamed, to ``{data_root}/imported_masks/{split}/{patient}/{scan}/{name}``: then
``generate_mask --masks-from {data_root}/imported_masks`` takes it. A volume without its
mask is a failed case.

Names: a volume with id ``ID`` (the CSV's ``id``, else the file or folder name without its
suffixes) becomes ``{split}_{ID}_a_1.nii.gz`` in
``{split}_fixed/{split}_{ID}/{split}_{ID}_a/`` (CT-RATE's ``name.rsplit('_', 1|2)`` layout:
patient ``{split}_{ID}``, scan ``{split}_{ID}_a``, reconstruction 1). ``ID`` must be letters,
digits, ``-`` or ``.`` (no ``_``: the layout splits on it). ``volume_id`` maps a name back
to its ID (how ``--labels-map`` finds a dataset's label row).

Skip / atomic write / ``import_{split}_failures.csv`` / exit status: as every step
(``data.common.run_tasks``). Usage:
``python -m data.import_ct --input /data/radchestct/valid --data-root data_radchest --split valid``.
"""
from __future__ import annotations

import csv
import re
from collections import Counter
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python import_ct.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.io import IDENTITY_DIRECTION, atomic_outputs, keep_locale, save_volume
from data.common import (CaseError, PipelineError, RunSummary, Task, patient_id_of, run_cli, run_tasks,
                         step_parser, volume_relpath)
from data.fix_data import check_finite, implausible_ct, read_sitk, to_hu
from data.generate_mask import check_labels, check_same_geometry, total_class_ids

NPZ_ARRAY_KEY = "ct"
NPZ_SPACING_KEY = "spacing"
ID_PATTERN = re.compile(r"[A-Za-z0-9.-]+")
CANONICAL_ORIENTATION = "LPS"  # DICOMOrient code of the identity direction (+x left, +y posterior, +z superior)
POSITION_TAG = "0020|0032"  # ImagePositionPatient
SLICE_GAP_TOLERANCE_MM, SLICE_GAP_TOLERANCE = 0.01, 0.01  # a gap may differ from the median by max(0.01 mm, 1 %)
MASKS_FOLDER = "imported_masks"  # {data_root}/imported_masks/{split}/...: for generate_mask --masks-from


@dataclass(frozen=True)
class Source:
    """One volume to import: its path and the id that names it."""

    id: str
    path: Path
    spacing_xyz: tuple[float, float, float] | None = None  # from a listing, for NPZ without 'spacing'


def volume_name(split: str, volume_id: str) -> str:
    """``("valid", "trn00001")`` -> ``valid_trn00001_a_1.nii.gz``."""
    return f"{split}_{volume_id}_a_1.nii.gz"


def volume_id(name: str) -> str:
    """Inverse of ``volume_name``: ``valid_trn00001_a_1.nii.gz`` -> ``trn00001``."""
    return patient_id_of(name).split("_", 1)[1]  # {split}_{ID} -> {ID}


def _source_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _checked(sources: list[Source], where: Path) -> list[Source]:
    bad = [s.id for s in sources if not ID_PATTERN.fullmatch(s.id)]
    if bad:
        raise PipelineError(f"{where}: ids {bad[:3]} must hold only letters, digits, '-' or '.' "
                            "(rename them or give an 'id' column in a CSV listing)")
    dup = sorted(i for i, n in Counter(s.id for s in sources).items() if n > 1)
    if dup:
        raise PipelineError(f"{where}: ids {dup[:3]} occur twice (give an 'id' column in a CSV listing)")
    return sources


def _listed_spacing(row: dict[str, str], listing: Path) -> tuple[float, float, float] | None:
    cells = [row.get(f"spacing_{axis}") for axis in "xyz"]
    if not any(cells):
        return None
    try:
        x, y, z = (float(c) for c in cells)
    except (TypeError, ValueError):
        raise PipelineError(f"{listing}: row {row.get('path')!r} needs numbers in spacing_x, spacing_y, spacing_z, "
                            f"got {cells}") from None
    return x, y, z


def list_sources(input_path: str | Path) -> list[Source]:
    """Volumes of a folder (NIfTI / NPZ files, DICOM series folders) or of a CSV listing."""
    input_path = Path(input_path)
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        with open(input_path, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise PipelineError(f"{input_path}: a listing needs a 'path' column (and optionally 'id')")
            rows = list(reader)
        sources = []
        for row in rows:
            path = Path(row["path"])
            path = path if path.is_absolute() else input_path.parent / path
            sources.append(Source(row.get("id") or _source_id(path), path, _listed_spacing(row, input_path)))
        return _checked(sources, input_path)
    if not input_path.is_dir():
        raise PipelineError(f"input not found: {input_path} (set --input to a folder or a CSV listing)")
    entries = sorted(p for p in input_path.iterdir() if not p.name.startswith("."))
    volumes = [p for p in entries if p.is_dir() or p.name.endswith((".nii", ".nii.gz", ".npz"))]
    if not volumes:
        raise PipelineError(f"{input_path}: no .nii, .nii.gz, .npz file or DICOM folder (check --input)")
    return _checked([Source(_source_id(p), p) for p in volumes], input_path)


# ---------------------------------------------------------------------------- readers

def read_dicom_series(folder: Path) -> sitk.Image:
    """The single DICOM series of ``folder`` (slices sorted by position, rescale applied)."""
    reader = sitk.ImageSeriesReader()
    with keep_locale():
        series = reader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise CaseError(f"no DICOM series in folder {folder.name}")
        if len(series) > 1:
            raise CaseError(f"{len(series)} DICOM series in folder {folder.name}: put each in its own folder")
        files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice positions
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise CaseError(f"unreadable DICOM series {folder.name}: {' '.join(str(exc).split())[-160:]}") from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise CaseError(f"DICOM series {folder.name} is not a 3D volume ({len(files)} slice(s))")
    check_slice_spacing(folder.name, [reader.GetMetaData(i, POSITION_TAG) if reader.HasMetaDataKey(i, POSITION_TAG)
                                      else None for i in range(len(files))], image.GetDirection())
    return image


def check_slice_spacing(series: str, positions: Sequence[str | None], direction: Sequence[float]) -> None:
    """``CaseError`` unless the slices (ImagePositionPatient texts) lie at one spacing along the slice normal:
    a missing slice or uneven spacing would otherwise be read on one averaged spacing, shifting slices by mm."""
    if None in positions:
        raise CaseError(f"DICOM series {series}: a slice has no ImagePositionPatient: cannot check its spacing")
    try:
        xyz = np.array([[float(v) for v in text.split("\\")] for text in positions])
    except ValueError:
        raise CaseError(f"DICOM series {series}: unparsable ImagePositionPatient") from None
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    gaps = np.diff(np.sort(xyz @ normal))
    median = float(np.median(gaps))
    tolerance = max(SLICE_GAP_TOLERANCE_MM, SLICE_GAP_TOLERANCE * median)
    if median <= tolerance or np.abs(gaps - median).max() > tolerance:
        raise CaseError(f"DICOM series {series}: uneven slice spacing (gaps {gaps.min():.3g} to {gaps.max():.3g} mm, "
                        f"median {median:.3g}; a missing or repeated slice?): complete the series, or resample "
                        "it to an even spacing and import that")


def read_npz(path: Path, spacing_order: str = "zyx", listed_spacing_xyz: Sequence[float] | None = None) -> sitk.Image:
    """An NPZ volume (module docstring) as a SimpleITK image with its geometry."""
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CaseError(f"unreadable NPZ {path.name}: {exc}") from None
    volumes = [k for k, v in arrays.items() if v.ndim == 3]
    key = NPZ_ARRAY_KEY if NPZ_ARRAY_KEY in arrays else (volumes[0] if len(volumes) == 1 else None)
    if key is None or arrays[key].ndim != 3:
        raise CaseError(f"NPZ {path.name} has no 3D array '{NPZ_ARRAY_KEY}' (keys: {sorted(arrays)})")
    if np.issubdtype(arrays[key].dtype, np.floating):
        check_finite(int(np.count_nonzero(~np.isfinite(arrays[key]))), path.name)
    if NPZ_SPACING_KEY in arrays and arrays[NPZ_SPACING_KEY].size == 3:
        spacing = [float(v) for v in arrays[NPZ_SPACING_KEY].ravel()]
        spacing_xyz = spacing[::-1] if spacing_order == "zyx" else spacing
    elif listed_spacing_xyz is not None:
        spacing = spacing_xyz = list(listed_spacing_xyz)
    else:
        raise CaseError(f"NPZ {path.name} has no 3-number '{NPZ_SPACING_KEY}' (keys: {sorted(arrays)}): "
                        "add it, or list the file in a CSV with spacing_x, spacing_y, spacing_z")
    if not all(np.isfinite(spacing_xyz)) or min(spacing_xyz) <= 0:
        raise CaseError(f"NPZ {path.name}: spacing must be 3 positive numbers, got {spacing}")
    image = sitk.GetImageFromArray(arrays[key])
    image.SetSpacing(spacing_xyz)
    if "origin" in arrays:
        image.SetOrigin([float(v) for v in arrays["origin"].ravel()])
    direction = [float(v) for v in arrays["direction"].ravel()] if "direction" in arrays else IDENTITY_DIRECTION
    try:
        image.SetDirection(direction)
    except RuntimeError:
        raise CaseError(f"NPZ {path.name}: 'direction' must be 9 numbers of an orthonormal matrix") from None
    return image


def read_source(path: Path, *, npz_spacing_order: str = "zyx",
                listed_spacing_xyz: Sequence[float] | None = None) -> sitk.Image:
    """SimpleITK image (HU, true geometry) of one source volume of any supported format."""
    if not path.exists():
        raise CaseError(f"missing input: {path}")
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith(".npz"):
        return read_npz(path, npz_spacing_order, listed_spacing_xyz)
    return read_sitk(path)


def import_case(source: Source, dst: Path, *, npz_spacing_order: str = "zyx", compresslevel: int = 0,
                mask: tuple[Path, Path] | None = None) -> dict:
    """Read one volume, reorient it to the canonical axes and write ``dst`` (int16 HU); with ``mask``
    (its label map on the source's grid, where to write it) the labels likewise. A volume that cannot be a
    chest CT in HU (``implausible_ct``) is written with a warning."""
    image = read_source(source.path, npz_spacing_order=npz_spacing_order, listed_spacing_xyz=source.spacing_xyz)
    labels = None
    if mask is not None:
        labels = read_sitk(mask[0], "mask")
        check_same_geometry(image, labels)
        labels = sitk.DICOMOrient(labels, CANONICAL_ORIENTATION)
        labels = check_labels(sitk.GetArrayFromImage(labels), total_class_ids())
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    hu = to_hu(sitk.GetArrayViewFromImage(image), 1.0, 0.0)  # (D, H, W)
    geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    with atomic_outputs(dst, *([mask[1]] if mask else [])) as tmps:  # the volume and its mask together
        save_volume(tmps[0], hu, *geometry, compresslevel=compresslevel)
        if labels is not None:
            save_volume(tmps[1], labels, *geometry, compresslevel=1)
    return {"shape_dhw": hu.shape, "spacing_xyz": image.GetSpacing(), "warning": implausible_ct(hu, geometry[0])}


def source_files(path: Path) -> tuple[Path, ...]:
    """The files a source is read from (a DICOM folder's slices): what a rerun compares to redo it."""
    if path.is_dir():
        return tuple(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
    return (path,)


def mask_source(masks: Path, source: Source) -> Path:
    """``{masks}/{ID}.nii.gz`` (or ``.nii``): the label map given with a volume."""
    gz = masks / f"{source.id}.nii.gz"
    return gz if gz.exists() or not (masks / f"{source.id}.nii").exists() else masks / f"{source.id}.nii"


def run(input_path: str | Path, data_root: str | Path, split: str, *, overwrite: bool = False, workers: int = 1,
        shard: tuple[int, int] = (0, 1), pbar: bool = True, npz_spacing_order: str = "zyx",
        compresslevel: int = 0, masks: str | Path | None = None) -> RunSummary:
    """Import every listed volume into ``{data_root}/{split}_fixed/`` (this shard's part), and with ``masks``
    each volume's label map into ``{data_root}/imported_masks/{split}/``. A case is redone when a source file
    (size, mtime) or a setting that decides its output changed."""
    root = Path(data_root)
    if masks is not None and not Path(masks).is_dir():
        raise PipelineError(f"--masks: folder not found: {masks}")
    tasks = []
    for source in list_sources(input_path):
        name = volume_name(split, source.id)
        dst = root / f"{split}_fixed" / volume_relpath(name)
        mask = (mask_source(Path(masks), source), root / MASKS_FOLDER / split / volume_relpath(name)) if masks else None
        inputs = source_files(source.path) + ((mask[0],) if mask else ())
        order = npz_spacing_order if source.path.name.endswith(".npz") else None
        tasks.append(Task(name, (dst,) + ((mask[1],) if mask else ()),
                          partial(import_case, source, dst, npz_spacing_order=npz_spacing_order,
                                  compresslevel=compresslevel, mask=mask),
                          inputs=inputs, settings=repr((order, source.spacing_xyz, compresslevel))))
    return run_tasks("import", split, root, tasks, overwrite=overwrite, workers=workers, shard=shard, pbar=pbar)


def main(argv: Sequence[str] | None = None) -> int:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True,
                        help="folder of volumes (.nii/.nii.gz/.npz files, DICOM series folders) or a CSV listing")
    parser.add_argument("--npz-spacing-order", choices=("zyx", "xyz"), default="zyx",
                        help="axis order of an NPZ's 'spacing' (default zyx, the array's order)")
    parser.add_argument("--compresslevel", type=int, choices=range(0, 10), default=0, metavar="0-9",
                        help="gzip level of the .nii.gz output (default 0: stored, the fastest to write and read)")
    parser.add_argument("--masks", type=Path, default=None,
                        help="folder of TotalSegmentator `total` label maps {ID}.nii.gz on the sources' grids: "
                             "reoriented and renamed with their volumes into DATA_ROOT/imported_masks/{split}/ "
                             "(then: generate_mask --masks-from DATA_ROOT/imported_masks)")
    args = parser.parse_args(argv)
    return run_cli("import_ct", lambda: run(args.input, args.data_root, args.split, overwrite=args.overwrite,
                               workers=args.workers, shard=args.shard, pbar=not args.no_pbar,
                               npz_spacing_order=args.npz_spacing_order, compresslevel=args.compresslevel,
                               masks=args.masks))


if __name__ == "__main__":
    sys.exit(main())
