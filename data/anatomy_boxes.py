"""Per-volume anatomy bounding boxes: the record that lets a training read skip whole-mask passes.

``preprocess`` writes, next to each cache mask ``.../{stem}.nii``, a sidecar
``.../{stem}.boxes.json``: ``{"shape_dhw": [D, H, W], "boxes": {"k": [d0, h0,
w0, d1, h1, w1]}}`` with, for every anatomy id k present, the inclusive index
range of its voxels per axis. It removes the old record before rewriting a case
and writes the new one last (atomically), so a record always describes the mask
beside it; a missing one only costs speed (the dataset computes the boxes from
the mask). With it, the training dataset decides spec §3's
"present in the crop" from the box (reading crop voxels only when the box
straddles the crop edge), instead of a pass over the whole crop.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.io import write_json

Box = tuple[int, int, int, int, int, int]  # (d0, h0, w0, d1, h1, w1), inclusive ends


def boxes_path(mask_path: str | Path) -> Path:
    """``.../x.nii`` -> ``.../x.boxes.json``."""
    mask_path = Path(mask_path)
    return mask_path.with_name(mask_path.name[: -len(".nii")] + ".boxes.json")


def present_labels(mask: np.ndarray) -> np.ndarray:
    """Sorted non-zero ids present in a uint8 mask (one pass, no sort)."""
    seen = np.zeros(256, dtype=bool)
    seen[np.asarray(mask, dtype=np.uint8).reshape(-1)] = True
    return np.flatnonzero(seen[1:]) + 1


def bounding_box(hit: np.ndarray) -> Box | None:
    """Inclusive (D, H, W) index box of the true voxels of ``hit``; None when there is none."""
    along_d = np.flatnonzero(hit.any(axis=(1, 2)))
    if along_d.size == 0:
        return None
    plane = hit[along_d[0]: along_d[-1] + 1].any(axis=0)  # (H, W) over the slices that hold a voxel
    along_h, along_w = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (int(along_d[0]), int(along_h[0]), int(along_w[0]),
            int(along_d[-1]), int(along_h[-1]), int(along_w[-1]))


def anatomy_boxes(mask_dhw: np.ndarray) -> dict[int, Box]:
    """Inclusive (D, H, W) index box of each non-zero id of a uint8 mask."""
    mask_dhw = np.asarray(mask_dhw, dtype=np.uint8)
    return {int(k): bounding_box(mask_dhw == k) for k in present_labels(mask_dhw)}


def write_boxes(mask_dhw: np.ndarray, mask_path: str | Path) -> None:
    """Write the sidecar of the mask that will be written to ``mask_path`` (atomically, ``data.io.write_json``)."""
    path = boxes_path(mask_path)
    record = {"shape_dhw": [int(n) for n in mask_dhw.shape],
              "boxes": {str(k): list(box) for k, box in anatomy_boxes(mask_dhw).items()}}
    write_json(path, record)


def read_boxes(mask_path: str | Path, shape_dhw: tuple[int, ...]) -> dict[int, Box] | None:
    """The mask's boxes, or ``None`` when it has no sidecar (caches written before it existed).

    A sidecar that cannot be parsed, or whose shape differs from the mask's (the mask
    was rewritten by other means), is a ``ValueError`` naming it.
    """
    path = boxes_path(mask_path)
    try:
        record = json.loads(path.read_text())
        shape, boxes = tuple(record["shape_dhw"]), {int(k): tuple(box) for k, box in record["boxes"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable anatomy box record {path}: {exc!r}; delete it or re-run preprocess") from exc
    if shape != tuple(shape_dhw):
        raise ValueError(f"{path} is for a {shape} mask but {mask_path} is {tuple(shape_dhw)}: "
                         "delete it or re-run preprocess --overwrite")
    return boxes
