"""Reconstructions of a phantom: the voxel grid, kernel, noise and stored integers of each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data.synthetic.phantom import Grid, Phantom, Stream, render, rngs, scan_phantom, uniform

HU_MIN, HU_MAX = -1024, 3071
# (RescaleSlope, RescaleIntercept) choices and weights: mostly CT-RATE's usual (1, -1024).
RESCALES: tuple[tuple[int, int], ...] = ((1, -1024), (1, -8192), (1, 0), (2, -1024))
RESCALE_WEIGHTS = (0.7, 0.1, 0.1, 0.1)


@dataclass(frozen=True)
class Acquisition:
    """Acquisition values of one reconstruction beyond its grid."""

    recon_diameter: float  # mm
    kernel: str
    noise: float  # HU standard deviation
    slope: int  # RescaleSlope: HU = stored * slope + intercept
    intercept: int  # RescaleIntercept


def recon_grid(p: Phantom, rng: np.random.Generator, recon: int, realistic: bool) -> tuple[Grid, Acquisition]:
    """Grid and acquisition of reconstruction `recon` (1-based) of a scan."""
    fov = p.fov + (0.0 if recon == 1 else uniform(rng, -15, 10))
    if realistic:
        n = 512
        sz = 1.5 if recon == 1 else float(rng.choice([1.25, 2.0]))
    else:
        n = int(rng.choice([120, 128]))
        sz = float(rng.choice([5.0, 5.5, 6.0, 6.5, 7.0])) if recon == 1 else float(rng.choice([5.0, 6.0, 7.0]))
    sxy = round(fov / n, 6)
    extent = p.z_top - p.z_bottom
    d = int(np.ceil(extent / sz)) + 1
    # Small: at most 64 slices; realistic: a ~360 mm scan range, like CT-RATE's ~240 slices at 1.5 mm.
    d = max(d, int(360 / sz)) if realistic else min(d, 64)
    z0 = p.z_top - (d - 1) * sz + uniform(rng, -0.5, 0.5) * sz
    ox = p.cx - fov / 2 + sxy / 2 + uniform(rng, -8, 8)
    oy = p.cy - fov / 2 + sxy / 2 + uniform(rng, -12, 8)
    grid = Grid((d, n, n), (sxy, sxy, sz), (round(ox, 4), round(oy, 4), round(z0, 4)))
    slope, intercept = RESCALES[int(rng.choice(len(RESCALES), p=RESCALE_WEIGHTS))]
    acquisition = Acquisition(recon_diameter=round(fov, 2), kernel=("B30f", "B70f")[recon - 1],
                              noise=12.0 if recon == 1 else 28.0, slope=slope, intercept=intercept)
    return grid, acquisition


def truth_volume(seed: int, entry: dict[str, Any], realistic: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Grid, Acquisition]:
    """(truth HU int16, stored raw int16, labels uint8, grid, acquisition) of one manifest volume
    (`entry`: split_id, patient_no, scan_idx, recon, abnormalities)."""
    key = (entry["split_id"], entry["patient_no"], entry["scan_idx"])
    p = scan_phantom(seed, *key, entry["abnormalities"])
    grid, acq = recon_grid(p, rngs(seed, Stream.RECON, *key, entry["recon"]), entry["recon"], realistic)
    hu, lab = render(p, grid)
    # Noise: a block of slices drawn once, reused along z with shifts (drawing 60M normals costs ~1.5 s).
    rng = rngs(seed, Stream.NOISE, *key, entry["recon"])
    block = rng.standard_normal((min(len(hu), 16), *hu.shape[1:]), dtype=np.float32) * np.float32(acq.noise)
    for k in range(len(hu)):
        hu[k] += np.roll(block[k % len(block)], 37 * (k // len(block)), axis=1)
    # Truth HU must be exactly stored * slope + intercept with integer stored values.
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu -= acq.intercept
    hu /= acq.slope
    stored = np.rint(hu, out=hu).astype(np.int16)
    truth = stored * np.int16(acq.slope) + np.int16(acq.intercept)
    return truth, stored, lab, grid, acq
