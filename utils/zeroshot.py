"""I/O around zero-shot scoring, shared by eval.py and predict.py.

- ``load_items(path)``: ``configs/zeroshot_items.yaml`` (``roi_dhw`` + ``items`` of
  ``[anatomy, abnormality, negative prompt, positive prompt]``), the single source of the
  test items, their prompts and the window size.
- ``load_eval_model(cfg, checkpoint, ...)``: the FVLM of a training preset with the weights of
  one of our checkpoints (``{"model": state_dict, ...}``) or of the released fVLM layout
  (spec §6), loaded with ``weights_only=True``; eval mode.
- ``write_prediction_csv``: the atomic prediction CSV in the release's format (failures: ``data.io.write_case_csv``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from data.io import write_csv
from models.fvlm import FVLM, build_fvlm
from models.text_encoder import TextEncoderError, build_text_encoder
from models.zeroshot import ZeroShotItem
from utils.checkpoint import CheckpointError, load_checkpoint, load_model_state
from utils.config import resolve_path

logger = logging.getLogger(__name__)

FILE_COLUMN = "file_name"


class ZeroShotSetupError(RuntimeError):
    """Items config, checkpoint or model setup is unusable (message names what to fix)."""


def load_items(path: str | Path) -> tuple[tuple[int, int, int], list[ZeroShotItem]]:
    """(roi_dhw, items) from a zero-shot items YAML."""
    path = resolve_path(path)
    if not path.is_file():
        raise ZeroShotSetupError(f"items config not found: {path} (set --items)")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ZeroShotSetupError(f"{path}: expected a mapping with roi_dhw and items")
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
    return (roi[0], roi[1], roi[2]), items


def load_eval_model(
    cfg: Mapping[str, Any],
    checkpoint: str | Path,
    *,
    n_anatomies: int,
    text_encoder_dir: str | Path,
    device: torch.device,
) -> tuple[FVLM, Any]:
    """(model in eval mode on ``device``, tokenizer) for a preset and a checkpoint.

    The text encoder is built from ``text_encoder_dir``'s config and vocabulary (random init, or
    its weights when the preset froze it in training: ``model.freeze_text_encoder``); every other
    weight then comes from the checkpoint (ours or the release layout, ``weights_only``),
    which must cover the whole model (``utils.checkpoint.load_model_state(strict=True)``).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ZeroShotSetupError(f"checkpoint not found: {checkpoint} (set --checkpoint)")
    # A text encoder frozen in training is not in the checkpoint: its weights come from its directory.
    frozen_text = bool(cfg["model"].get("freeze_text_encoder", False))
    try:
        text_encoder, tokenizer = build_text_encoder(resolve_path(text_encoder_dir), pretrained=frozen_text)
    except TextEncoderError as e:
        raise ZeroShotSetupError(f"{e} (set --text-encoder)") from e
    text_encoder.requires_grad_(not frozen_text)
    model = build_fvlm(cfg["model"], img_size=cfg["data"]["crop_size"], text_encoder=text_encoder,
                       n_anatomies=n_anatomies)
    try:
        load_model_state(model, load_checkpoint(checkpoint), strict=True)
    except CheckpointError as e:
        raise ZeroShotSetupError(f"{e} (set --checkpoint, or the --config it was trained with)") from e
    logger.info("loaded %s", checkpoint)
    return model.eval().to(device), tokenizer


def write_prediction_csv(path: str | Path, rows: Mapping[str, Mapping[str, float]],
                         items: Sequence[ZeroShotItem]) -> None:
    """``file_name`` + one column per item, rows sorted by file name; empty cell = anatomy absent."""
    columns = [item.column for item in items]
    write_csv(path, [FILE_COLUMN, *columns],
                ([name, *(repr(rows[name][c]) if c in rows[name] else "" for c in columns)]
                 for name in sorted(rows)))

