"""Training dataset over the processed cache (spec §3).

One item per scan (``train_1_a``); each access picks one of the scan's
reconstructions at random, takes a random crop of ``crop_size`` (the same for
image and mask) straight from the memory-mapped volumes, flips each of the three
axes with probability ``flip_prob`` and scales the image with ``hu_window``.

Array layout: every volume and crop is ``(D, H, W)`` = ``(z, y, x)``; the image
tensor is ``(1, D, H, W)`` float32 in [0, 1], the mask ``(D, H, W)`` uint8 anatomy
ids (0 = background, k = ``anatomy_names[k - 1]``).

Randomness: item ``index`` of epoch ``epoch`` draws from
``numpy.random.default_rng([seed, epoch, index])``, so a resumed run (or one
with another number of DataLoader workers) sees exactly the same crops. Call
``set_epoch`` before iterating each epoch (like ``DistributedSampler``).

An unreadable or inconsistent volume raises ``SampleReadError`` naming the
file; the release's silent substitution of another sample is not copied.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data.io import image_to_mask_path, list_volumes, open_volume, scale_hu
from data.texts import compose_anatomy_text, is_abnormal, text_for_encoding, text_hash

logger = logging.getLogger(__name__)


class SampleReadError(RuntimeError):
    """A training volume or its mask cannot be read or does not fit the crop."""


def scan_id_of(path: str | Path) -> str:
    """``.../train_1_a_2.nii`` -> ``train_1_a``."""
    name = Path(path).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    return stem.rsplit("_", 1)[0]


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (anatomy-wise report texts, spec §1; set --data-root)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def usable_anatomies(mask: np.ndarray, n_anatomies: int) -> np.ndarray:
    """(A,) bool: anatomy present in ``mask`` (D,H,W) and touching none of its 6 faces."""
    present = np.bincount(mask.ravel(), minlength=n_anatomies + 1)[1 : n_anatomies + 1] > 0
    faces = np.concatenate([
        mask[0].ravel(), mask[-1].ravel(), mask[:, 0].ravel(),
        mask[:, -1].ravel(), mask[:, :, 0].ravel(), mask[:, :, -1].ravel(),
    ])
    on_face = np.bincount(faces, minlength=n_anatomies + 1)[1 : n_anatomies + 1] > 0
    return present & ~on_face


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
            raise FileNotFoundError(
                f"no processed volumes under {self.data_root / f'processed_{split}_images'} "
                "(run the data pipeline or set --data-root)")
        groups: dict[str, list[Path]] = defaultdict(list)
        for p in volumes:
            groups[scan_id_of(p)].append(Path(p))
        self.scan_ids = sorted(groups)
        self.reconstructions = [sorted(groups[s]) for s in self.scan_ids]

        desc_info = _load_json(self.data_root / "desc_info.json")
        conc_info = _load_json(self.data_root / "conc_info.json")
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

    def _read_crop(self, image_path: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mask_path = Path(image_to_mask_path(image_path))
        try:
            image = open_volume(image_path)
        except Exception as e:
            raise SampleReadError(f"cannot read training image {image_path}: {e}") from e
        try:
            mask = open_volume(mask_path)
        except Exception as e:
            raise SampleReadError(f"cannot read training mask {mask_path}: {e}") from e
        if image.shape != mask.shape:
            raise SampleReadError(f"{image_path} has shape {image.shape} but its mask {mask_path} has {mask.shape}")
        if any(s < c for s, c in zip(image.shape, self.crop_size)):
            raise SampleReadError(
                f"{image_path} has shape {image.shape} (D,H,W), smaller than the crop {self.crop_size}; "
                "the preprocess step pads to the crop size (check the pipeline config)")
        starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(image.shape, self.crop_size)]
        sl = tuple(slice(st, st + c) for st, c in zip(starts, self.crop_size))
        try:
            return np.array(image[sl]), np.array(mask[sl], dtype=np.uint8)
        except Exception as e:
            raise SampleReadError(f"cannot read a crop of {image_path} or {mask_path}: {e}") from e

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        recs = self.reconstructions[index]
        image_path = recs[int(rng.integers(len(recs)))]
        image, mask = self._read_crop(image_path, rng)
        for axis in range(3):
            if rng.random() < self.flip_prob:
                image, mask = np.flip(image, axis), np.flip(mask, axis)
        image = scale_hu(np.ascontiguousarray(image), self.hu_window)
        mask = np.ascontiguousarray(mask)
        return {
            "image": torch.from_numpy(np.asarray(image, dtype=np.float32))[None],
            "mask": torch.from_numpy(mask),
            "texts": list(self.texts_to_encode[index]),
            "text_hash": torch.from_numpy(self.text_hashes[index].copy()),
            "abnormal": torch.from_numpy(self.abnormal[index].copy()),
            "usable": torch.from_numpy(usable_anatomies(mask, len(self.anatomy_names))),
            "scan_id": self.scan_ids[index],
            "path": str(image_path),
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep texts as a list (B) of lists (A) of strings."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "texts": [b["texts"] for b in batch],
        "text_hash": torch.stack([b["text_hash"] for b in batch]),
        "abnormal": torch.stack([b["abnormal"] for b in batch]),
        "usable": torch.stack([b["usable"] for b in batch]),
        "scan_id": [b["scan_id"] for b in batch],
        "path": [b["path"] for b in batch],
    }
