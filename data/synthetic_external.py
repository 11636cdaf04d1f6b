"""A small synthetic *external* CT set (not CT-RATE's layout) for ``data.import_ct`` and the external path.

The phantoms, lesions and texts of ``data.synthetic`` (by import, split id 2 so that no scan
repeats a CT-RATE synthetic one), stored the way other collections store CT:

- ``volumes/{id}.npz`` (Rad-ChestCT-like: ``ct`` int16 HU ``(z, y, x)`` with the slices
  stored top to bottom, ``spacing`` in ``(z, y, x)`` order, ``direction`` saying z runs
  inferior and ``origin``), ``volumes/{id}/`` (a DICOM series, one file per slice) and
  ``volumes/{id}.nii.gz`` (x and y axes flipped: the RAS array order of many NIfTI tools),
  in turn;
- ``masks/{split}/...``: TotalSegmentator ``total`` labels on the grid ``import_ct`` writes
  (named by ``import_ct.volume_name``), for ``generate_mask --masks-from``;
- ``labels.csv``: column ``NoteAcc_DEID`` (the id) + findings named the dataset's way
  (``LABEL_COLUMNS``); two simulated findings have no column, as in a real external set;
- ``desc_info.json`` / ``conc_info.json``: anatomy-wise texts keyed by scan id (for retrieval).

``configs/labels/synthetic_external.yaml`` maps these columns to the zero-shot abnormalities.
Usage: ``python -m data.synthetic_external --data-root demo/external --n 12``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python synthetic_external.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from data.io import atomic_output, keep_locale, write_text, write_volume
from data.common import scan_id_of, volume_relpath
from data.import_ct import volume_name
from data.synthetic import (Stream, load_anatomies, plan_abnormalities, rngs, scan_phantom, scan_texts,
                            truth_volume)

logger = logging.getLogger(__name__)

SPLIT_ID = 2  # data.synthetic uses 0 (train) and 1 (valid)
ID_COLUMN = "NoteAcc_DEID"
FORMATS = ("npz", "dicom", "nifti_ras")
# Dataset column of each simulated abnormality; None = the dataset has no such label.
LABEL_COLUMNS: dict[str, str | None] = {
    "Emphysema": "emphysema", "Atelectasis": "atelectasis", "Lung nodule": "nodule",
    "Lung opacity": "opacity", "Pleural effusion": "pleural_effusion", "Consolidation": "consolidation",
    "Cardiomegaly": "cardiomegaly", "Pericardial effusion": "pericardial_effusion",
    "Coronary artery wall calcification": None, "Hiatal hernia": None,
    "Arterial wall calcification": "calcification",
}


def external_id(i: int) -> str:
    return f"tst{i:05d}"


def write_npz(path: Path, hu: np.ndarray, spacing_xyz, origin_xyz) -> None:
    """Slices top to bottom: voxel k sits at z = origin_z + (D - 1 - k) * sz, direction z = -1."""
    d = hu.shape[0]
    top = (origin_xyz[0], origin_xyz[1], origin_xyz[2] + (d - 1) * spacing_xyz[2])
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, ct=hu[::-1], spacing=np.asarray(spacing_xyz[::-1]), origin=np.asarray(top),
                            direction=np.diag([1.0, 1.0, -1.0]).ravel())


def write_dicom_series(folder: Path, hu: np.ndarray, spacing_xyz, origin_xyz) -> None:
    """One CT slice file per z (int16 HU, RescaleSlope 1, RescaleIntercept 0), positions in the tags."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + str(zlib.crc32(folder.name.encode()))
    for k in range(hu.shape[0]):
        sl = sitk.GetImageFromArray(hu[k])
        sl.SetSpacing(spacing_xyz[:2])
        z = origin_xyz[2] + k * spacing_xyz[2]
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".0",
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": f"{origin_xyz[0]:.4f}\\{origin_xyz[1]:.4f}\\{z:.4f}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{spacing_xyz[2]:g}", "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        with keep_locale():
            writer.Execute(sl)


def write_nifti_ras(path: Path, hu: np.ndarray, spacing_xyz, origin_xyz) -> None:
    """x and y reversed in the array, direction diag(-1, -1, 1): the same physical volume."""
    _, h, w = hu.shape
    img = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, ::-1, ::-1]))
    img.SetSpacing(spacing_xyz)
    img.SetOrigin((origin_xyz[0] + (w - 1) * spacing_xyz[0], origin_xyz[1] + (h - 1) * spacing_xyz[1],
                   origin_xyz[2]))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, str(tmp))


def generate_external(out_dir: str | Path, *, n: int = 12, seed: int = 0, split: str = "valid") -> dict[str, Any]:
    """Write the external set (module docstring) under ``out_dir``; returns {id: format}."""
    import pandas as pd

    out = Path(out_dir)
    anatomies = [a for a, _ in load_anatomies()]
    writers = {"npz": lambda i, *a: write_npz(out / "volumes" / f"{i}.npz", *a),
               "dicom": lambda i, *a: write_dicom_series(out / "volumes" / i, *a),
               "nifti_ras": lambda i, *a: write_nifti_ras(out / "volumes" / f"{i}.nii.gz", *a)}
    formats, labels, desc_info, conc_info = {}, [], {}, {}
    for k, abnormalities in enumerate(plan_abnormalities(np.random.default_rng([seed, 99, SPLIT_ID]), n)):
        vid, fmt = external_id(k + 1), FORMATS[k % len(FORMATS)]
        entry = {"split_id": SPLIT_ID, "patient_no": k + 1, "scan_idx": 0, "recon": 1,
                 "abnormalities": abnormalities}
        hu, _, lab, grid, _ = truth_volume(seed, entry, False)
        writers[fmt](vid, hu, grid.spacing_xyz, grid.origin_xyz)
        name = volume_name(split, vid)
        write_volume(out / "masks" / split / volume_relpath(name), lab, grid.spacing_xyz, grid.origin_xyz)
        p = scan_phantom(seed, SPLIT_ID, k + 1, 0, abnormalities)
        text = scan_texts(p, rngs(seed, Stream.TEXT, SPLIT_ID, k + 1, 0), anatomies)
        scan = scan_id_of(name)
        desc_info[scan], conc_info[scan] = text.desc, text.conc
        labels.append({ID_COLUMN: vid} | {c: int(a in abnormalities) for a, c in LABEL_COLUMNS.items() if c})
        formats[vid] = fmt
    write_text(out / "labels.csv", pd.DataFrame(labels).to_csv(index=False))
    write_text(out / "desc_info.json", json.dumps(desc_info, indent=1))
    write_text(out / "conc_info.json", json.dumps(conc_info, indent=1))
    logger.info("wrote %d external volumes to %s", n, out)
    return formats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", dest="data_root", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=12, help="number of volumes (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="valid", help="split name the masks are laid out for (default valid)")
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be >= 2 (both classes of every label)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    generate_external(args.data_root, n=args.n, seed=args.seed, split=args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
