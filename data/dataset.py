"""Training dataset over the processed cache (spec §3).

One item per scan (``train_1_a``); each access picks one of the scan's
reconstructions at random, takes a random crop of ``crop_size`` (the same for
image and mask) straight from the memory-mapped volumes and draws a flip with
probability ``flip_prob`` for each of the three axes.

The item carries the crop as stored (int16 HU, uint8 ids) and the flips as
flags; ``model_inputs`` applies the flips and the ``hu_window`` scaling to a
whole batch on the training device. The CPU side is then two memory copies,
and the DataLoader moves half the bytes of a float32 image.

Array layout: every volume and crop is ``(D, H, W)`` = ``(z, y, x)``; the item's
``hu`` is ``(1, D, H, W)`` int16, ``mask`` ``(D, H, W)`` uint8 anatomy ids
(0 = background, k = ``anatomy_names[k - 1]``), ``flip`` ``(3,)`` bool (D, H, W);
``model_inputs`` returns the image ``(B, 1, D, H, W)`` float32 in [0, 1].

``usable`` (spec §3) comes from the crop's 6 faces and the per-volume anatomy
boxes written by preprocess (``data.anatomy_boxes``), not from a pass over the
crop; a cache without them still works (boxes computed from the whole mask,
once per process, with a warning).

Randomness: item ``index`` of epoch ``epoch`` draws from
``numpy.random.default_rng([seed, epoch, index])``, so a resumed run (or one
with another number of DataLoader workers) sees exactly the same crops. Call
``set_epoch`` before iterating each epoch (like ``DistributedSampler``).

An unreadable or inconsistent volume raises ``SampleReadError`` naming the
file; the release's silent substitution of another sample is not copied.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from data.anatomy_boxes import Box, anatomy_boxes, read_boxes
from data.common import scan_id_of
from data.io import image_to_mask_path, list_volumes, open_volume
from data.texts import compose_anatomy_text, load_report_json, is_abnormal, text_for_encoding, text_hash
from utils.cli import MissingInputError

logger = logging.getLogger(__name__)


class SampleReadError(RuntimeError):
    """A training volume or its mask cannot be read or does not fit the crop."""


def usable_anatomies(mask: np.ndarray, n_anatomies: int, boxes: dict[int, Box]) -> np.ndarray:
    """(A,) bool: anatomy present in ``mask`` (the crop, (D,H,W)) and touching none of its 6 faces.

    ``boxes``: id -> inclusive box of all the anatomy's voxels in the volume, in the
    crop's coordinates (it may reach beyond the crop). Only the crop's voxels inside
    an anatomy's box can hold it: a face is read only where the box crosses it, and a
    box inside the crop proves presence; a box that straddles the crop's edge with no
    voxel on a face (a split or curved shape) is decided by the crop's voxels in it.
    """
    usable = np.zeros(n_anatomies, dtype=bool)
    for k, box in boxes.items():
        if k > n_anatomies:
            continue
        lo = [max(b, 0) for b in box[:3]]
        hi = [min(b, n - 1) for b, n in zip(box[3:], mask.shape)]
        if any(a > b for a, b in zip(lo, hi)):
            continue  # the box misses the crop
        inside = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        faces = (inside[:axis] + (plane,) + inside[axis + 1:]  # the part of a face the box crosses
                 for axis, n in enumerate(mask.shape) for plane in {0, n - 1} if lo[axis] <= plane <= hi[axis])
        if any((mask[face] == k).any() for face in faces):
            continue
        if all(b >= 0 for b in box[:3]) and all(b < n for b, n in zip(box[3:], mask.shape)):
            usable[k - 1] = True
        else:
            usable[k - 1] = bool((mask[inside] == k).any())
    return usable


@functools.cache
def _boxes_from_mask(mask_path: Path) -> dict[int, Box]:
    """Fallback for caches without box records: one pass over the whole mask, kept for this process."""
    return anatomy_boxes(open_volume(mask_path))


def model_inputs(hu: torch.Tensor, mask: torch.Tensor, flip: torch.Tensor, hu_window: Sequence[float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch from ``collate`` -> (image (B,1,D,H,W) float32 in [0, 1], mask (B,D,H,W)), on ``hu``'s device.

    ``hu`` is an integer tensor (the cache's int16 HU). Flips each sample's axes where ``flip``
    (B,3) is set, then clips ``hu_window`` and scales linearly (lo -> 0, hi -> 1): the same
    float32 values as ``data.io.scale_hu`` (a test pins it on CPU; a GPU may round the
    division by the width differently in the last bit).
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if hi <= lo:
        raise ValueError(f"hu_window must be increasing, got {hu_window}")
    flips = [[axis for axis in range(3) if row[axis]] for row in flip.tolist()]
    if any(flips):
        hu = torch.stack([h.flip([a + 1 for a in axes]) for h, axes in zip(hu, flips)])
        mask = torch.stack([m.flip(axes) for m, axes in zip(mask, flips)])
    # integer HU clip to [ceil(lo), floor(hi)], as in scale_hu; in float32 the same steps are exact
    # (and ~3x faster on a CPU than clamping int16)
    image = hu.to(torch.float32).clamp_(math.ceil(lo), math.floor(hi))
    return image.sub_(float(np.float32(lo))).div_(float(np.float32(hi - lo))), mask


def log_text_gaps(scan_ids: Sequence[str], anatomy_names: Sequence[str],
                  reports: dict[str, dict[str, Any]]) -> None:
    """Warn once per report file about scans it lacks and about empty entries, counted per anatomy.

    Both are read as "no text" (a missing conclusion gives the normal template). The release differs on
    empty conclusions (it makes them "." and the anatomy abnormal), so their counts are worth seeing.
    """
    for file_name, info in reports.items():
        absent = [s for s in scan_ids if s not in info]
        if absent:
            logger.warning("%s lacks %d of %d scans (read as no text), e.g. %s", file_name, len(absent),
                           len(scan_ids), ", ".join(absent[:3]))
        empty = {a: 0 for a in anatomy_names}
        for s in scan_ids:
            entries = info.get(s) or {}
            for a in anatomy_names:
                if a in entries and not str(entries[a] or "").strip():
                    empty[a] += 1
        if any(empty.values()):
            logger.warning("%s has empty or blank entries (read as no text; the release would call an empty "
                           "conclusion abnormal): %s", file_name,
                           ", ".join(f"{a} {n}" for a, n in empty.items() if n))


class CTRateTrainDataset(Dataset):
    """Spec §3 training samples; see the module docstring."""

    def __init__(
        self,
        data_root: str | Path,
        *,
        anatomy_names: Sequence[str],
        crop_size: Sequence[int] = (112, 256, 352),
        hu_window: Sequence[float] = (-1150, 350),
        flip_prob: float = 0.2,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        self.data_root = Path(data_root)
        self.anatomy_names = list(anatomy_names)
        self.crop_size = tuple(int(c) for c in crop_size)
        self.hu_window = tuple(hu_window)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0

        volumes = list_volumes(self.data_root, split)
        if not volumes:
            raise MissingInputError(
                f"no processed volumes under {self.data_root / f'processed_{split}_images'} "
                "(run the data pipeline or set --data-root)")
        groups: dict[str, list[Path]] = defaultdict(list)
        for p in volumes:
            groups[scan_id_of(p)].append(Path(p))
        self.scan_ids = sorted(groups)
        self.reconstructions = [sorted(groups[s]) for s in self.scan_ids]

        desc_info = load_report_json(self.data_root / "desc_info.json")
        conc_info = load_report_json(self.data_root / "conc_info.json")
        self.texts = [[compose_anatomy_text(s, a, desc_info, conc_info) for a in self.anatomy_names]
                      for s in self.scan_ids]
        self.texts_to_encode = [[text_for_encoding(t, a) for t, a in zip(ts, self.anatomy_names)]
                                for ts in self.texts]
        self.text_hashes = np.array([[text_hash(t) for t in ts] for ts in self.texts],
                                    dtype=np.int64).reshape(len(self.scan_ids), -1)
        self.abnormal = np.array([[is_abnormal(t, a) for t, a in zip(ts, self.anatomy_names)]
                                  for ts in self.texts], dtype=bool).reshape(len(self.scan_ids), -1)
        log_text_gaps(self.scan_ids, self.anatomy_names, {"desc_info.json": desc_info, "conc_info.json": conc_info})
        logger.info("%s: %d scans, %d reconstructions", split, len(self.scan_ids), len(volumes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scan_ids)

    def _read_crop(self, image_path: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(int16 HU crop, uint8 mask crop, (A,) usable) of a random ``crop_size`` window."""
        mask_path = Path(image_to_mask_path(image_path))
        try:
            image = open_volume(image_path)
        except Exception as e:
            raise SampleReadError(f"cannot read training image {image_path}: {e}") from e
        try:
            mask = open_volume(mask_path)
            boxes = read_boxes(mask_path, mask.shape)
        except Exception as e:
            raise SampleReadError(f"cannot read training mask {mask_path}: {e}") from e
        if image.shape != mask.shape:
            raise SampleReadError(f"{image_path} has shape {image.shape} but its mask {mask_path} has {mask.shape}")
        if image.dtype != np.int16 or mask.dtype != np.uint8:
            raise SampleReadError(f"{image_path} / its mask hold {image.dtype} / {mask.dtype}, the cache is int16 HU / "
                                  "uint8 ids: re-run the preprocess step")
        if any(s < c for s, c in zip(image.shape, self.crop_size)):
            raise SampleReadError(
                f"{image_path} has shape {image.shape} (D,H,W), smaller than the crop {self.crop_size}; "
                "the preprocess step pads to the crop size (check the pipeline config)")
        if boxes is None:
            warnings.warn(f"the masks under {mask_path.parents[2]} have no anatomy box records (*.boxes.json): each "
                          "worker computes them from the whole mask on first use (slower); re-running the "
                          "preprocess step redoes the cases that lack them", RuntimeWarning, stacklevel=2)
            boxes = _boxes_from_mask(mask_path)
        starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(image.shape, self.crop_size)]
        sl = tuple(slice(st, st + c) for st, c in zip(starts, self.crop_size))
        try:
            hu, mask_crop = np.array(image[sl]), np.array(mask[sl])
        except Exception as e:
            raise SampleReadError(f"cannot read a crop of {image_path} or {mask_path}: {e}") from e
        boxes_in_crop = {k: tuple(b - starts[i % 3] for i, b in enumerate(box)) for k, box in boxes.items()}
        return hu, mask_crop, usable_anatomies(mask_crop, len(self.anatomy_names), boxes_in_crop)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        recs = self.reconstructions[index]
        image_path = recs[int(rng.integers(len(recs)))]
        hu, mask, usable = self._read_crop(image_path, rng)
        flip = [rng.random() < self.flip_prob for _ in range(3)]  # flips keep the crop's faces: usable holds
        return {
            "hu": torch.from_numpy(hu)[None],
            "mask": torch.from_numpy(mask),
            "flip": torch.tensor(flip),
            "texts": list(self.texts_to_encode[index]),
            "text_hash": torch.from_numpy(self.text_hashes[index].copy()),
            "abnormal": torch.from_numpy(self.abnormal[index].copy()),
            "usable": torch.from_numpy(usable),
            "scan_id": self.scan_ids[index],
            "path": str(image_path),
        }


def _stack_crops(crops: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` for the big crops, into memory that is cheap to fill.

    In a DataLoader worker the batch goes straight into shared memory (as ``default_collate``
    does), so it crosses to the main process without another copy; elsewhere numpy allocates
    it (it asks for huge pages: ~4x faster to fill here than ``torch.stack``'s 4 KiB pages).
    """
    first = crops[0]
    if get_worker_info() is None:
        return torch.from_numpy(np.stack([c.numpy() for c in crops]))
    storage = first._typed_storage()._new_shared(len(crops) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(crops), *first.shape)
    np.stack([c.numpy() for c in crops], out=out.numpy())
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep texts as a list (B) of lists (A) of strings. ``model_inputs`` takes it from there."""
    out = {k: _stack_crops([b[k] for b in batch]) for k in ("hu", "mask")}
    out |= {k: default_collate([b[k] for b in batch]) for k in ("flip", "text_hash", "abnormal", "usable")}
    return out | {k: [b[k] for b in batch] for k in ("texts", "scan_id", "path")}
