"""The chest phantom of one scan: a typed description drawn from seeded generators, and its rendering.

A `Phantom` is a `Patient` (body habitus, shared by all scans of a patient), the scan's position and
range, its abnormalities and their `Lesions`. `render` paints it on a `Grid` as noise-free HU and
TotalSegmentator `total` labels. Coordinates are LPS millimetres (x, y, z); arrays are (D, H, W).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Iterator

import numpy as np


class Stream(IntEnum):
    """Tags that keep the random streams of different purposes independent."""

    PLAN = 0
    PATIENT = 1
    SCAN = 2
    TEXT = 3
    RECON = 4
    NOISE = 5
    LAYOUT = 6


def rngs(seed: int, stream: Stream, *key: int) -> np.random.Generator:
    """Independent generator for one purpose (stream) of one split/patient/scan/reconstruction key."""
    return np.random.default_rng([seed, int(stream), *key])


def uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """Uniform draw as a plain float (keeps parameters JSON-friendly)."""
    return float(rng.uniform(a, b))


def total_ids_by_name() -> dict[str, int]:
    """TotalSegmentator `total` class name -> id, from the installed package (never retyped)."""
    from totalsegmentator.map_to_binary import class_map

    return {name: int(i) for i, name in class_map["total"].items()}


# TotalSegmentator lobe classes; the order is that of the draws in `scan_phantom`.
LUNG_LOBES: tuple[str, ...] = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                               "lung_middle_lobe_right", "lung_lower_lobe_right")


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


# ------------------------------------------------------------------------------- phantom description
@dataclass(frozen=True)
class Patient:
    """Body habitus of one patient (mm, HU), shared by all its scans."""

    body_a: float  # body half axes: left-right
    body_b: float  # and antero-posterior
    fat: float  # subcutaneous fat thickness
    lung_off: float  # lung centres at x = +-lung_off from the body centre
    lung_rx: float
    lung_ry: float
    lung_rz: float  # lungs span ~1.85 * lung_rz in z (<= 225 mm)
    lung_v: float  # lung centres' offset in y
    lung_hu: float
    fissure: float  # oblique fissure height at the lung centre (normalised z)
    horizontal: float  # horizontal fissure height of the right lung (normalised z)
    heart_u: float  # heart centre offset in x
    heart_v: float  # and in y
    heart_a: float  # heart half axes
    heart_b: float
    heart_c: float
    heart_angle: float  # heart long axis rotation about z (rad)
    heart_hu: float
    aorta_r: float
    arch_h: float  # height of the aortic arch above its ends
    spine_back: float  # vertebral body centre, mm in front of the posterior skin
    vert_r: float
    vert_pitch: float
    eso_r: float
    trachea_r: float


@dataclass(frozen=True)
class LungBall:
    """A ball-shaped lung lesion (emphysema bulla, nodule)."""

    center: np.ndarray  # (x, y, z) mm
    lobe: str  # TotalSegmentator lobe class holding the centre
    radius: float


@dataclass(frozen=True)
class LungEllipsoid:
    """An ellipsoidal lung lesion (opacity, consolidation, atelectasis)."""

    center: np.ndarray  # (x, y, z) mm
    lobe: str  # TotalSegmentator lobe class holding the centre
    radii: np.ndarray  # (x, y, z) half axes, mm


@dataclass(frozen=True)
class PleuralEffusion:
    side: str  # "right", "left" or "both"
    depth: float  # mm at the posterior base
    hu: float


@dataclass(frozen=True)
class PericardialEffusion:
    thickness: float  # mm around the heart
    hu: float


@dataclass(frozen=True)
class CoronaryPlaque:
    """A calcified segment on the heart surface."""

    direction: np.ndarray  # (3,) draw that places the segment's start on the surface
    length: float
    radius: float
    hu: float


@dataclass(frozen=True)
class AorticPlaque:
    """A calcified segment on the aortic wall."""

    position: float  # fraction of the arch + descending aorta's length
    direction: np.ndarray  # (3,) draw that picks the side of the wall
    radius: float
    hu: float


@dataclass(frozen=True)
class HiatalHernia:
    radii: np.ndarray  # (x, y, z) half axes, mm


@dataclass(frozen=True)
class Lesions:
    """What the abnormalities of a scan paint; empty or None for an absent abnormality."""

    emphysema: tuple[LungBall, ...] = ()
    nodules: tuple[LungBall, ...] = ()
    opacities: tuple[LungEllipsoid, ...] = ()
    consolidations: tuple[LungEllipsoid, ...] = ()
    atelectases: tuple[LungEllipsoid, ...] = ()
    pleural_effusion: PleuralEffusion | None = None
    pericardial_effusion: PericardialEffusion | None = None
    coronary_plaques: tuple[CoronaryPlaque, ...] = ()
    aortic_plaques: tuple[AorticPlaque, ...] = ()
    hiatal_hernia: HiatalHernia | None = None

    def in_lungs(self, abnormality: str) -> tuple[LungBall | LungEllipsoid, ...]:
        """The lung lesions of `abnormality` (a lung abnormality drawn in lobes)."""
        return {"Emphysema": self.emphysema, "Lung nodule": self.nodules, "Lung opacity": self.opacities,
                "Consolidation": self.consolidations, "Atelectasis": self.atelectases}[abnormality]


@dataclass(frozen=True)
class Phantom:
    """All physical parameters of one scan (shared by its reconstructions)."""

    patient: Patient  # with the scan's changes (hyperinflated lungs in emphysema)
    abnormalities: tuple[str, ...]  # sorted
    cx: float  # body centre (x, y) and lung centre height z, mm
    cy: float
    cz: float
    fov: float  # field of view of the first reconstruction, mm
    z_top: float  # scan range, mm
    z_bottom: float
    lesions: Lesions = field(default_factory=Lesions)


def patient_anatomy(rng: np.random.Generator) -> Patient:
    """Body habitus of one patient; the keyword order is the draw order."""
    return Patient(
        body_a=uniform(rng, 138, 160), body_b=uniform(rng, 98, 115), fat=uniform(rng, 8, 20),
        lung_off=uniform(rng, 66, 76), lung_rx=uniform(rng, 52, 62), lung_ry=uniform(rng, 76, 90),
        lung_rz=uniform(rng, 102, 120), lung_v=uniform(rng, 0, 8), lung_hu=uniform(rng, -875, -845),
        fissure=uniform(rng, -0.25, -0.15), horizontal=uniform(rng, -0.1, 0.05),
        heart_u=uniform(rng, 12, 24), heart_v=-uniform(rng, 16, 26),
        heart_a=uniform(rng, 48, 56), heart_b=uniform(rng, 38, 44), heart_c=uniform(rng, 42, 50),
        heart_angle=uniform(rng, 0.35, 0.6), heart_hu=uniform(rng, 38, 50),
        aorta_r=uniform(rng, 13, 16), arch_h=uniform(rng, 18, 28), spine_back=uniform(rng, 62, 72),
        vert_r=uniform(rng, 15, 19), vert_pitch=uniform(rng, 22, 26), eso_r=uniform(rng, 7, 9),
        trachea_r=uniform(rng, 8, 10))


def _lung_frame(p: Phantom, side: int) -> tuple[float, float, float]:
    """Centre (x, y, z) of the right (side=-1) or left (side=+1) lung."""
    return p.cx + side * p.patient.lung_off, p.cy + p.patient.lung_v, p.cz


def lung_lobe(p: Phantom, ids: dict[str, int], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Lobe label (TotalSegmentator id, 0 outside) of points: the analytic lung shape before the
    mediastinum is painted over it. Broadcasts over x, y, z (mm)."""
    pt = p.patient
    out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.uint8)
    inner_a, inner_b = pt.body_a - pt.fat - 14, pt.body_b - pt.fat - 14
    in_chest = ((x - p.cx) / inner_a) ** 2 + ((y - p.cy) / inner_b) ** 2 <= 1.0
    for side, name in ((-1, "right"), (1, "left")):
        lx, ly, lz = _lung_frame(p, side)
        un, vn, wn = (x - lx) / pt.lung_rx, (y - ly) / pt.lung_ry, (z - lz) / pt.lung_rz
        # Rounded apex, broad base: an ellipsoid above the centre, a super-ellipsoid (power 4) below.
        u2, v2, w2 = un * un, vn * vn, wn * wn
        inside = np.where(wn < 0, u2 * u2 + v2 * v2 + w2 * w2, u2 + v2 + w2) <= 1.0
        dome = (0.28 if side < 0 else 0.2) * np.clip(1.0 - un * un - vn * vn, 0.0, None)
        inside &= (wn >= -0.85 + dome) & in_chest
        lower = wn < pt.fissure + 0.55 * vn  # oblique fissure: lower lobe reaches higher posteriorly
        if name == "right":
            middle = ~lower & (wn < pt.horizontal)
            lobe = np.where(lower, ids["lung_lower_lobe_right"],
                            np.where(middle, ids["lung_middle_lobe_right"], ids["lung_upper_lobe_right"]))
        else:
            lobe = np.where(lower, ids["lung_lower_lobe_left"], ids["lung_upper_lobe_left"])
        out = np.where(inside, lobe.astype(np.uint8), out)
    return out


def heart_radii(p: Phantom) -> np.ndarray:
    """Heart half axes (mm), enlarged for cardiomegaly."""
    r = np.array([p.patient.heart_a, p.patient.heart_b, p.patient.heart_c])
    return r * (np.array([1.38, 1.22, 1.28]) if "Cardiomegaly" in p.abnormalities else 1.0)


def heart_center(p: Phantom) -> np.ndarray:
    """Heart centre (mm): it rests on the left hemidiaphragm, so an enlarged heart grows up and left."""
    r = heart_radii(p)
    base = p.cz - 0.8 * p.patient.lung_rz
    return np.array([p.cx + p.patient.heart_u + 0.25 * (r[0] - p.patient.heart_a), p.cy + p.patient.heart_v,
                     base + 0.75 * r[2]])


def _sample_in_lung(p: Phantom, ids: dict[str, int], rng: np.random.Generator, radius: float,
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
        c = np.array([lx + side * uniform(rng, -0.3, 0.75) * p.patient.lung_rx,
                      ly + uniform(rng, 0.2 if posterior else -0.8, 0.8) * p.patient.lung_ry,
                      lz + uniform(rng, *wn_range) * p.patient.lung_rz])
        pts = c + offs
        labels = lung_lobe(p, ids, pts[:, 0], pts[:, 1], pts[:, 2])
        clear = (((pts - hc) / hr) ** 2).sum(1).min() > 1.0 and abs(c[0] - p.cx) > 35 + radius
        if clear and np.all(labels == ids[lobe]):
            return c, lobe
        if best is None and labels[0] == ids[lobe]:
            best = (c, lobe)
    if best is None:  # else: accept a centre in the lobe whose ball crosses its border (rare)
        raise RuntimeError("could not place a lung lesion; phantom parameters are inconsistent")
    return best


def _draw_lesions(p: Phantom, ids: dict[str, int], rng: np.random.Generator) -> Lesions:
    """Lesions of the abnormalities of `p`, drawn in this fixed order (it fixes the random stream)."""
    abn = p.abnormalities
    upper = ("lung_upper_lobe_left", "lung_upper_lobe_right")
    lower = ("lung_lower_lobe_left", "lung_lower_lobe_right")
    lesions: dict[str, object] = {}
    if "Emphysema" in abn:
        lesions["emphysema"] = tuple(
            LungBall(*_sample_in_lung(p, ids, rng, 10, upper, (0.0, 0.8)), uniform(rng, 16, 28))
            for _ in range(int(rng.integers(5, 9))))
    if "Lung nodule" in abn:
        nodules = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            r = uniform(rng, 6, 12.5)
            nodules.append(LungBall(*_sample_in_lung(p, ids, rng, r, LUNG_LOBES), r))
        lesions["nodules"] = tuple(nodules)
    if "Lung opacity" in abn:
        lesions["opacities"] = tuple(
            LungEllipsoid(*_sample_in_lung(p, ids, rng, 15, LUNG_LOBES),
                          np.array([uniform(rng, 20, 32) for _ in range(3)]))
            for _ in range(int(rng.integers(2, 4))))
    if "Consolidation" in abn:
        c, lobe = _sample_in_lung(p, ids, rng, 18, lower + ("lung_middle_lobe_right",), (-0.6, 0.3))
        lesions["consolidations"] = (LungEllipsoid(c, lobe, np.array([uniform(rng, 20, 28) for _ in range(3)])),)
    if "Atelectasis" in abn:
        lesions["atelectases"] = tuple(
            LungEllipsoid(*_sample_in_lung(p, ids, rng, 12, lower, (-0.6, -0.1), posterior=True),
                          np.array([uniform(rng, 28, 40), uniform(rng, 8, 11), uniform(rng, 18, 26)]))
            for _ in range(1 if rng.random() < 0.6 else 2))
    if "Pleural effusion" in abn:
        side = ("right", "left", "both")[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
        lesions["pleural_effusion"] = PleuralEffusion(side, uniform(rng, 22, 38), uniform(rng, 5, 15))
    if "Pericardial effusion" in abn:
        lesions["pericardial_effusion"] = PericardialEffusion(uniform(rng, 10, 15), uniform(rng, 0, 12))
    if "Coronary artery wall calcification" in abn:
        lesions["coronary_plaques"] = tuple(
            CoronaryPlaque(rng.normal(size=3), uniform(rng, 12, 22), uniform(rng, 4.0, 5.0), uniform(rng, 600, 1000))
            for _ in range(int(rng.integers(2, 5))))
    if "Arterial wall calcification" in abn:
        lesions["aortic_plaques"] = tuple(
            AorticPlaque(uniform(rng, 0.15, 1.0), rng.normal(size=3), uniform(rng, 4.0, 5.5), uniform(rng, 600, 1000))
            for _ in range(int(rng.integers(3, 7))))
    if "Hiatal hernia" in abn:
        lesions["hiatal_hernia"] = HiatalHernia(
            np.array([uniform(rng, 22, 30), uniform(rng, 20, 26), uniform(rng, 22, 30)]))
    return Lesions(**lesions)


def scan_phantom(seed: int, split_id: int, patient_no: int, scan_idx: int, abnormalities: list[str]) -> Phantom:
    """The phantom of one scan (shared by its reconstructions)."""
    ids = total_ids_by_name()
    patient = patient_anatomy(rngs(seed, Stream.PATIENT, split_id, patient_no))
    rng = rngs(seed, Stream.SCAN, split_id, patient_no, scan_idx)
    cx, cy = uniform(rng, -12, 12), uniform(rng, -20, 5)
    cz = uniform(rng, -250, -150)
    fov = uniform(rng, 345, 385)
    # Scan range <= ~290 mm: anatomies leaving the scan (aorta, esophagus) must fit the demo crop.
    z_top = cz + patient.lung_rz + uniform(rng, 10, 25)
    z_bottom = cz - 0.85 * patient.lung_rz - uniform(rng, 20, 35)
    abn = tuple(sorted(abnormalities))
    if "Emphysema" in abn:  # hyperinflated, hyperlucent lungs
        patient = replace(patient, lung_rz=patient.lung_rz * 1.04, lung_hu=patient.lung_hu - 30)
    p = Phantom(patient, abn, cx, cy, cz, fov, z_top, z_bottom)
    return replace(p, lesions=_draw_lesions(p, ids, rng))


# ------------------------------------------------------------------------------------------ rendering
_ARCH_ABOVE_HEART = 40.0  # mm between the heart's top and the aortic arch


def _aorta_centerline(p: Phantom) -> tuple[np.ndarray, np.ndarray]:
    """Aorta centreline points (x, y, z) and radii: ascending, arch, descending."""
    pt = p.patient
    hc, hr = heart_center(p), heart_radii(p)
    spine_y = p.cy + pt.body_b - pt.spine_back
    w_arch = hc[2] + hr[2] + _ARCH_ABOVE_HEART
    asc = np.array([hc[0] - 0.3 * hr[0], hc[1] + 0.2 * hr[1], hc[2] + 0.2 * hr[2]])
    asc_top = np.array([p.cx - 2.0, hc[1] + 8.0, w_arch])
    desc_top = np.array([p.cx + 24.0, spine_y - pt.vert_r - 10.0, w_arch])
    t = np.linspace(0, np.pi, 9)
    arch = asc_top + np.outer((1 - np.cos(t)) / 2, desc_top - asc_top)
    arch[:, 2] += pt.arch_h * np.sin(t)
    bottom = desc_top.copy()
    bottom[2] = p.z_bottom - 20
    pts = np.vstack([asc, arch, bottom])
    r = pt.aorta_r
    radii = np.concatenate([[r + 1.5], np.linspace(r + 1.5, r - 1.5, len(arch)), [r - 2.5]])
    return pts, radii


def _vertebra_names() -> list[str]:
    """TotalSegmentator vertebra classes from top (C1) to bottom (S1)."""
    return ([f"vertebrae_C{i}" for i in range(1, 8)] + [f"vertebrae_T{i}" for i in range(1, 13)]
            + [f"vertebrae_L{i}" for i in range(1, 6)] + ["vertebrae_S1"])


def render(p: Phantom, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU (float32) and TotalSegmentator labels (uint8) of phantom `p` on `grid`."""
    ids = total_ids_by_name()
    pt, les = p.patient, p.lesions
    cv = Canvas(grid)
    cx, cy = p.cx, p.cy
    lobe_ids = tuple(ids[n] for n in LUNG_LOBES)
    # Body: subcutaneous fat ring around muscle/soft tissue (2D, same on every slice).
    ex = ((cv.x[None, :] - cx) / pt.body_a) ** 2 + ((cv.y[:, None] - cy) / pt.body_b) ** 2
    a_in, b_in = pt.body_a - pt.fat, pt.body_b - pt.fat
    inner = ((cv.x[None, :] - cx) / a_in) ** 2 + ((cv.y[:, None] - cy) / b_in) ** 2 <= 1.0
    cv.hu[:, ex <= 1.0] = -100.0
    cv.hu[:, inner] = 40.0
    base_z = p.cz - 0.85 * pt.lung_rz
    # Upper abdomen under the diaphragm (lungs are painted over their tops).
    for name, c, r, hu in (
            ("liver", (cx - 0.75 * pt.lung_off, cy + 5, base_z - 25), (a_in * 0.62, b_in * 0.8, 70), 58.0),
            ("stomach", (cx + 0.85 * pt.lung_off, cy - 15, base_z - 5), (42, 40, 32), 30.0)):
        hit = cv.ellipsoid(np.array(c), np.array(r))
        if hit:
            sl, m, (_, vn, _) = hit
            m = m & inner[None, sl[1], sl[2]]
            cv.paint(sl, m, hu=hu, label=ids[name])
            if name == "stomach":  # gas cap rises anteriorly in a supine patient
                cv.paint(sl, m & (vn < -0.45), hu=-1000.0)
    # Lungs with lobes; parenchyma denser posteriorly (dependent lung).
    lr = np.array([pt.lung_off + pt.lung_rx + 2, pt.lung_ry + pt.lung_v + 2, 0])
    hit = cv.box(np.array([cx, cy, base_z - 2]) - lr, np.array([cx, cy, p.cz + pt.lung_rz + 2]) + lr)
    if hit:
        sl, (z, y, x) = hit
        lobes = lung_lobe(p, ids, x, y, z)
        grad = pt.lung_hu + 35.0 * (y - cy - pt.lung_v) / pt.lung_ry
        cv.paint(sl, lobes > 0, hu=np.broadcast_to(grad, lobes.shape).astype(np.float32))
        cv.lab[sl][lobes > 0] = lobes[lobes > 0]
    _paint_lung_lesions(cv, p, lobe_ids)
    # Mediastinum and chest wall, painted over the lungs.
    spine_y = cy + pt.body_b - pt.spine_back
    eso_x, eso_y = cx + 2.0, spine_y - pt.vert_r - 11.0
    hc, hr = heart_center(p), heart_radii(p)
    apts, arad = _aorta_centerline(p)
    for sl, m in cv.tube(apts, arad):
        cv.paint(sl, m, hu=pt.heart_hu, label=ids["aorta"])
    if les.pericardial_effusion:
        e = les.pericardial_effusion
        hit = cv.ellipsoid(hc, hr + e.thickness, pt.heart_angle)
        if hit:
            cv.paint(hit[0], hit[1], hu=e.hu, label=0)
    hit = cv.ellipsoid(hc, hr, pt.heart_angle)
    if hit:
        cv.paint(hit[0], hit[1], hu=pt.heart_hu, label=ids["heart"])
    laa = hc + np.array([0.55 * hr[0], -0.35 * hr[1], 0.55 * hr[2]])
    hit = cv.ellipsoid(laa, np.array([14.0, 9.0, 10.0]))
    if hit:
        cv.paint(hit[0], hit[1], hu=pt.heart_hu, label=ids["atrial_appendage_left"])
    if les.hiatal_hernia:  # stomach herniated above the diaphragm behind the heart, air-fluid level
        r = les.hiatal_hernia.radii
        hit = cv.ellipsoid(np.array([eso_x + 10, eso_y - 6, base_z + 0.6 * r[2]]), r)
        if hit:
            sl, m, (_, vn, _) = hit
            allowed = (0, ids["heart"], ids["atrial_appendage_left"], ids["liver"], ids["stomach"]) + lobe_ids
            contents = np.broadcast_to(np.where(vn < -0.1, -1000.0, 15.0), m.shape).astype(np.float32)
            cv.paint(sl, m, hu=np.where(vn ** 2 < 0.8, contents, 40.0).astype(np.float32),
                     label=ids["esophagus"], only=allowed)
    for plaque in les.coronary_plaques:
        # Plaque segments on the anterior/left heart surface, where the coronary arteries run.
        d = np.abs(plaque.direction) * np.array([1.0, -1.0, 1.0]) + np.array([0.3, -0.6, 0.0])
        a = _on_ellipsoid(hc, hr * 0.97, d, pt.heart_angle)
        tangent = np.cross(d / np.linalg.norm(d), [0.0, 0.0, 1.0])
        b = _on_ellipsoid(hc, hr * 0.97, a - hc + plaque.length * tangent, pt.heart_angle)
        for sl, m in cv.tube(np.array([a, b]), np.array([plaque.radius, plaque.radius])):
            cv.paint(sl, m, hu=plaque.hu, label=ids["heart"])
    for plaque in les.aortic_plaques:
        # Plaque segments (~12 mm long) along the wall of the arch or the descending aorta.
        a, b = _along(apts[1:], plaque.position - 0.04), _along(apts[1:], plaque.position)
        t = (b - a) / np.linalg.norm(b - a)
        d = plaque.direction - (plaque.direction @ t) * t
        d = 0.85 * pt.aorta_r * d / np.linalg.norm(d)
        for sl, m in cv.tube(np.array([a + d, b + d]), np.array([plaque.radius, plaque.radius])):
            cv.paint(sl, m, hu=plaque.hu, label=ids["aorta"], only=(0, ids["aorta"]) + lobe_ids)
    eso = np.array([[eso_x, eso_y, p.z_top + 20], [eso_x, eso_y, base_z + 10],
                    [eso_x + 25, eso_y - 25, base_z - 15]])
    for sl, m in cv.tube(eso, np.full(3, pt.eso_r)):
        cv.paint(sl, m, hu=35.0, label=ids["esophagus"])
    tr_y = eso_y - pt.eso_r - pt.trachea_r - 3
    carina = np.array([cx, tr_y, hc[2] + hr[2] + _ARCH_ABOVE_HEART - 15])
    for sl, m in cv.tube(np.array([[cx, tr_y, p.z_top + 20], carina]), np.full(2, pt.trachea_r)):
        cv.paint(sl, m, hu=-1000.0, label=ids["trachea"])
    for side in (-1, 1):  # main bronchi, labelled with the trachea (no bronchus class in `total`)
        end = carina + np.array([side * 38.0, 12.0, -32.0])
        for sl, m in cv.tube(np.array([carina, end]), np.array([pt.trachea_r - 2, 5.0])):
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


def _paint_lung_lesions(cv: Canvas, p: Phantom, lobe_ids: tuple[int, ...]) -> None:
    """Lung abnormalities, painted over lung voxels only (the label stays the lobe, as TotalSegmentator
    would segment it), except pleural fluid, which lies outside the lung."""
    les, pt = p.lesions, p.patient
    for bulla in les.emphysema:
        hit = cv.sphere(bulla.center, bulla.radius)
        if hit:
            cv.paint(*hit, hu=-975.0, only=lobe_ids)
    for lesions, hu in ((les.opacities, -600.0), (les.atelectases, -60.0), (les.consolidations, 30.0)):
        for lesion in lesions:
            hit = cv.ellipsoid(lesion.center, lesion.radii)
            if hit:
                cv.paint(hit[0], hit[1], hu=hu, only=lobe_ids)
    for nodule in les.nodules:
        hit = cv.sphere(nodule.center, nodule.radius)
        if hit:
            cv.paint(*hit, hu=45.0, only=lobe_ids)
    eff = les.pleural_effusion
    if eff:
        sides = {"right": (-1,), "left": (1,), "both": (-1, 1)}[eff.side]
        base_z = p.cz - 0.85 * pt.lung_rz
        for side in sides:
            lx, ly, _ = _lung_frame(p, side)
            lo = np.array([lx - pt.lung_rx, ly + pt.lung_ry - 1.4 * eff.depth, base_z - 5])
            hi = np.array([lx + pt.lung_rx, ly + pt.lung_ry, base_z + 1.2 * pt.lung_rz])
            hit = cv.box(lo, hi)
            if hit:
                sl, (z, y, x) = hit
                # Layering fluid: deepest at the posterior base, thinning upwards.
                depth = eff.depth * np.clip(1.4 - (z - base_z) / pt.lung_rz, 0.0, 1.4)
                m = np.broadcast_to((y - ly) > pt.lung_ry - depth, cv.lab[sl].shape)
                cv.paint(sl, m, hu=eff.hu, label=0, only=lobe_ids)


def _paint_skeleton(cv: Canvas, p: Phantom, ids: dict[str, int], spine_y: float, a_in: float,
                    b_in: float, hc: np.ndarray, hr: np.ndarray) -> None:
    """Vertebrae (bodies, spinous and transverse processes), spinal cord, ribs and sternum."""
    cx, pitch, rv = p.cx, p.patient.vert_pitch, p.patient.vert_r
    names = _vertebra_names()
    t1 = names.index("vertebrae_T1")
    z_t1 = p.cz + p.patient.lung_rz + 12  # T1 sits at the lung apices
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
    st_y = p.cy - b_in + 10
    for sl, m in cv.tube(np.array([[cx, st_y, hc[2] - 0.6 * hr[2]], [cx, st_y, hc[2] + hr[2] + 60]]),
                         np.full(2, 8.0)):
        cv.paint(sl, m, hu=380.0, label=ids["sternum"])


def _paint_rib(cv: Canvas, p: Phantom, ids: dict[str, int], level: int, zk: float, spine_y: float,
               a_in: float, b_in: float) -> None:
    """Ribs of thoracic level `level`: arcs along the inner chest wall, sloping down anteriorly."""
    span = np.pi * (0.55 if level in (1, 11, 12) else 0.95)  # short first and floating ribs
    for side, prefix in ((-1, "rib_right_"), (1, "rib_left_")):
        phi = np.linspace(0.0, span, 9)
        ang = np.pi / 2 - side * (0.25 + phi)  # from beside the spine, laterally then anteriorly
        pts = np.stack([p.cx + (a_in - 6) * np.cos(ang) * np.where(phi == 0, 0.3, 1.0),
                        p.cy + (b_in - 6) * np.sin(ang) * np.where(phi == 0, 0.9, 1.0),
                        zk - 45 * np.sin(phi / 2)], axis=1)
        pts[0, 1] = spine_y + 4
        for sl, m in cv.tube(pts, np.full(len(pts), 4.5)):
            cv.paint(sl, m, hu=500.0, label=ids[prefix + str(level)])
