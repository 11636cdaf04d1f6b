"""Deterministic synthetic mini CT-RATE (spec §1 layout) for tests, benchmarks and the demo.

Every scan is a chest phantom drawn in physical (LPS) millimetres: body (fat + muscle), lungs split into
the five lobes, trachea and main bronchi, heart with left atrial appendage, aorta (ascending, arch,
descending), esophagus, vertebrae with spinal cord, ribs, sternum, liver and stomach. Abnormalities are
drawn per scan, painted into the image and written consistently into the report, the anatomy-wise
decomposition (desc_info.json / conc_info.json) and the labels CSV.

Files are stored the way CT-RATE stores them. v1 (the original upload, the default): `{split}/...` holds
the raw NIfTI written by SimpleITK from the (z, y, x) array of stored integers, so its header says spacing
(1, 1, 1), origin 0 and identity direction; the real geometry and the HU rescale live only in the metadata
CSV. v2 (`--ctrate-version 2`, today's download): `{split}_fixed/...` holds int16 HU with the true geometry
instead, and the metadata CSV is unchanged (it still lists the rescale). `totalseg_gt/` holds TotalSegmentator `total`
label maps with the true geometry, for `generate_mask --masks-from`.

Determinism: every random choice comes from a generator seeded by (seed, a stream tag, split, patient,
scan, reconstruction), so the bytes written do not depend on `workers`. `synthetic_manifest.json` records
what `load_truth` needs to re-render a volume (and an md5 of the truth HU to check the re-render).

Axes: arrays are (D, H, W) = (z, y, x); voxel (k, j, i) sits at origin + (i*sx, j*sy, k*sz) mm, +x = patient
left, +y = posterior, +z = superior (identity direction, as CT-RATE's ImageOrientationPatient).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

if __package__ in (None, ""):  # run as `python synthetic.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ANATOMY_MAP = REPO_ROOT / "configs" / "anatomy" / "ctrate.yaml"
ZEROSHOT_ITEMS = REPO_ROOT / "configs" / "zeroshot_items.yaml"
DEMO_BERT_DIR = REPO_ROOT / "configs" / "demo_bert"

# The 18 CT-RATE label columns, in the order of the released labels CSV (spec §1).
LABEL_COLUMNS: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
# Abnormalities the phantom simulates -> the anatomy whose text names them, and their prevalence
# (drawn as exactly round(p * n) scans per split, so that both classes occur and AUC is defined).
SIMULATED: dict[str, tuple[str, float]] = {
    "Emphysema": ("lung", 1 / 3),
    "Atelectasis": ("lung", 1 / 3),
    "Lung nodule": ("lung", 1 / 3),
    "Lung opacity": ("lung", 1 / 3),
    "Pleural effusion": ("lung", 1 / 3),
    "Consolidation": ("lung", 1 / 3),
    "Cardiomegaly": ("heart", 1 / 3),
    "Pericardial effusion": ("heart", 1 / 3),
    "Coronary artery wall calcification": ("heart", 1 / 3),
    "Hiatal hernia": ("esophagus", 1 / 3),
    "Arterial wall calcification": ("aorta", 1 / 3),
}

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
REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN",
)
SPLITS: dict[str, dict[str, str]] = {  # split folder -> names used by the CSV files
    "train": {"metadata": "train", "reports": "train", "labels": "train"},
    "valid": {"metadata": "validation", "reports": "validation", "labels": "valid"},
}
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
HU_MIN, HU_MAX = -1024, 3071
# (RescaleSlope, RescaleIntercept) choices and weights: mostly CT-RATE's usual (1, -1024).
RESCALES: tuple[tuple[int, int], ...] = ((1, -1024), (1, -8192), (1, 0), (2, -1024))
RESCALE_WEIGHTS = (0.7, 0.1, 0.1, 0.1)
MANIFEST = "synthetic_manifest.json"
GENERATOR_VERSION = 2

# Stream tags keep the random streams of different purposes independent.
_PLAN, _PATIENT, _SCAN, _TEXT, _RECON, _NOISE, _LAYOUT = range(7)

# --------------------------------------------------------------------------------------------- texts
LOBES: dict[str, tuple[str, str]] = {  # TotalSegmentator class -> (impression phrase, findings phrase)
    "lung_upper_lobe_left": ("left upper lobe", "upper lobe of the left lung"),
    "lung_lower_lobe_left": ("left lower lobe", "lower lobe of the left lung"),
    "lung_upper_lobe_right": ("right upper lobe", "upper lobe of the right lung"),
    "lung_middle_lobe_right": ("right middle lobe", "middle lobe of the right lung"),
    "lung_lower_lobe_right": ("right lower lobe", "lower lobe of the right lung"),
}
EFFUSION_SIDES: dict[str, tuple[str, str]] = {  # side -> (impression, findings location)
    "right": ("Pleural effusion on the right.", "on the right"),
    "left": ("Pleural effusion on the left.", "on the left"),
    "both": ("Bilateral pleural effusion.", "in both hemithoraces"),
}
AORTA_LOCATIONS = ("aortic arch", "descending aorta", "aortic arch and descending aorta", "thoracic aorta")

# Impression (conc) variants: each names the abnormality with its zero-shot prompt word.
CONC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("Emphysema in both lungs.", "Centrilobular emphysema in both lungs.",
                  "Emphysema in both lungs, more prominent in the upper lobes."),
    "Lung nodule": ("Nodule in the {lobes}.", "Solid nodule in the {lobes}."),
    "Lung opacity": ("Ground glass opacity in the {lobes}.", "Opacity areas in the {lobes}."),
    "Consolidation": ("Consolidation in the {lobes}.", "Consolidation area in the {lobes}."),
    "Pleural effusion": ("{effusion}",),
    "Atelectasis": ("Atelectatic changes in the {lobes}.", "Subsegmental atelectatic changes in the {lobes}."),
    "Cardiomegaly": ("Cardiomegaly.",),
    "Pericardial effusion": ("Pericardial effusion.", "Minimal pericardial effusion."),
    "Coronary artery wall calcification": ("Coronary artery wall calcification.",
                                           "Coronary artery wall calcification, coronary atherosclerosis."),
    "Hiatal hernia": ("Hiatal hernia.", "Sliding type hiatal hernia."),
    "Arterial wall calcification": ("Arterial wall calcification in the aorta.",
                                    "Arterial wall calcification, calcific atheroma plaques in the aorta."),
}
# Findings (desc) variants for a present abnormality.
DESC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("Emphysema areas are observed in both lungs, more prominent in the upper lobes.",
                  "Centrilobular and paraseptal emphysema is observed in both lung parenchyma."),
    "Lung nodule": ("A {size} mm nodule is observed in the {lobe_long}.",
                    "A solid nodule measuring {size} mm was detected in the {lobe_long}."),
    "Lung opacity": ("Ground glass opacity areas are observed in the {lobes_long}.",
                     "There are ground glass density increases in the {lobes_long}."),
    "Consolidation": ("An area of consolidation with air bronchograms is observed in the {lobe_long}.",
                      "Consolidation is observed in the {lobe_long}, evaluated in favor of pneumonia."),
    "Pleural effusion": ("Pleural effusion reaching a thickness of {size} mm is observed {where}.",
                         "Pleural effusion with a thickness of {size} mm was detected {where}."),
    "Atelectasis": ("Linear atelectasis is observed in the {lobes_long}.",
                    "Subsegmental atelectasis is present in the {lobes_long}."),
    "Cardiomegaly": ("Heart size increased. Cardiothoracic ratio increased in favor of the heart.",
                     "Heart sizes have increased."),
    "Pericardial effusion": ("Pericardial effusion reaching {size} mm in thickness is observed.",
                             "Pericardial effusion with a thickness of {size} mm is present."),
    "Coronary artery wall calcification": ("Calcific atheroma plaques are observed in the coronary arteries.",
                                           "Calcified plaques are present in the coronary artery walls."),
    "Hiatal hernia": ("Sliding type hiatal hernia is observed at the lower end of the esophagus.",
                      "A hiatal hernia measuring {size} mm is observed at the esophagogastric junction."),
    "Arterial wall calcification": ("Calcific atheroma plaques are observed in the {aorta_loc}.",
                                    "Calcified atherosclerotic changes were observed in the wall of the "
                                    "{aorta_loc}."),
}
# Findings that rule out an absent abnormality. CT-RATE findings are full of such negatives
# ("No pleural effusion was detected."); without them the reports never say what "not X"
# means, and the zero-shot negative prompts ("Not X.") have nothing to match.
ABSENT_DESC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("No emphysema was observed in both lungs.", "Emphysema was not detected."),
    "Lung nodule": ("No nodule was detected in both lungs.", "Nodule was not observed in the lung parenchyma."),
    "Lung opacity": ("No opacity was observed in the lung parenchyma.", "Opacity was not detected."),
    "Consolidation": ("No consolidation was detected.", "Consolidation was not observed in the lungs."),
    "Pleural effusion": ("No pleural effusion was detected.", "Pleural effusion was not observed."),
    "Atelectasis": ("No atelectasis was observed.", "Atelectatic changes were not detected."),
    "Cardiomegaly": ("No cardiomegaly was observed.", "Cardiomegaly was not detected."),
    "Pericardial effusion": ("No pericardial effusion was detected.", "Pericardial effusion was not observed."),
    "Coronary artery wall calcification": ("No coronary artery wall calcification was observed.",
                                           "Coronary artery wall calcification was not detected."),
    "Hiatal hernia": ("No hiatal hernia was detected.", "Hiatal hernia was not observed."),
    "Arterial wall calcification": ("No arterial wall calcification was observed in the aorta.",
                                    "Arterial wall calcification was not detected."),
}
ABSENT_DESC_PROB = 0.6  # chance that the findings rule out a given absent abnormality
# Findings of a normal anatomy (style of the CT-RATE reference texts); "" = no findings text.
NORMAL_DESC: dict[str, tuple[str, ...]] = {
    "lung": ("No mass lesion was detected in both lungs.",
             "No pneumonic infiltration or consolidation area was detected in the lung parenchyma.",
             "No suspicious mass or nodular space-occupying lesion was observed in the lung parenchyma.",
             "Aeration of both lung parenchyma is normal. No pleural effusion was detected.", ""),
    "heart": ("Heart contour, size are normal. Pericardial effusion-thickening was not observed.",
              "Heart contour and size are normal.",
              "Heart dimensions and compartments appear natural. Pericardial effusion was not detected.",
              "Heart contour size is natural.", ""),
    "esophagus": ("Thoracic esophagus calibration was normal and no significant tumoral wall thickening "
                  "was detected.",
                  "No pathological increase in wall thickness was observed in the thoracic esophagus.",
                  "No pathological wall thickness increase was observed in the esophagus within the sections.",
                  ""),
    "aorta": ("Thoracic aorta diameter is normal.", "No dilatation was detected in the thoracic aorta.", ""),
}
CLINICAL = ("Not given.", "Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.",
            "Follow-up of lung nodule.")
TECHNIQUE = "Non-contrast images were obtained in the axial plane with {thick} mm slice thickness."
FINDINGS_EXTRA = "Trachea and both main bronchi are open."
NORMAL_IMPRESSION = "No significant abnormality was detected."


def normal_template(anatomy: str) -> str:
    """The spec §3 text of a normal anatomy."""
    return f"{anatomy} shows no significant abnormalities."


# --------------------------------------------------------------------------------------------- config
def load_anatomies(path: Path = ANATOMY_MAP) -> list[tuple[str, list[str]]]:
    """(anatomy name, TotalSegmentator classes) in id order, from the anatomy merge map YAML."""
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [(a["name"], list(a["classes"])) for a in doc["anatomies"]]


def total_class_ids() -> dict[str, int]:
    """TotalSegmentator `total` class name -> id, from the installed package (never retyped)."""
    from totalsegmentator.map_to_binary import class_map

    return {name: int(i) for i, name in class_map["total"].items()}


# ------------------------------------------------------------------------------------------ rasteriser
@dataclass(frozen=True)
class Grid:
    """Voxel grid of one reconstruction: (D, H, W) shape, spacing/origin in (x, y, z) mm."""

    shape_dhw: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]


class Canvas:
    """HU (float32) and label (uint8) arrays with painters restricted to bounding boxes (for speed)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        d, h, w = grid.shape_dhw
        (sx, sy, sz), (ox, oy, oz) = grid.spacing_xyz, grid.origin_xyz
        self.x = (ox + sx * np.arange(w)).astype(np.float32)
        self.y = (oy + sy * np.arange(h)).astype(np.float32)
        self.z = (oz + sz * np.arange(d)).astype(np.float32)
        self.hu = np.full((d, h, w), -1000.0, np.float32)
        self.lab = np.zeros((d, h, w), np.uint8)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Index slices and broadcastable (Z, Y, X) mm coordinates of the voxels inside [lo, hi] (x, y, z)."""
        sl = []
        for axis, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0, i1 = np.searchsorted(axis, a), np.searchsorted(axis, b, side="right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        z, y, x = self.z[sl[0]], self.y[sl[1]], self.x[sl[2]]
        return tuple(sl), (z[:, None, None], y[None, :, None], x[None, None, :])

    def paint(self, sl: tuple[slice, ...], mask: np.ndarray, *, hu: float | np.ndarray | None = None,
              label: int | None = None, only: tuple[int, ...] | None = None) -> None:
        """Set HU and/or label where `mask` (optionally only over voxels whose label is in `only`)."""
        if only is not None:
            mask = mask & np.isin(self.lab[sl], only)
        if hu is not None:
            view = self.hu[sl]
            view[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        if label is not None:
            self.lab[sl][mask] = label

    def ellipsoid(self, center: np.ndarray, radii: np.ndarray, angle: float = 0.0
                  ) -> tuple[tuple[slice, ...], np.ndarray, tuple[np.ndarray, ...]] | None:
        """Mask of an ellipsoid rotated by `angle` (rad) about z; also returns the normalised coordinates."""
        c, r = np.asarray(center, np.float32), np.asarray(radii, np.float32)
        ext = np.array([max(r[0], r[1]), max(r[0], r[1]), r[2]], np.float32) if angle else r
        hit = self.box(c - ext, c + ext)
        if hit is None:
            return None
        sl, (z, y, x) = hit
        dx, dy = x - c[0], y - c[1]
        ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u, v, w = (ca * dx + sa * dy) / r[0], (-sa * dx + ca * dy) / r[1], (z - c[2]) / r[2]
        return sl, u * u + v * v + w * w <= 1.0, (u, v, w)

    def tube(self, points: np.ndarray, radii: np.ndarray
             ) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Masks of a tube along a polyline (radius linear along each segment), one per segment."""
        pts, rad = np.asarray(points, np.float32), np.asarray(radii, np.float32)
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            r = max(ra, rb)
            hit = self.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if hit is None:
                continue
            sl, (z, y, x) = hit
            ab = b - a
            t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6)
            t = np.clip(t, 0.0, 1.0)
            d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
            yield sl, d2 <= (ra + t * (rb - ra)) ** 2

    def sphere(self, center: np.ndarray, radius: float
               ) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Mask of a ball."""
        hit = self.ellipsoid(center, np.full(3, radius))
        return None if hit is None else hit[:2]


# ---------------------------------------------------------------------------------------- the phantom
def _u(rng: np.random.Generator, a: float, b: float) -> float:
    """Uniform draw as a plain float (keeps parameters JSON-friendly)."""
    return float(rng.uniform(a, b))


def patient_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Body habitus of one patient (mm), shared by all its scans."""
    p: dict[str, float] = {}
    p["body_a"], p["body_b"] = _u(rng, 138, 160), _u(rng, 98, 115)  # LR / AP half axes
    p["fat"] = _u(rng, 8, 20)
    p["lung_off"] = _u(rng, 66, 76)   # lung centres at x = +-lung_off
    p["lung_rx"] = _u(rng, 52, 62)
    p["lung_ry"] = _u(rng, 76, 90)
    p["lung_rz"] = _u(rng, 102, 120)  # lungs span ~1.85 * rz in z (<= 225 mm)
    p["lung_v"] = _u(rng, 0, 8)
    p["lung_hu"] = _u(rng, -875, -845)
    p["fissure"] = _u(rng, -0.25, -0.15)
    p["horizontal"] = _u(rng, -0.1, 0.05)
    p["heart_u"], p["heart_v"] = _u(rng, 12, 24), -_u(rng, 16, 26)
    p["heart_a"], p["heart_b"], p["heart_c"] = _u(rng, 48, 56), _u(rng, 38, 44), _u(rng, 42, 50)
    p["heart_angle"] = _u(rng, 0.35, 0.6)
    p["heart_hu"] = _u(rng, 38, 50)
    p["aorta_r"] = _u(rng, 13, 16)
    p["arch_h"] = _u(rng, 18, 28)
    p["spine_back"] = _u(rng, 62, 72)  # vertebral body centre, mm in front of the posterior skin
    p["vert_r"] = _u(rng, 15, 19)
    p["vert_pitch"] = _u(rng, 22, 26)
    p["eso_r"] = _u(rng, 7, 9)
    p["trachea_r"] = _u(rng, 8, 10)
    return p


def _lung_frame(p: dict[str, Any], side: int) -> tuple[float, float, float]:
    """Centre (x, y, z) of the right (side=-1) or left (side=+1) lung."""
    return p["cx"] + side * p["lung_off"], p["cy"] + p["lung_v"], p["cz"]


def lung_lobe(p: dict[str, Any], ids: dict[str, int], x: np.ndarray, y: np.ndarray, z: np.ndarray
              ) -> np.ndarray:
    """Lobe label (TotalSegmentator id, 0 outside) of points: the analytic lung shape before the
    mediastinum is painted over it. Broadcasts over x, y, z (mm)."""
    out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.uint8)
    inner_a, inner_b = p["body_a"] - p["fat"] - 14, p["body_b"] - p["fat"] - 14
    in_chest = ((x - p["cx"]) / inner_a) ** 2 + ((y - p["cy"]) / inner_b) ** 2 <= 1.0
    for side, name in ((-1, "right"), (1, "left")):
        lx, ly, lz = _lung_frame(p, side)
        un, vn, wn = (x - lx) / p["lung_rx"], (y - ly) / p["lung_ry"], (z - lz) / p["lung_rz"]
        # Rounded apex, broad base: an ellipsoid above the centre, a super-ellipsoid (power 4) below.
        u2, v2, w2 = un * un, vn * vn, wn * wn
        inside = np.where(wn < 0, u2 * u2 + v2 * v2 + w2 * w2, u2 + v2 + w2) <= 1.0
        dome = (0.28 if side < 0 else 0.2) * np.clip(1.0 - un * un - vn * vn, 0.0, None)
        inside &= (wn >= -0.85 + dome) & in_chest
        lower = wn < p["fissure"] + 0.55 * vn  # oblique fissure: lower lobe reaches higher posteriorly
        if name == "right":
            middle = ~lower & (wn < p["horizontal"])
            lobe = np.where(lower, ids["lung_lower_lobe_right"],
                            np.where(middle, ids["lung_middle_lobe_right"], ids["lung_upper_lobe_right"]))
        else:
            lobe = np.where(lower, ids["lung_lower_lobe_left"], ids["lung_upper_lobe_left"])
        out = np.where(inside, lobe.astype(np.uint8), out)
    return out


def heart_radii(p: dict[str, Any]) -> np.ndarray:
    """Heart half axes (mm), enlarged for cardiomegaly."""
    r = np.array([p["heart_a"], p["heart_b"], p["heart_c"]])
    return r * (np.array([1.38, 1.22, 1.28]) if "Cardiomegaly" in p["abn"] else 1.0)


def heart_center(p: dict[str, Any]) -> np.ndarray:
    """Heart centre (mm): it rests on the left hemidiaphragm, so an enlarged heart grows up and left."""
    r = heart_radii(p)
    base = p["cz"] - 0.8 * p["lung_rz"]
    return np.array([p["cx"] + p["heart_u"] + 0.25 * (r[0] - p["heart_a"]), p["cy"] + p["heart_v"],
                     base + 0.75 * r[2]])


def _sample_in_lung(p: dict[str, Any], ids: dict[str, int], rng: np.random.Generator, radius: float,
                    lobes: tuple[str, ...], wn_range: tuple[float, float] = (-1, 1),
                    posterior: bool = False) -> tuple[np.ndarray, str]:
    """A point whose ball of `radius` lies in one of `lobes`, clear of the mediastinum."""
    hc, hr = heart_center(p), heart_radii(p) + 25
    offs = radius * np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    best = None
    for _ in range(400):
        lobe = lobes[int(rng.integers(len(lobes)))]
        side = 1 if lobe.endswith("left") else -1
        lx, ly, lz = _lung_frame(p, side)
        c = np.array([lx + side * _u(rng, -0.3, 0.75) * p["lung_rx"],
                      ly + _u(rng, 0.2 if posterior else -0.8, 0.8) * p["lung_ry"],
                      lz + _u(rng, *wn_range) * p["lung_rz"]])
        pts = c + offs
        labels = lung_lobe(p, ids, pts[:, 0], pts[:, 1], pts[:, 2])
        clear = (((pts - hc) / hr) ** 2).sum(1).min() > 1.0 and abs(c[0] - p["cx"]) > 35 + radius
        if clear and np.all(labels == ids[lobe]):
            return c, lobe
        if best is None and labels[0] == ids[lobe]:
            best = (c, lobe)
    if best is None:  # else: accept a centre in the lobe whose ball crosses its border (rare)
        raise RuntimeError("could not place a lung lesion; phantom parameters are inconsistent")
    return best


def scan_phantom(seed: int, split_id: int, patient_no: int, scan_idx: int, abnormalities: list[str]
                 ) -> dict[str, Any]:
    """All physical parameters of one scan (shared by its reconstructions)."""
    ids = total_class_ids()
    p: dict[str, Any] = patient_anatomy(np.random.default_rng([seed, _PATIENT, split_id, patient_no]))
    rng = np.random.default_rng([seed, _SCAN, split_id, patient_no, scan_idx])
    p["abn"] = sorted(abnormalities)
    p["cx"], p["cy"] = _u(rng, -12, 12), _u(rng, -20, 5)
    p["cz"] = _u(rng, -250, -150)
    p["fov"] = _u(rng, 345, 385)
    # Scan range <= ~290 mm: anatomies leaving the scan (aorta, esophagus) must fit the demo crop.
    p["z_top"] = p["cz"] + p["lung_rz"] + _u(rng, 10, 25)
    p["z_bottom"] = p["cz"] - 0.85 * p["lung_rz"] - _u(rng, 20, 35)
    if "Emphysema" in p["abn"]:  # hyperinflated, hyperlucent lungs
        p["lung_rz"] *= 1.04
        p["lung_hu"] -= 30
    lesions: dict[str, Any] = {}
    upper = ("lung_upper_lobe_left", "lung_upper_lobe_right")
    lower = ("lung_lower_lobe_left", "lung_lower_lobe_right")
    if "Emphysema" in p["abn"]:
        lesions["Emphysema"] = [
            (*_sample_in_lung(p, ids, rng, 10, upper, (0.0, 0.8)), _u(rng, 16, 28))
            for _ in range(int(rng.integers(5, 9)))]
    if "Lung nodule" in p["abn"]:
        lesions["Lung nodule"] = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            r = _u(rng, 6, 12.5)
            lesions["Lung nodule"].append((*_sample_in_lung(p, ids, rng, r, tuple(LOBES)), r))
    if "Lung opacity" in p["abn"]:
        lesions["Lung opacity"] = [
            (*_sample_in_lung(p, ids, rng, 15, tuple(LOBES)), np.array([_u(rng, 20, 32) for _ in range(3)]))
            for _ in range(int(rng.integers(2, 4)))]
    if "Consolidation" in p["abn"]:
        c, lobe = _sample_in_lung(p, ids, rng, 18, lower + ("lung_middle_lobe_right",), (-0.6, 0.3))
        lesions["Consolidation"] = [(c, lobe, np.array([_u(rng, 20, 28) for _ in range(3)]))]
    if "Atelectasis" in p["abn"]:
        lesions["Atelectasis"] = [
            (*_sample_in_lung(p, ids, rng, 12, lower, (-0.6, -0.1), posterior=True),
             np.array([_u(rng, 28, 40), _u(rng, 8, 11), _u(rng, 18, 26)]))
            for _ in range(1 if rng.random() < 0.6 else 2)]
    if "Pleural effusion" in p["abn"]:
        side = ("right", "left", "both")[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
        lesions["Pleural effusion"] = {"side": side, "depth": _u(rng, 22, 38), "hu": _u(rng, 5, 15)}
    if "Pericardial effusion" in p["abn"]:
        lesions["Pericardial effusion"] = {"thick": _u(rng, 10, 15), "hu": _u(rng, 0, 12)}
    if "Coronary artery wall calcification" in p["abn"]:
        lesions["Coronary artery wall calcification"] = [
            (rng.normal(size=3), _u(rng, 12, 22), _u(rng, 4.0, 5.0), _u(rng, 600, 1000))
            for _ in range(int(rng.integers(2, 5)))]
    if "Arterial wall calcification" in p["abn"]:
        lesions["Arterial wall calcification"] = [
            (_u(rng, 0.15, 1.0), rng.normal(size=3), _u(rng, 4.0, 5.5), _u(rng, 600, 1000))
            for _ in range(int(rng.integers(3, 7)))]
    if "Hiatal hernia" in p["abn"]:
        lesions["Hiatal hernia"] = {"radii": np.array([_u(rng, 22, 30), _u(rng, 20, 26), _u(rng, 22, 30)])}
    p["lesions"] = lesions
    return p


_ARCH_ABOVE_HEART = 40.0  # mm between the heart's top and the aortic arch


def _aorta_centerline(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Aorta centreline points (x, y, z) and radii: ascending, arch, descending."""
    hc, hr = heart_center(p), heart_radii(p)
    spine_y = p["cy"] + p["body_b"] - p["spine_back"]
    w_arch = hc[2] + hr[2] + _ARCH_ABOVE_HEART
    asc = np.array([hc[0] - 0.3 * hr[0], hc[1] + 0.2 * hr[1], hc[2] + 0.2 * hr[2]])
    asc_top = np.array([p["cx"] - 2.0, hc[1] + 8.0, w_arch])
    desc_top = np.array([p["cx"] + 24.0, spine_y - p["vert_r"] - 10.0, w_arch])
    t = np.linspace(0, np.pi, 9)
    arch = asc_top + np.outer((1 - np.cos(t)) / 2, desc_top - asc_top)
    arch[:, 2] += p["arch_h"] * np.sin(t)
    bottom = desc_top.copy()
    bottom[2] = p["z_bottom"] - 20
    pts = np.vstack([asc, arch, bottom])
    r = p["aorta_r"]
    radii = np.concatenate([[r + 1.5], np.linspace(r + 1.5, r - 1.5, len(arch)), [r - 2.5]])
    return pts, radii


def _vertebra_names() -> list[str]:
    """TotalSegmentator vertebra classes from top (C1) to bottom (S1)."""
    return ([f"vertebrae_C{i}" for i in range(1, 8)] + [f"vertebrae_T{i}" for i in range(1, 13)]
            + [f"vertebrae_L{i}" for i in range(1, 6)] + ["vertebrae_S1"])


def render(p: dict[str, Any], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU (float32) and TotalSegmentator labels (uint8) of phantom `p` on `grid`."""
    ids = total_class_ids()
    cv = Canvas(grid)
    cx, cy = p["cx"], p["cy"]
    lobe_ids = tuple(ids[n] for n in LOBES)
    # Body: subcutaneous fat ring around muscle/soft tissue (2D, same on every slice).
    ex = ((cv.x[None, :] - cx) / p["body_a"]) ** 2 + ((cv.y[:, None] - cy) / p["body_b"]) ** 2
    a_in, b_in = p["body_a"] - p["fat"], p["body_b"] - p["fat"]
    inner = ((cv.x[None, :] - cx) / a_in) ** 2 + ((cv.y[:, None] - cy) / b_in) ** 2 <= 1.0
    cv.hu[:, ex <= 1.0] = -100.0
    cv.hu[:, inner] = 40.0
    base_z = p["cz"] - 0.85 * p["lung_rz"]
    # Upper abdomen under the diaphragm (lungs are painted over their tops).
    for name, c, r, hu in (
            ("liver", (cx - 0.75 * p["lung_off"], cy + 5, base_z - 25), (a_in * 0.62, b_in * 0.8, 70), 58.0),
            ("stomach", (cx + 0.85 * p["lung_off"], cy - 15, base_z - 5), (42, 40, 32), 30.0)):
        hit = cv.ellipsoid(np.array(c), np.array(r))
        if hit:
            sl, m, (_, vn, _) = hit
            m = m & inner[None, sl[1], sl[2]]
            cv.paint(sl, m, hu=hu, label=ids[name])
            if name == "stomach":  # gas cap rises anteriorly in a supine patient
                cv.paint(sl, m & (vn < -0.45), hu=-1000.0)
    # Lungs with lobes; parenchyma denser posteriorly (dependent lung).
    lr = np.array([p["lung_off"] + p["lung_rx"] + 2, p["lung_ry"] + p["lung_v"] + 2, 0])
    hit = cv.box(np.array([cx, cy, base_z - 2]) - lr, np.array([cx, cy, p["cz"] + p["lung_rz"] + 2]) + lr)
    if hit:
        sl, (z, y, x) = hit
        lobes = lung_lobe(p, ids, x, y, z)
        grad = p["lung_hu"] + 35.0 * (y - cy - p["lung_v"]) / p["lung_ry"]
        cv.paint(sl, lobes > 0, hu=np.broadcast_to(grad, lobes.shape).astype(np.float32))
        cv.lab[sl][lobes > 0] = lobes[lobes > 0]
    les = p["lesions"]
    _paint_lung_lesions(cv, p, les, lobe_ids)
    # Mediastinum and chest wall, painted over the lungs.
    spine_y = cy + p["body_b"] - p["spine_back"]
    eso_x, eso_y = cx + 2.0, spine_y - p["vert_r"] - 11.0
    hc, hr = heart_center(p), heart_radii(p)
    apts, arad = _aorta_centerline(p)
    for sl, m in cv.tube(apts, arad):
        cv.paint(sl, m, hu=p["heart_hu"], label=ids["aorta"])
    if "Pericardial effusion" in les:
        e = les["Pericardial effusion"]
        hit = cv.ellipsoid(hc, hr + e["thick"], p["heart_angle"])
        if hit:
            cv.paint(hit[0], hit[1], hu=e["hu"], label=0)
    hit = cv.ellipsoid(hc, hr, p["heart_angle"])
    if hit:
        cv.paint(hit[0], hit[1], hu=p["heart_hu"], label=ids["heart"])
    laa = hc + np.array([0.55 * hr[0], -0.35 * hr[1], 0.55 * hr[2]])
    hit = cv.ellipsoid(laa, np.array([14.0, 9.0, 10.0]))
    if hit:
        cv.paint(hit[0], hit[1], hu=p["heart_hu"], label=ids["atrial_appendage_left"])
    if "Hiatal hernia" in les:  # stomach herniated above the diaphragm behind the heart, air-fluid level
        r = les["Hiatal hernia"]["radii"]
        hit = cv.ellipsoid(np.array([eso_x + 10, eso_y - 6, base_z + 0.6 * r[2]]), r)
        if hit:
            sl, m, (_, vn, _) = hit
            allowed = (0, ids["heart"], ids["atrial_appendage_left"], ids["liver"], ids["stomach"]) + lobe_ids
            contents = np.broadcast_to(np.where(vn < -0.1, -1000.0, 15.0), m.shape).astype(np.float32)
            cv.paint(sl, m, hu=np.where(vn ** 2 < 0.8, contents, 40.0).astype(np.float32),
                     label=ids["esophagus"], only=allowed)
    for direction, length, radius, hu in les.get("Coronary artery wall calcification", []):
        # Plaque segments on the anterior/left heart surface, where the coronary arteries run.
        d = np.abs(direction) * np.array([1.0, -1.0, 1.0]) + np.array([0.3, -0.6, 0.0])
        a = _on_ellipsoid(hc, hr * 0.97, d, p["heart_angle"])
        tangent = np.cross(d / np.linalg.norm(d), [0.0, 0.0, 1.0])
        b = _on_ellipsoid(hc, hr * 0.97, a - hc + length * tangent, p["heart_angle"])
        for sl, m in cv.tube(np.array([a, b]), np.array([radius, radius])):
            cv.paint(sl, m, hu=hu, label=ids["heart"])
    for frac, direction, radius, hu in les.get("Arterial wall calcification", []):
        # Plaque segments (~12 mm long) along the wall of the arch or the descending aorta.
        a, b = _along(apts[1:], frac - 0.04), _along(apts[1:], frac)
        t = (b - a) / np.linalg.norm(b - a)
        d = direction - (direction @ t) * t
        d = 0.85 * p["aorta_r"] * d / np.linalg.norm(d)
        for sl, m in cv.tube(np.array([a + d, b + d]), np.array([radius, radius])):
            cv.paint(sl, m, hu=hu, label=ids["aorta"], only=(0, ids["aorta"]) + lobe_ids)
    eso = np.array([[eso_x, eso_y, p["z_top"] + 20], [eso_x, eso_y, base_z + 10],
                    [eso_x + 25, eso_y - 25, base_z - 15]])
    for sl, m in cv.tube(eso, np.full(3, p["eso_r"])):
        cv.paint(sl, m, hu=35.0, label=ids["esophagus"])
    tr_y = eso_y - p["eso_r"] - p["trachea_r"] - 3
    carina = np.array([cx, tr_y, hc[2] + hr[2] + _ARCH_ABOVE_HEART - 15])
    for sl, m in cv.tube(np.array([[cx, tr_y, p["z_top"] + 20], carina]), np.full(2, p["trachea_r"])):
        cv.paint(sl, m, hu=-1000.0, label=ids["trachea"])
    for side in (-1, 1):  # main bronchi, labelled with the trachea (no bronchus class in `total`)
        end = carina + np.array([side * 38.0, 12.0, -32.0])
        for sl, m in cv.tube(np.array([carina, end]), np.array([p["trachea_r"] - 2, 5.0])):
            cv.paint(sl, m, hu=-1000.0, label=ids["trachea"])
    _paint_skeleton(cv, p, ids, spine_y, a_in, b_in, hc, hr)
    return cv.hu, cv.lab


def _on_ellipsoid(c: np.ndarray, r: np.ndarray, d: np.ndarray, angle: float) -> np.ndarray:
    """Point where the ray from `c` along `d` meets the ellipsoid (c, r, rotated by angle about z)."""
    ca, sa = np.cos(angle), np.sin(angle)
    loc = np.array([ca * d[0] + sa * d[1], -sa * d[0] + ca * d[1], d[2]])
    return c + d / np.sqrt(((loc / r) ** 2).sum())


def _along(pts: np.ndarray, frac: float) -> np.ndarray:
    """Point at fraction `frac` of the arc length of a polyline."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = frac * seg.sum()
    i = min(int(np.searchsorted(np.cumsum(seg), s)), len(seg) - 1)
    t = (s - seg[:i].sum()) / seg[i]
    return pts[i] + t * (pts[i + 1] - pts[i])


def _paint_lung_lesions(cv: Canvas, p: dict[str, Any], les: dict[str, Any], lobe_ids: tuple[int, ...]) -> None:
    """Lung abnormalities, painted over lung voxels only (the label stays the lobe, as TotalSegmentator
    would segment it), except pleural fluid, which lies outside the lung."""
    for c, _, r in les.get("Emphysema", []):
        hit = cv.sphere(c, r)
        if hit:
            cv.paint(*hit, hu=-975.0, only=lobe_ids)
    for c, _, radii in les.get("Lung opacity", []):
        hit = cv.ellipsoid(c, radii)
        if hit:
            cv.paint(hit[0], hit[1], hu=-600.0, only=lobe_ids)
    for c, _, radii in les.get("Atelectasis", []):
        hit = cv.ellipsoid(c, radii)
        if hit:
            cv.paint(hit[0], hit[1], hu=-60.0, only=lobe_ids)
    for c, _, radii in les.get("Consolidation", []):
        hit = cv.ellipsoid(c, radii)
        if hit:
            cv.paint(hit[0], hit[1], hu=30.0, only=lobe_ids)
    for c, _, r in les.get("Lung nodule", []):
        hit = cv.sphere(c, r)
        if hit:
            cv.paint(*hit, hu=45.0, only=lobe_ids)
    eff = les.get("Pleural effusion")
    if eff:
        sides = {"right": (-1,), "left": (1,), "both": (-1, 1)}[eff["side"]]
        base_z = p["cz"] - 0.85 * p["lung_rz"]
        for side in sides:
            lx, ly, _ = _lung_frame(p, side)
            lo = np.array([lx - p["lung_rx"], ly + p["lung_ry"] - 1.4 * eff["depth"], base_z - 5])
            hi = np.array([lx + p["lung_rx"], ly + p["lung_ry"], base_z + 1.2 * p["lung_rz"]])
            hit = cv.box(lo, hi)
            if hit:
                sl, (z, y, x) = hit
                # Layering fluid: deepest at the posterior base, thinning upwards.
                depth = eff["depth"] * np.clip(1.4 - (z - base_z) / p["lung_rz"], 0.0, 1.4)
                m = np.broadcast_to((y - ly) > p["lung_ry"] - depth, cv.lab[sl].shape)
                cv.paint(sl, m, hu=eff["hu"], label=0, only=lobe_ids)


def _paint_skeleton(cv: Canvas, p: dict[str, Any], ids: dict[str, int], spine_y: float, a_in: float,
                    b_in: float, hc: np.ndarray, hr: np.ndarray) -> None:
    """Vertebrae (bodies, spinous and transverse processes), spinal cord, ribs and sternum."""
    cx, pitch, rv = p["cx"], p["vert_pitch"], p["vert_r"]
    names = _vertebra_names()
    t1 = names.index("vertebrae_T1")
    z_t1 = p["cz"] + p["lung_rz"] + 12  # T1 sits at the lung apices
    for k, name in enumerate(names):
        zk = z_t1 - (k - t1) * pitch
        if zk < cv.z[0] - pitch or zk > cv.z[-1] + pitch:
            continue
        hit = cv.ellipsoid(np.array([cx, spine_y, zk]), np.array([rv, 0.85 * rv, (pitch - 5) / 2]))
        if hit:
            sl, m, (u, v, w) = hit
            cv.paint(sl, m & (np.abs(w) <= 1.0) & (u * u + v * v <= 1.0), hu=420.0, label=ids[name])
        back = spine_y + 0.85 * rv
        arms = [np.array([[cx, back, zk], [cx, back + 38, zk - 10]])]
        arms += [np.array([[cx, back, zk], [cx + s * 32, back + 4, zk]]) for s in (-1, 1)]
        for arm in arms:
            for sl, m in cv.tube(arm, np.array([5.0, 4.5])):
                cv.paint(sl, m, hu=450.0, label=ids[name])
        if name.startswith("vertebrae_T"):
            _paint_rib(cv, p, ids, int(name[len("vertebrae_T"):]), zk, spine_y, a_in, b_in)
    cord_y = spine_y + 0.85 * rv + 9
    for sl, m in cv.tube(np.array([[cx, cord_y, cv.z[-1] + 10], [cx, cord_y, cv.z[0] - 10]]), np.full(2, 6.5)):
        cv.paint(sl, m, hu=32.0, label=ids["spinal_cord"])
    st_y = p["cy"] - b_in + 10
    for sl, m in cv.tube(np.array([[cx, st_y, hc[2] - 0.6 * hr[2]], [cx, st_y, hc[2] + hr[2] + 60]]),
                         np.full(2, 8.0)):
        cv.paint(sl, m, hu=380.0, label=ids["sternum"])


def _paint_rib(cv: Canvas, p: dict[str, Any], ids: dict[str, int], level: int, zk: float, spine_y: float,
               a_in: float, b_in: float) -> None:
    """Ribs of thoracic level `level`: arcs along the inner chest wall, sloping down anteriorly."""
    span = np.pi * (0.55 if level in (1, 11, 12) else 0.95)  # short first and floating ribs
    for side, prefix in ((-1, "rib_right_"), (1, "rib_left_")):
        phi = np.linspace(0.0, span, 9)
        ang = np.pi / 2 - side * (0.25 + phi)  # from beside the spine, laterally then anteriorly
        pts = np.stack([p["cx"] + (a_in - 6) * np.cos(ang) * np.where(phi == 0, 0.3, 1.0),
                        p["cy"] + (b_in - 6) * np.sin(ang) * np.where(phi == 0, 0.9, 1.0),
                        zk - 45 * np.sin(phi / 2)], axis=1)
        pts[0, 1] = spine_y + 4
        for sl, m in cv.tube(pts, np.full(len(pts), 4.5)):
            cv.paint(sl, m, hu=500.0, label=ids[prefix + str(level)])


# ----------------------------------------------------------------------------------- volumes and texts
def recon_grid(p: dict[str, Any], rng: np.random.Generator, recon: int, realistic: bool
               ) -> tuple[Grid, dict[str, Any]]:
    """Grid and acquisition info of reconstruction `recon` (1-based) of a scan."""
    fov = p["fov"] + (0.0 if recon == 1 else _u(rng, -15, 10))
    if realistic:
        n = 512
        sz = 1.5 if recon == 1 else float(rng.choice([1.25, 2.0]))
    else:
        n = int(rng.choice([120, 128]))
        sz = float(rng.choice([5.0, 5.5, 6.0, 6.5, 7.0])) if recon == 1 else float(rng.choice([5.0, 6.0, 7.0]))
    sxy = round(fov / n, 6)
    extent = p["z_top"] - p["z_bottom"]
    d = int(np.ceil(extent / sz)) + 1
    # Small: at most 64 slices; realistic: a ~360 mm scan range, like CT-RATE's ~240 slices at 1.5 mm.
    d = max(d, int(360 / sz)) if realistic else min(d, 64)
    z0 = p["z_top"] - (d - 1) * sz + _u(rng, -0.5, 0.5) * sz
    ox = p["cx"] - fov / 2 + sxy / 2 + _u(rng, -8, 8)
    oy = p["cy"] - fov / 2 + sxy / 2 + _u(rng, -12, 8)
    grid = Grid((d, n, n), (sxy, sxy, sz), (round(ox, 4), round(oy, 4), round(z0, 4)))
    ri = int(rng.choice(len(RESCALES), p=RESCALE_WEIGHTS))
    info = {"recon_diameter": round(fov, 2), "kernel": ("B30f", "B70f")[recon - 1],
            "noise": 12.0 if recon == 1 else 28.0, "slope": RESCALES[ri][0], "intercept": RESCALES[ri][1]}
    return grid, info


def _rngs(seed: int, tag: int, *key: int) -> np.random.Generator:
    """Independent generator for one purpose (tag) of one split/patient/scan/reconstruction key."""
    return np.random.default_rng([seed, tag, *key])


def truth_volume(seed: int, entry: dict[str, Any], realistic: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Grid, dict[str, Any]]:
    """(truth HU int16, stored raw int16, labels uint8, grid, acquisition info) of one manifest volume."""
    key = (entry["split_id"], entry["patient_no"], entry["scan_idx"])
    p = scan_phantom(seed, *key, entry["abnormalities"])
    grid, info = recon_grid(p, _rngs(seed, _RECON, *key, entry["recon"]), entry["recon"], realistic)
    hu, lab = render(p, grid)
    # Noise: a block of slices drawn once, reused along z with shifts (drawing 60M normals costs ~1.5 s).
    rng = _rngs(seed, _NOISE, *key, entry["recon"])
    block = rng.standard_normal((min(len(hu), 16), *hu.shape[1:]), dtype=np.float32) * np.float32(info["noise"])
    for k in range(len(hu)):
        hu[k] += np.roll(block[k % len(block)], 37 * (k // len(block)), axis=1)
    slope, icpt = info["slope"], info["intercept"]
    # Truth HU must be exactly stored * slope + intercept with integer stored values.
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu -= icpt
    hu /= slope
    stored = np.rint(hu, out=hu).astype(np.int16)
    truth = stored * np.int16(slope) + np.int16(icpt)
    return truth, stored, lab, grid, info


@dataclass(frozen=True)
class ScanText:
    """Anatomy-wise texts of one scan."""

    conc: dict[str, str]  # abnormal anatomies only
    desc: dict[str, str]  # anatomies with a findings text


def _join_lobes(lobes: list[str], long: bool) -> str:
    """'right upper lobe and left lower lobe' (or the findings form); 'both lungs' when bilateral-wide."""
    uniq = list(dict.fromkeys(lobes))
    phrases = [LOBES[lb][1 if long else 0] for lb in uniq]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scan_texts(p: dict[str, Any], rng: np.random.Generator, anatomies: list[str]) -> ScanText:
    """Impression and findings texts per anatomy, consistent with the painted lesions of `p`."""
    les = p["lesions"]
    conc: dict[str, list[str]] = {a: [] for a in anatomies}
    desc: dict[str, list[str]] = {a: [] for a in anatomies}

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    for abn in sorted(p["abn"], key=list(SIMULATED).index):
        anatomy = SIMULATED[abn][0]
        fill: dict[str, str] = {}
        if abn in ("Lung nodule", "Lung opacity", "Consolidation", "Atelectasis"):
            lobes = [lesion[1] for lesion in les[abn]]
            fill = {"lobes": _join_lobes(lobes, False), "lobes_long": _join_lobes(lobes, True),
                    "lobe_long": LOBES[lobes[0]][1]}
            if abn == "Lung nodule":
                fill["size"] = str(int(round(2 * les[abn][0][2])))
                if len(set(lobes)) == 2:
                    fill["lobes"] = f"{LOBES[lobes[0]][0]} and another nodule in the {LOBES[lobes[1]][0]}"
        elif abn == "Pleural effusion":
            e = les[abn]
            fill = {"effusion": EFFUSION_SIDES[e["side"]][0], "where": EFFUSION_SIDES[e["side"]][1],
                    "size": str(int(round(e["depth"])))}
        elif abn == "Pericardial effusion":
            fill = {"size": str(int(round(les[abn]["thick"])))}
        elif abn == "Hiatal hernia":
            fill = {"size": str(int(round(2 * les[abn]["radii"].max())))}
        elif abn == "Arterial wall calcification":
            fill = {"aorta_loc": pick(AORTA_LOCATIONS)}
        conc[anatomy].append(pick(CONC[abn]).format(**fill))
        desc[anatomy].append(pick(DESC[abn]).format(**fill))
    for abn, (anatomy, _) in SIMULATED.items():
        if abn not in p["abn"] and rng.random() < ABSENT_DESC_PROB:
            desc[anatomy].append(pick(ABSENT_DESC[abn]))
    out_desc: dict[str, str] = {}
    for a in anatomies:
        text = " ".join(([] if conc[a] else [pick(NORMAL_DESC[a])]) + desc[a]).strip()
        if text:
            out_desc[a] = text
    return ScanText({a: " ".join(c) for a, c in conc.items() if c}, out_desc)


def _report_row(name: str, text: ScanText, rng: np.random.Generator, grid: Grid,
                anatomies: list[str]) -> dict[str, str]:
    findings = " ".join([FINDINGS_EXTRA] + [text.desc[a] for a in anatomies if a in text.desc])
    impressions = " ".join(text.conc[a] for a in anatomies if a in text.conc) or NORMAL_IMPRESSION
    return {"VolumeName": name, "ClinicalInformation_EN": CLINICAL[int(rng.integers(len(CLINICAL)))],
            "Technique_EN": TECHNIQUE.format(thick=f"{grid.spacing_xyz[2]:g}"),
            "Findings_EN": findings, "Impressions_EN": impressions}


SCANNERS = (("SIEMENS", "SOMATOM Definition Edge"), ("PHILIPS", "Ingenuity CT"), ("TOSHIBA", "Aquilion ONE"))


def _metadata_row(name: str, grid: Grid, info: dict[str, Any], rng: np.random.Generator,
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
        "VolumeName": name, "Manufacturer": manu, "SeriesDescription": f"THORAX {sz:g} {info['kernel']}",
        "ManufacturerModelName": model, "PatientSex": study["sex"], "PatientAge": f"{study['age']:03d}Y",
        "ReconstructionDiameter": info["recon_diameter"], "DistanceSourceToDetector": 1085.6,
        "DistanceSourceToPatient": 595.0, "GantryDetectorTilt": 0.0,
        "TableHeight": round(_u(rng, 120, 180), 1), "RotationDirection": "CW", "ExposureTime": exposure_time,
        "XRayTubeCurrent": current, "Exposure": int(current * exposure_time / 1000), "FilterType": "FLAT",
        "GeneratorPower": int(current * 120 / 1000), "FocalSpots": "[1.2]",
        "ConvolutionKernel": info["kernel"], "PatientPosition": "FFS", "RevolutionTime": 0.5,
        "SingleCollimationWidth": 0.6, "TotalCollimationWidth": 38.4, "TableSpeed": 46.0,
        "TableFeedPerRotation": 23.0, "SpiralPitchFactor": 0.6, "DataCollectionCenterPatient": center,
        "ReconstructionTargetCenterPatient": center, "ExposureModulationType": "XYZ_EC",
        "CTDIvol": round(_u(rng, 4, 12), 2), "ImagePositionPatient": f"[{ox}, {oy}, {oz}]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "SliceLocation": oz, "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "Rows": h, "Columns": w, "XYSpacing": f"[{sx}, {sy}]",
        "RescaleIntercept": info["intercept"], "RescaleSlope": info["slope"], "RescaleType": "HU",
        "NumberofSlices": d, "ZSpacing": sz, "StudyDate": study["date"],
    }


# ------------------------------------------------------------------------------------------- writing
def _write_image(path: Path, array: np.ndarray, grid: Grid | None) -> None:
    """Atomic NIfTI write by SimpleITK; grid None = CT-RATE raw header (spacing 1, origin 0, identity).
    SimpleITK writes the .nii, gzip (level 1, mtime 0: fast and byte-reproducible) compresses it;
    SimpleITK's own gzip takes ~10 s for a 512x512x240 volume."""
    import gzip
    import shutil

    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    if grid is not None:
        img.SetSpacing(grid.spacing_xyz)
        img.SetOrigin(grid.origin_xyz)
        img.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[:-len(".nii.gz")]
    tmp_nii, tmp_gz = path.with_name(f".{stem}.tmp.nii"), path.with_name(f".{stem}.tmp.nii.gz")
    sitk.WriteImage(img, str(tmp_nii), useCompression=False)
    with open(tmp_nii, "rb") as src, open(tmp_gz, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    tmp_nii.unlink()
    os.replace(tmp_gz, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _volume_job(args: tuple[str, int, dict[str, Any], bool, int]) -> dict[str, Any]:
    """Render and write one reconstruction (v1 raw or v2 HU, + ground-truth labels); returns its manifest entry."""
    out_dir, seed, entry, realistic, ctrate_version = args
    truth, stored, lab, grid, info = truth_volume(seed, entry, realistic)
    rel = Path(entry["split"]) / entry["patient"] / entry["scan"] / entry["name"]
    if ctrate_version == 1:
        _write_image(Path(out_dir) / rel, stored, None)
    else:
        _write_image(Path(out_dir) / f"{entry['split']}_fixed" / rel.relative_to(entry["split"]), truth, grid)
    _write_image(Path(out_dir) / "totalseg_gt" / rel, lab, grid)
    return {**entry, "shape_dhw": list(grid.shape_dhw), "spacing_xyz": list(grid.spacing_xyz),
            "origin_xyz": list(grid.origin_xyz), "direction": list(DIRECTION), "rescale_slope": info["slope"],
            "rescale_intercept": info["intercept"], "kernel": info["kernel"],
            "recon_diameter": info["recon_diameter"], "hu_md5": hashlib.md5(truth.tobytes()).hexdigest(),
            "labels_present": [int(i) for i in np.flatnonzero(np.bincount(lab.ravel(), minlength=256)) if i]}


def _layout(seed: int, split: str, split_id: int, n_scans: int) -> list[dict[str, Any]]:
    """Scans of a split with patient/scan/reconstruction names and the abnormality plan."""
    rng = _rngs(seed, _LAYOUT, split_id)
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
    plan = _rngs(seed, _PLAN, split_id)
    for abn, (_, prevalence) in SIMULATED.items():
        k = int(np.clip(round(prevalence * n_scans), 1, max(n_scans - 1, 1)))
        for i in sorted(plan.choice(n_scans, size=k, replace=False)):
            scans[int(i)]["abnormalities"].append(abn)
    return scans


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
    for split_id, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        rows[split] = {"metadata": [], "reports": [], "labels": []}
        for sc in _layout(seed, split, split_id, n):
            key = (split_id, sc["patient_no"], sc["scan_idx"])
            p = scan_phantom(seed, *key, sc["abnormalities"])
            text = scan_texts(p, _rngs(seed, _TEXT, *key), anatomies)
            desc_info[sc["scan"]], conc_info[sc["scan"]] = text.desc, text.conc
            rng = _rngs(seed, _TEXT, *key, 1)
            study = {"sex": ("M", "F")[int(rng.integers(2))], "age": int(rng.integers(25, 86)),
                     "scanner": int(rng.integers(len(SCANNERS))),
                     "date": 20200100 + int(rng.integers(0, 11)) * 100 + int(rng.integers(1, 29))}
            for recon in range(1, sc["n_recons"] + 1):
                name = f"{sc['scan']}_{recon}.nii.gz"
                entry = {k: sc[k] for k in ("split", "split_id", "patient", "patient_no", "scan", "scan_idx",
                                            "abnormalities")} | {"name": name, "recon": recon}
                jobs.append((str(out), seed, entry, realistic, ctrate_version))
                grid, info = recon_grid(p, _rngs(seed, _RECON, *key, recon), recon, realistic)
                rows[split]["metadata"].append(_metadata_row(name, grid, info, rng, study))
                rows[split]["reports"].append(_report_row(name, text, rng, grid, anatomies))
                rows[split]["labels"].append(
                    {"VolumeName": name} | {c: int(c in sc["abnormalities"]) for c in LABEL_COLUMNS})
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            entries = list(tqdm(pool.map(_volume_job, jobs), total=len(jobs), desc="synthetic volumes"))
    else:
        entries = [_volume_job(j) for j in tqdm(jobs, desc="synthetic volumes")]
    for split, names in SPLITS.items():
        tables = (("metadata", f"metadata/{names['metadata']}_metadata.csv", METADATA_COLUMNS),
                  ("reports", f"radiology_text_reports/{names['reports']}_reports.csv", REPORT_COLUMNS),
                  ("labels", f"multi_abnormality_labels/{names['labels']}_predicted_labels.csv",
                   ("VolumeName",) + LABEL_COLUMNS))
        for kind, rel, columns in tables:
            _write_text(out / rel, pd.DataFrame(rows[split][kind], columns=list(columns)).to_csv(index=False))
    _write_text(out / "desc_info.json", json.dumps(desc_info, indent=1))
    _write_text(out / "conc_info.json", json.dumps(conc_info, indent=1))
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_valid": n_valid,
                "realistic": realistic, "ctrate_version": ctrate_version,
                "simulated": {k: v[0] for k, v in SIMULATED.items()},
                "volumes": entries}
    _write_text(out / MANIFEST, json.dumps(manifest, indent=1))
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
            "direction": DIRECTION}


# -------------------------------------------------------------------------------------- demo tokenizer
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _words(text: str) -> list[str]:
    """Lowercase words as BERT's basic tokenizer splits them (punctuation handled separately)."""
    return re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", text.lower()))


def build_demo_vocab() -> list[str]:
    """WordPiece vocabulary of the demo BERT: special tokens, every character (plain and ##), then every
    word the generator can write and every word of the zero-shot prompts, sorted. Deterministic."""
    import yaml

    with open(ZEROSHOT_ITEMS, encoding="utf-8") as f:
        items = yaml.safe_load(f)["items"]
    anatomies = [a for a, _ in load_anatomies()]
    texts: list[str] = [TECHNIQUE, FINDINGS_EXTRA, NORMAL_IMPRESSION, *CLINICAL, *AORTA_LOCATIONS]
    texts += [normal_template(a) for a in anatomies]
    texts += [s for group in (CONC, DESC, ABSENT_DESC, NORMAL_DESC) for options in group.values() for s in options]
    texts += [s for pair in list(LOBES.values()) + list(EFFUSION_SIDES.values()) for s in pair]
    texts += ["and another nodule in the", *LABEL_COLUMNS]
    texts += [str(x) for item in items for x in item]
    words = sorted({w for t in texts for w in _words(t)} - set("abcdefghijklmnopqrstuvwxyz"))
    chars = list(_PUNCT) + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz")
    cont = ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + cont + words


def write_demo_bert(config_dir: str | Path = DEMO_BERT_DIR) -> None:
    """Write vocab.txt, config.json (tiny random BERT) and tokenizer_config.json of the demo text encoder."""
    d = Path(config_dir)
    vocab = build_demo_vocab()
    # A random BERT at the usual init scale (std 0.02) gives almost the same [CLS] vector for
    # every text (cosine 0.9998), which parks contrastive training on its ln(N) plateau;
    # std 0.3 makes distinct texts distinct from the first step. No dropout: the demo is short.
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab),
              "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.3,
              "layer_norm_eps": 1e-12, "pad_token_id": 0}
    tok = {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}
    _write_text(d / "vocab.txt", "\n".join(vocab) + "\n")
    _write_text(d / "config.json", json.dumps(config, indent=2) + "\n")
    _write_text(d / "tokenizer_config.json", json.dumps(tok, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", dest="data_root", help="data root written (required unless --write-demo-bert)")
    ap.add_argument("--n-train", type=int, default=24, help="training scans")
    ap.add_argument("--n-valid", type=int, default=12, help="validation scans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--realistic", action="store_true", help="512x512x~240 at ~0.7x0.7x1.5 mm (benchmarks)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ctrate-version", type=int, choices=(1, 2), default=1,
                    help="1: raw volumes under {split}/ (original upload); 2: HU with true geometry under "
                         "{split}_fixed/ (today's download)")
    ap.add_argument("--write-demo-bert", metavar="DIR", nargs="?", const=str(DEMO_BERT_DIR),
                    help=f"(re)write the demo BERT vocab/config (default {DEMO_BERT_DIR}) and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = get_args_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.write_demo_bert:
        write_demo_bert(args.write_demo_bert)
        return 0
    if not args.data_root:
        ap.error("--data-root is required")
    if min(args.n_train, args.n_valid) < 1 or args.workers < 1:
        ap.error("--n-train, --n-valid and --workers must be >= 1")
    generate_dataset(args.data_root, n_train=args.n_train, n_valid=args.n_valid, seed=args.seed,
                     realistic=args.realistic, workers=args.workers, ctrate_version=args.ctrate_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
