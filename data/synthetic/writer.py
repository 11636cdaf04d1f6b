"""CT-RATE layout writing: the scans of each split, raw (v1) or HU (v2) volumes, ground-truth label maps,
the metadata, reports and labels CSVs, desc/conc_info.json, and the manifest `load_truth` re-renders from."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data.common import METADATA_FILES, REPORT_FILES, SPLITS, volume_relpath
from data.io import IDENTITY_DIRECTION, atomic_output, write_text
from data.synthetic.phantom import Grid, Stream, rngs, scan_phantom, uniform
from data.synthetic.reports import LABEL_COLUMNS, REPORT_COLUMNS, SIMULATED, load_anatomies, report_row, scan_texts
from data.synthetic.scanner import Acquisition, recon_grid, truth_volume

logger = logging.getLogger(__name__)

METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation",
    "SpiralPitchFactor", "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient",
    "ExposureModulationType", "CTDIvol", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept",
    "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing", "StudyDate",
)
LABEL_FILES = {"train": "multi_abnormality_labels/train_predicted_labels.csv",
               "valid": "multi_abnormality_labels/valid_predicted_labels.csv"}
SCANNERS = (("SIEMENS", "SOMATOM Definition Edge"), ("PHILIPS", "Ingenuity CT"), ("TOSHIBA", "Aquilion ONE"))
MANIFEST = "synthetic_manifest.json"
GENERATOR_VERSION = 2


def metadata_row(name: str, grid: Grid, acq: Acquisition, rng: np.random.Generator,
                 study: dict[str, Any]) -> dict[str, Any]:
    """One CT-RATE metadata row; geometry and rescale are the truth, the rest plausible values
    (`study`: sex, age, scanner index, date, shared by the reconstructions of a scan)."""
    (sx, sy, sz), (ox, oy, oz) = grid.spacing_xyz, grid.origin_xyz
    d, h, w = grid.shape_dhw
    manu, model = SCANNERS[study["scanner"]]
    current = int(rng.integers(80, 300))
    exposure_time = int(rng.integers(400, 1000))
    center = f"[{ox + sx * (w - 1) / 2:.4f}, {oy + sy * (h - 1) / 2:.4f}, {oz + sz * (d - 1) / 2:.4f}]"
    return {
        "VolumeName": name, "Manufacturer": manu, "SeriesDescription": f"THORAX {sz:g} {acq.kernel}",
        "ManufacturerModelName": model, "PatientSex": study["sex"], "PatientAge": f"{study['age']:03d}Y",
        "ReconstructionDiameter": acq.recon_diameter, "DistanceSourceToDetector": 1085.6,
        "DistanceSourceToPatient": 595.0, "GantryDetectorTilt": 0.0,
        "TableHeight": round(uniform(rng, 120, 180), 1), "RotationDirection": "CW", "ExposureTime": exposure_time,
        "XRayTubeCurrent": current, "Exposure": int(current * exposure_time / 1000), "FilterType": "FLAT",
        "GeneratorPower": int(current * 120 / 1000), "FocalSpots": "[1.2]",
        "ConvolutionKernel": acq.kernel, "PatientPosition": "FFS", "RevolutionTime": 0.5,
        "SingleCollimationWidth": 0.6, "TotalCollimationWidth": 38.4, "TableSpeed": 46.0,
        "TableFeedPerRotation": 23.0, "SpiralPitchFactor": 0.6, "DataCollectionCenterPatient": center,
        "ReconstructionTargetCenterPatient": center, "ExposureModulationType": "XYZ_EC",
        "CTDIvol": round(uniform(rng, 4, 12), 2), "ImagePositionPatient": f"[{ox}, {oy}, {oz}]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "SliceLocation": oz, "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "Rows": h, "Columns": w, "XYSpacing": f"[{sx}, {sy}]",
        "RescaleIntercept": acq.intercept, "RescaleSlope": acq.slope, "RescaleType": "HU",
        "NumberofSlices": d, "ZSpacing": sz, "StudyDate": study["date"],
    }


def write_image(path: Path, array: np.ndarray, grid: Grid | None) -> None:
    """Atomic NIfTI write by SimpleITK; grid None = CT-RATE raw header (spacing 1, origin 0, identity).
    SimpleITK writes the .nii, gzip (level 1, mtime 0: fast and byte-reproducible) compresses it;
    SimpleITK's own gzip takes ~10 s for a 512x512x240 volume."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    if grid is not None:
        img.SetSpacing(grid.spacing_xyz)
        img.SetOrigin(grid.origin_xyz)
        img.SetDirection(IDENTITY_DIRECTION)
    with atomic_output(path) as tmp_gz:
        tmp_nii = tmp_gz.with_name(tmp_gz.name[:-len(".gz")])
        sitk.WriteImage(img, str(tmp_nii), useCompression=False)
        with open(tmp_nii, "rb") as src, open(tmp_gz, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        tmp_nii.unlink()


def volume_job(args: tuple[str, int, dict[str, Any], bool, int]) -> dict[str, Any]:
    """Render and write one reconstruction (v1 raw or v2 HU, + ground-truth labels); returns its manifest entry."""
    out_dir, seed, entry, realistic, ctrate_version = args
    truth, stored, lab, grid, acq = truth_volume(seed, entry, realistic)
    out, split, rel = Path(out_dir), entry["split"], volume_relpath(entry["name"])
    if ctrate_version == 1:
        write_image(out / split / rel, stored, None)
    else:
        write_image(out / f"{split}_fixed" / rel, truth, grid)
    write_image(out / "totalseg_gt" / split / rel, lab, grid)
    return {**entry, "shape_dhw": list(grid.shape_dhw), "spacing_xyz": list(grid.spacing_xyz),
            "origin_xyz": list(grid.origin_xyz), "direction": list(IDENTITY_DIRECTION),
            "rescale_slope": acq.slope, "rescale_intercept": acq.intercept, "kernel": acq.kernel,
            "recon_diameter": acq.recon_diameter, "hu_md5": hashlib.md5(truth.tobytes()).hexdigest(),
            "labels_present": [int(i) for i in np.flatnonzero(np.bincount(lab.ravel(), minlength=256)) if i]}


def split_layout(seed: int, split: str, split_id: int, n_scans: int) -> list[dict[str, Any]]:
    """Scans of a split with patient/scan/reconstruction names and the abnormality plan."""
    rng = rngs(seed, Stream.LAYOUT, split_id)
    scans: list[dict[str, Any]] = []
    patient_no = 0
    while len(scans) < n_scans:
        patient_no += 1
        n_for_patient = 2 if (rng.random() < 0.2 and n_scans - len(scans) >= 2) else 1
        for s in range(n_for_patient):
            scan = f"{split}_{patient_no}_{'ab'[s]}"
            scans.append({"split": split, "split_id": split_id, "patient": f"{split}_{patient_no}",
                          "patient_no": patient_no, "scan": scan, "scan_idx": s,
                          "n_recons": 2 if rng.random() < 0.35 else 1, "abnormalities": []})
    for scan, abnormalities in zip(scans, plan_abnormalities(rngs(seed, Stream.PLAN, split_id), n_scans)):
        scan["abnormalities"].extend(abnormalities)
    return scans


def plan_abnormalities(plan: np.random.Generator, n: int) -> list[list[str]]:
    """Each simulated abnormality in round(prevalence * n) of n scans (at least one scan with it and one without)."""
    out: list[list[str]] = [[] for _ in range(n)]
    for abn, (_, prevalence) in SIMULATED.items():
        k = int(np.clip(round(prevalence * n), 1, max(n - 1, 1)))
        for i in sorted(plan.choice(n, size=k, replace=False)):
            out[int(i)].append(abn)
    return out


def generate_dataset(out_dir: str | Path, *, n_train: int = 24, n_valid: int = 12, seed: int = 0,
                     realistic: bool = False, workers: int = 1, ctrate_version: int = 1) -> dict[str, Any]:
    """Write a synthetic CT-RATE (n_* = number of scans per split) under `out_dir`; returns the manifest.
    `ctrate_version` 1 writes raw volumes under `{split}/`, 2 HU volumes under `{split}_fixed/`."""
    if ctrate_version not in (1, 2):
        raise ValueError(f"ctrate_version must be 1 or 2, got {ctrate_version!r}")
    import pandas as pd
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anatomies = [a for a, _ in load_anatomies()]
    desc_info: dict[str, dict[str, str]] = {}
    conc_info: dict[str, dict[str, str]] = {}
    jobs: list[tuple[str, int, dict[str, Any], bool, int]] = []
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split_id, (split, n) in enumerate(zip(SPLITS, (n_train, n_valid), strict=True)):
        rows[split] = {"metadata": [], "reports": [], "labels": []}
        for sc in split_layout(seed, split, split_id, n):
            key = (split_id, sc["patient_no"], sc["scan_idx"])
            p = scan_phantom(seed, *key, sc["abnormalities"])
            text = scan_texts(p, rngs(seed, Stream.TEXT, *key), anatomies)
            desc_info[sc["scan"]], conc_info[sc["scan"]] = text.desc, text.conc
            rng = rngs(seed, Stream.TEXT, *key, 1)
            study = {"sex": ("M", "F")[int(rng.integers(2))], "age": int(rng.integers(25, 86)),
                     "scanner": int(rng.integers(len(SCANNERS))),
                     "date": 20200100 + int(rng.integers(0, 11)) * 100 + int(rng.integers(1, 29))}
            for recon in range(1, sc["n_recons"] + 1):
                name = f"{sc['scan']}_{recon}.nii.gz"
                entry = {k: sc[k] for k in ("split", "split_id", "patient", "patient_no", "scan", "scan_idx",
                                            "abnormalities")} | {"name": name, "recon": recon}
                jobs.append((str(out), seed, entry, realistic, ctrate_version))
                grid, acq = recon_grid(p, rngs(seed, Stream.RECON, *key, recon), recon, realistic)
                rows[split]["metadata"].append(metadata_row(name, grid, acq, rng, study))
                rows[split]["reports"].append(report_row(name, text, rng, grid, anatomies))
                rows[split]["labels"].append(
                    {"VolumeName": name} | {c: int(c in sc["abnormalities"]) for c in LABEL_COLUMNS})
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            entries = list(tqdm(pool.map(volume_job, jobs), total=len(jobs), desc="synthetic volumes"))
    else:
        entries = [volume_job(j) for j in tqdm(jobs, desc="synthetic volumes")]
    for split in SPLITS:
        tables = (("metadata", METADATA_FILES[split], METADATA_COLUMNS),
                  ("reports", REPORT_FILES[split], REPORT_COLUMNS),
                  ("labels", LABEL_FILES[split], ("VolumeName",) + LABEL_COLUMNS))
        for kind, rel, columns in tables:
            write_text(out / rel, pd.DataFrame(rows[split][kind], columns=list(columns)).to_csv(index=False))
    write_text(out / "desc_info.json", json.dumps(desc_info, indent=1))
    write_text(out / "conc_info.json", json.dumps(conc_info, indent=1))
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_valid": n_valid,
                "realistic": realistic, "ctrate_version": ctrate_version,
                "simulated": {k: v[0] for k, v in SIMULATED.items()},
                "volumes": entries}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    logger.info("wrote %d volumes to %s", len(entries), out)
    return manifest


def load_truth(out_dir: str | Path, volume_name: str) -> dict[str, Any]:
    """Re-render the truth of one volume: HU int16 (D, H, W) (= what fix_data must produce), labels,
    spacing_xyz, origin_xyz, direction (9 floats, SimpleITK order)."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    entry = next((v for v in manifest["volumes"] if v["name"] == volume_name), None)
    if entry is None:
        raise KeyError(f"{volume_name} is not in {Path(out_dir) / MANIFEST}")
    truth, _, lab, grid, _ = truth_volume(manifest["seed"], entry, manifest["realistic"])
    if hashlib.md5(truth.tobytes()).hexdigest() != entry["hu_md5"]:
        raise RuntimeError(f"re-render of {volume_name} differs from the generated volume (code changed?)")
    return {"hu": truth, "labels": lab, "spacing_xyz": grid.spacing_xyz, "origin_xyz": grid.origin_xyz,
            "direction": IDENTITY_DIRECTION}
