"""Zero-shot scoring (spec §7), shared by eval.py and predict.py: items, model, windows, CSV.

- ``load_items(path)``: ``configs/zeroshot_items.yaml`` (``roi_dhw`` + ``items`` of
  ``[anatomy, abnormality, negative prompt, positive prompt]``), the single source of the
  test items, their prompts and the window size.
- ``load_eval_model(preset, checkpoint, device)``: ``models.builder.build_model`` with the
  weights of one of our checkpoints or of the released fVLM layout (spec §6); eval mode.
- ``ZeroShotScorer``: probabilities of one volume, by the window protocol below.
- ``write_prediction_csv``: the atomic prediction CSV in the release's format (failures: ``data.io.write_case_csv``).

Array layout: a processed volume is ``(D, H, W) = (z, y, x)``; ``image`` is HU-windowed and
scaled to [0, 1] (0 = -1150 HU or below) -- or raw HU with a ``transform`` that scales each
window -- and ``mask`` holds merged anatomy ids (0 = background, anatomy ``k`` of the anatomy
list = id ``k + 1``).

Window protocol, per test anatomy present in the mask (one encoder pass each):

1. bounding box of the anatomy, ``lo = min`` and ``hi = max`` of the voxel indices where
   the mask equals its id (``hi`` inclusive, as ``np.nonzero`` gives it);
2. per axis: ``size = max(roi, hi - lo)``; ``centre = (lo + hi) // 2``;
   ``start = max(0, centre - size // 2)``; ``end = min(dim, start + size)``; when the
   window came out short, ``start = max(0, end - size)``. (``hi - lo`` is the release's
   formula: one less than the anatomy's extent; a roi larger than the volume gives the
   whole axis);
3. crop the image and the BINARY mask of that anatomy only (other anatomies in the window
   are background), pad both at the end to a multiple of the patch size (image with 0,
   mask with 0);
4. encode the window (position embeddings resampled to its grid), pool the anatomy's
   tokens from the four levels with its query, project, L2-normalise;
5. per item of that anatomy: ``prob = softmax([v.t_neg, v.t_pos] / temp)[1]``.

Text features per prompt: tokenised to the model's max length (padded to it, as the
release does), [CLS] of the last layer -> text_proj -> L2-normalise.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.io import (VolumeReadError, file_fingerprint, image_to_mask_path, list_volumes, open_volume, read_json,
                     write_csv)
from models.builder import build_model
from models.fvlm import FVLM
from models.text_encoder import TextEncoderError
from utils.checkpoint import CheckpointError, ModelMismatchError, latest_checkpoint
from utils.cli import CHECKPOINT_FLAG_KEYS, UsageError
from utils.config import read_yaml, resolve_path
from utils.preset import Preset, given_flags, load_preset

logger = logging.getLogger(__name__)

FILE_COLUMN = "file_name"


class ZeroShotSetupError(UsageError, RuntimeError):
    """Items config, checkpoint or model setup is unusable (message names what to fix)."""


@dataclass(frozen=True)
class ZeroShotItem:
    """One test item: abnormality scored on ``anatomy`` with a negative/positive prompt pair."""

    anatomy: str
    abnormality: str
    negative: str
    positive: str

    @property
    def column(self) -> str:
        """Column name of the release's CSV: ``{anatomy}_{abnormality}_{negative}_{positive}``."""
        return f"{self.anatomy}_{self.abnormality}_{self.negative}_{self.positive}"


def load_items(path: str | Path, anatomy_names: Sequence[str] | None = None
               ) -> tuple[tuple[int, int, int], list[ZeroShotItem]]:
    """(roi_dhw, items) from a zero-shot items YAML; with ``anatomy_names`` (the pipeline's), an item naming
    another anatomy is a ``ZeroShotSetupError``."""
    cfg = read_yaml(path, flag="--items")
    path = resolve_path(path)
    roi = cfg.get("roi_dhw")
    if not (isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi)):
        raise ZeroShotSetupError(f"{path}: roi_dhw must be 3 positive integers, got {roi!r}")
    raw = cfg.get("items")
    if not isinstance(raw, list) or not raw:
        raise ZeroShotSetupError(f"{path}: items must be a non-empty list")
    items = []
    for i, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) and x for x in entry)):
            raise ZeroShotSetupError(f"{path}: item {i} must be [anatomy, abnormality, negative, positive], got {entry!r}")
        if "_" in entry[0] or "_" in entry[1]:
            raise ZeroShotSetupError(f"{path}: item {i}: anatomy and abnormality must not contain '_' "
                                     "(the CSV column name is split on it)")
        items.append(ZeroShotItem(*entry))
    columns = [item.column for item in items]
    if len(set(columns)) != len(columns):
        raise ZeroShotSetupError(f"{path}: duplicate items")
    unknown = [] if anatomy_names is None else sorted({i.anatomy for i in items} - set(anatomy_names))
    if unknown:
        raise ZeroShotSetupError(f"{path}: item anatomy {', '.join(unknown)} is not one of the pipeline's anatomies "
                                 f"({', '.join(anatomy_names)}): fix --items, or set the preset whose pipeline has it")
    return (roi[0], roi[1], roi[2]), items


def load_eval_model(preset: Preset, checkpoint: str | Path, device: torch.device) -> tuple[FVLM, Any]:
    """(model in eval mode on ``device``, tokenizer): ``models.builder.build_model`` of ``preset``
    with the weights of ``checkpoint`` (ours or the release layout, loaded with ``weights_only``
    and strictly), the text encoder's config and vocabulary from ``preset.paths.text_encoder``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ZeroShotSetupError(f"checkpoint not found: {checkpoint} (set --checkpoint)")
    try:
        model, tokenizer = build_model(preset.model, img_size=preset.data.crop_size,
                                       n_anatomies=preset.pipeline.n_anatomies,
                                       text_encoder_dir=resolve_path(preset.paths.text_encoder), checkpoint=checkpoint)
    except TextEncoderError as e:
        raise ZeroShotSetupError(f"{e} (set --text-encoder)") from e
    except ModelMismatchError as e:  # names the flag already
        raise ZeroShotSetupError(str(e)) from e
    except CheckpointError as e:
        raise ZeroShotSetupError(f"{e} (set --checkpoint, or the --config it was trained with)") from e
    return model.eval().to(device), tokenizer


def anatomy_window(
    bbox_min: Sequence[int], bbox_max: Sequence[int], dims: Sequence[int], roi: Sequence[int]
) -> tuple[slice, slice, slice]:
    """Window ``(z, y, x)`` slices around a bounding box (inclusive max), per the module docstring."""
    window = []
    for lo, hi, dim, r in zip(bbox_min, bbox_max, dims, roi, strict=True):
        lo, hi, dim, r = int(lo), int(hi), int(dim), int(r)
        size = max(r, hi - lo)
        centre = (lo + hi) // 2
        start = max(0, centre - size // 2)
        end = min(dim, start + size)
        if end - start < size:
            start = max(0, end - size)
        window.append(slice(start, end))
    return window[0], window[1], window[2]


def pad_to_multiple(array: np.ndarray, multiple: Sequence[int], value: float = 0) -> np.ndarray:
    """Pad ``(D, H, W)`` at the end of each axis up to a multiple of ``multiple``."""
    pad = [(0, -s % m) for s, m in zip(array.shape, multiple, strict=True)]
    if not any(p for _, p in pad):
        return array
    return np.pad(array, pad, mode="constant", constant_values=value)


def crop_anatomy_window(
    image: np.ndarray,
    mask: np.ndarray,
    anatomy_id: int,
    roi: Sequence[int],
    patch: Sequence[int],
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Window of ``anatomy_id``: (image crop, binary uint8 mask crop), both padded to the patch grid.

    ``transform`` (e.g. HU windowing) is applied to the image crop before padding with 0.
    Returns None when the anatomy is absent from ``mask``.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    target = mask == anatomy_id
    coords = np.nonzero(target)
    if coords[0].size == 0:
        return None
    lo = [int(c.min()) for c in coords]
    hi = [int(c.max()) for c in coords]
    window = anatomy_window(lo, hi, mask.shape, roi)
    crop_image = image[window] if transform is None else transform(image[window])
    crop_image = pad_to_multiple(np.asarray(crop_image, dtype=np.float32), patch, 0.0)
    crop_mask = pad_to_multiple(target[window].astype(np.uint8), patch, 0)
    return crop_image, crop_mask


@torch.no_grad()
def prompt_features(
    model: nn.Module, tokenizer, items: Sequence[ZeroShotItem], max_length: int, device: torch.device
) -> torch.Tensor:
    """(K, 2, E) normalised text features, ``[:, 0]`` negative and ``[:, 1]`` positive prompt."""
    texts = [t for item in items for t in (item.negative, item.positive)]
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    feats = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))  # [2K, E]
    return feats.reshape(len(items), 2, -1)


class ZeroShotScorer:
    """Scores volumes for a fixed item list: ``scorer(image, mask) -> {column: prob}``.

    Args:
        model: FVLM in eval mode (``encode_anatomy_window``, ``encode_text``, ``temp``).
        items: test items; every ``item.anatomy`` must be in ``anatomy_names``.
        anatomy_names: the pipeline's anatomy list; id of ``anatomy_names[k]`` is ``k + 1``.
        text_feats: (K, 2, E) from :func:`prompt_features`, aligned with ``items``.
        roi: window size ``(D, H, W)`` in voxels.
        device: where the model lives.
        transform: applied to each image window before padding (e.g. HU -> [0, 1]); None when the
            volumes passed in are already scaled.
    """

    def __init__(
        self,
        model: nn.Module,
        items: Sequence[ZeroShotItem],
        anatomy_names: Sequence[str],
        text_feats: torch.Tensor,
        roi: Sequence[int],
        device: torch.device,
        *,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        unknown = sorted({i.anatomy for i in items} - set(anatomy_names))
        if unknown:
            raise ValueError(f"item anatomy {unknown} not in the pipeline's anatomies {list(anatomy_names)}")
        if text_feats.shape[:2] != (len(items), 2):
            raise ValueError(f"text_feats {tuple(text_feats.shape)} do not match {len(items)} items")
        self.model = model
        self.items = list(items)
        self.anatomy_names = list(anatomy_names)
        self.text_feats = text_feats.to(device)
        self.roi = tuple(int(r) for r in roi)
        self.device = device
        self.patch = tuple(model.visual_encoder.patch_size)
        self.transform = transform

    @torch.no_grad()
    def anatomy_feature(self, image: np.ndarray, mask: np.ndarray, anatomy: str) -> torch.Tensor | None:
        """(E,) normalised image feature of ``anatomy`` from its own window; None when absent."""
        idx = self.anatomy_names.index(anatomy)
        crop = crop_anatomy_window(image, mask, idx + 1, self.roi, self.patch, transform=self.transform)
        if crop is None:
            return None
        crop_image, crop_mask = crop
        x = torch.from_numpy(crop_image)[None, None].to(self.device)  # [1, 1, D, H, W]
        m = torch.from_numpy(crop_mask)[None].to(self.device)  # [1, D, H, W] binary
        return self.model.encode_anatomy_window(x, m, idx)[0]  # [E]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray, name: str = "the volume") -> dict[str, float]:
        """Probabilities of the items whose anatomy is present (absent anatomies are left out);
        ``ZeroShotSetupError`` naming ``name`` when the model gives NaN or inf (a diverged checkpoint)."""
        temp = float(self.model.temp)
        probs: dict[str, float] = {}
        for anatomy in dict.fromkeys(i.anatomy for i in self.items):
            feat = self.anatomy_feature(image, mask, anatomy)
            if feat is None:
                continue
            rows = [k for k, item in enumerate(self.items) if item.anatomy == anatomy]
            logits = torch.einsum("kpe,e->kp", self.text_feats[rows], feat.to(self.text_feats.dtype)) / temp
            pos = F.softmax(logits.float(), dim=-1)[:, 1].cpu().tolist()
            probs.update({self.items[k].column: p for k, p in zip(rows, pos)})
        non_finite = [column for column, p in probs.items() if not np.isfinite(p)]
        if non_finite:
            raise ZeroShotSetupError(f"{name}: the model gives NaN or inf for {len(non_finite)} item(s), e.g. "
                                     f"{non_finite[0]!r} (finite weights, diverged outputs): use an earlier checkpoint")
        return probs


def write_prediction_csv(path: str | Path, rows: Mapping[str, Mapping[str, float]],
                         items: Sequence[ZeroShotItem]) -> None:
    """``file_name`` + one column per item, rows sorted by file name; empty cell = anatomy absent."""
    columns = [item.column for item in items]
    write_csv(path, [FILE_COLUMN, *columns],
           ([name, *(repr(rows[name][c]) if c in rows[name] else "" for c in columns)]
              for name in sorted(rows)))



# ---------------------------------------------------------------------------- scoring a checkpoint on a split
@dataclass
class EvalInputs:
    """What ``utils.cli.checkpoint_args_parser``'s flags resolve to; relative paths as ``utils.config.resolve_path``."""

    preset: Preset
    roi: tuple[int, int, int]
    items: list[ZeroShotItem]
    data_root: Path
    checkpoint: Path
    volumes: list[Path]  # processed images of the split, sorted


def resolve_eval_inputs(args: argparse.Namespace) -> EvalInputs:
    """Preset, items, checkpoint and the split's processed volumes; ``ZeroShotSetupError`` names the flag to fix."""
    preset = load_preset(args.config, args.overrides, flags=given_flags(args, CHECKPOINT_FLAG_KEYS))
    roi, items = load_items(resolve_path(preset.zeroshot_items), preset.pipeline.anatomy_names)
    data_root = resolve_path(preset.paths.data_root)
    checkpoint = resolve_path(args.checkpoint) if args.checkpoint is not None else None
    if checkpoint is None:
        out_dir = resolve_path(preset.paths.output_dir)
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise ZeroShotSetupError(f"no checkpoint_*.pth in {out_dir}: set --checkpoint or --output-dir")
    volumes = list_volumes(data_root, args.split)
    if not volumes:
        raise ZeroShotSetupError(
            f"no processed volumes in {data_root / f'processed_{args.split}_images'}: set --data-root / --split")
    return EvalInputs(preset, roi, items, data_root, checkpoint, volumes)


def read_case(image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, mask ids) of a processed volume, both (D, H, W) memory-mapped; VolumeReadError when unusable."""
    image = open_volume(image_path)
    mask = open_volume(image_to_mask_path(image_path))
    if image.shape != mask.shape:
        raise VolumeReadError(f"image {image.shape} and mask {mask.shape} differ in shape")
    return image, mask


def volume_name(image_path: Path) -> str:
    """Processed ``.../valid_1_a_1.nii`` -> the VolumeName ``valid_1_a_1.nii.gz``."""
    return image_path.name[: -len(".nii")] + ".nii.gz"


# ---------------------------------------------------------------------------- what a prediction CSV was made from
def inputs_record_path(csv_file: Path) -> Path:
    """``res/x.csv`` -> ``res/x_inputs.json``: what the CSV was made from (beside it, as ``_failures.csv``)."""
    return csv_file.with_name(csv_file.stem + "_inputs.json")


def prediction_inputs(inputs: EvalInputs, split: str) -> dict[str, Any]:
    """The inputs a prediction CSV depends on: the checkpoint (path, size, mtime: new weights at the same path
    differ), the text encoder, the data root and split, the items and window (their content)."""
    return {"checkpoint": str(inputs.checkpoint.resolve()), "checkpoint_file": file_fingerprint([inputs.checkpoint])[0],
            "text_encoder": str(resolve_path(inputs.preset.paths.text_encoder).resolve()),
            "data_root": str(inputs.data_root.resolve()), "split": split, "roi": list(inputs.roi),
            "items": [[i.anatomy, i.abnormality, i.negative, i.positive] for i in inputs.items]}


def check_replaceable(csv_file: Path, record: Mapping[str, Any], overwrite: bool) -> bool:
    """Whether writing ``csv_file`` replaces a CSV made from other inputs (allowed with ``overwrite`` only:
    ``ZeroShotSetupError`` otherwise). A CSV of the same inputs is simply rewritten."""
    if not csv_file.exists():
        return False
    old = read_json(inputs_record_path(csv_file))
    if old == record:
        return False
    if overwrite:
        return True
    what = (f"no record of its inputs ({inputs_record_path(csv_file).name} is missing)" if not isinstance(old, dict)
            else "other inputs (" + ", ".join(k for k in record if old.get(k) != record[k]) + " differ)")
    raise ZeroShotSetupError(f"{csv_file} exists and was made from {what}: pass --overwrite to replace it, "
                             "or set --csv_file or --name")
