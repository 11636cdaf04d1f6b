"""The one way to build fVLM (spec §4): its size preset, where each weight comes from.

Used by train.py, eval.py and predict.py (through ``zeroshot.load_eval_model``) and the
benches. Where the text encoder's weights come from is decided here only
(:func:`text_weights_from_directory`):

========================  =========================  ===============================
preset                    training start             from a checkpoint (eval)
========================  =========================  ===============================
pretrained, trained       text-encoder directory     the checkpoint
pretrained, frozen        text-encoder directory     text-encoder directory (frozen
                                                     weights are not in checkpoints)
random init, trained      random, from its config    the checkpoint
========================  =========================  ===============================

A frozen random BERT learns nothing, so that combination is refused by ``ModelConfig``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from models.fvlm import FVLM
from models.text_encoder import build_text_encoder
from models.vit3d import VisionTransformer3D
from utils.checkpoint import load_mae_into_vit, load_model_state, load_model_weights

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The ``model`` section of a preset (configs/ctrate.yaml documents each key)."""

    patch_size: tuple[int, int, int]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    drop_rate: float
    attn_drop_rate: float
    out_indices: tuple[int, ...]
    text_pretrained: bool
    freeze_text_encoder: bool
    text_max_length: int
    temp_init: float
    temp_min: float
    temp_max: float
    grad_checkpointing: bool

    def __post_init__(self) -> None:
        if self.freeze_text_encoder and not self.text_pretrained:
            raise ValueError("model.freeze_text_encoder needs model.text_pretrained: "
                             "a frozen random BERT learns nothing")
        if not 0 < self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError("model: need 0 < temp_min <= temp_init <= temp_max")


def text_weights_from_directory(cfg: ModelConfig, *, from_checkpoint: bool) -> bool:
    """Whether the text encoder's weights are read from its directory (else random init,
    overwritten by a checkpoint when there is one); the table of the module docstring."""
    return cfg.freeze_text_encoder if from_checkpoint else cfg.text_pretrained


def build_model(
    cfg: ModelConfig,
    *,
    img_size: Sequence[int],
    n_anatomies: int,
    text_encoder_dir: str | Path,
    mae_weights: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> tuple[FVLM, Any]:
    """(FVLM, tokenizer) of a preset.

    ``img_size``: the training crop (D, H, W), which sets the ViT's position-embedding grid.
    ``text_encoder_dir``: a CXR-BERT or BERT directory (config and vocabulary, and the
    weights when the table above says so). ``mae_weights``: MAE initialisation of the ViT.
    ``checkpoint``: ours or the release's layout, loaded strictly (every weight the table does
    not take from the text-encoder directory must be in it). Raises ``TextEncoderError`` or
    ``CheckpointError`` when those files are unusable.
    """
    from_checkpoint = checkpoint is not None
    text_encoder, tokenizer = build_text_encoder(
        text_encoder_dir, pretrained=text_weights_from_directory(cfg, from_checkpoint=from_checkpoint))
    if cfg.freeze_text_encoder:  # frozen: left out of checkpoints (spec §6)
        text_encoder.requires_grad_(False)  # (the token-type table is frozen in any case: omit_token_type_term)
    vit = VisionTransformer3D(
        img_size=tuple(img_size), patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate, out_indices=cfg.out_indices, grad_checkpointing=cfg.grad_checkpointing)
    model = FVLM(vit, text_encoder, n_anatomies=n_anatomies, temp_init=cfg.temp_init)
    if mae_weights is not None:
        load_mae_into_vit(model.visual_encoder, mae_weights)  # it logs the counts (the key list is noise)
    if checkpoint is not None:
        load_model_state(model, load_model_weights(checkpoint), strict=True, source=checkpoint)
        logger.info("loaded %s", checkpoint)
    return model, tokenizer
