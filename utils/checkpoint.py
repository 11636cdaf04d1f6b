"""Checkpoints: the release's key layout, MAE initialisation, atomic save, safe load.

Native module names follow timm/MAE; the release (spec §6) names the same tensors the MONAI
way. ``RELEASE_RENAMES`` is the one (native, release) table used in both directions.
``{n}`` stands for a block number. Keys not in the table are identical in both layouts.

Checkpoint file (``checkpoint_{epoch}.pth``): ``{"model": release-layout state dict without
frozen parameters, "optimizer": ..., "epoch": int, "config": plain dict, **extra}``, written to
a temporary file and moved into place (``data.io.atomic_output``), loaded with
``torch.load(weights_only=True)`` (so only tensors and primitive containers are stored).
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from data.io import atomic_output, one_line
from models.vit3d import VisionTransformer3D, resample_pos_embed_3d
from utils.cli import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "RELEASE_RENAMES", "CheckpointError", "ModelMismatchError", "to_release_state_dict", "from_release_state_dict",
    "filter_state_dict", "load_model_state", "load_mae_into_vit", "save_checkpoint", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "load_model_weights", "resample_pos_embed_3d",
]

RELEASE_RENAMES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.patch_embed.proj.", "visual_encoder.patch_embedding.patch_embeddings."),
    ("visual_encoder.pos_embed", "visual_encoder.patch_embedding.position_embeddings"),
    ("visual_encoder.blocks.{n}.attn.proj.", "visual_encoder.blocks.{n}.attn.out_proj."),
    ("visual_encoder.blocks.{n}.mlp.fc1.", "visual_encoder.blocks.{n}.mlp.linear1."),
    ("visual_encoder.blocks.{n}.mlp.fc2.", "visual_encoder.blocks.{n}.mlp.linear2."),
)
# a key that only the release layout has
_RELEASE_SENTINEL = "visual_encoder.patch_embedding.patch_embeddings.weight"
# keys a release checkpoint may carry that our model does not use (spec §6)
_IGNORED_PREFIXES = ("text_encoder.cls.", "text_encoder.cls_projection_head.", "text_encoder.pooler.")
_IGNORED_KEYS = ("text_encoder.embeddings.position_ids", "text_encoder.embeddings.token_type_ids")
_TOKEN_TYPE_KEY = "text_encoder.embeddings.token_type_embeddings.weight"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint or weight file is missing, unreadable or does not fit the model."""


class ModelMismatchError(CheckpointError):
    """A checkpoint's ViT or text encoder has another size than the model built (the message names the flag)."""


def _compile(template: str) -> tuple[re.Pattern[str], str]:
    pattern = "^" + re.escape(template).replace(re.escape("{n}"), r"(\d+)")
    return re.compile(pattern), template.replace("{n}", r"\1")


_TO_RELEASE = [(_compile(a)[0], _compile(b)[1]) for a, b in RELEASE_RENAMES]
_FROM_RELEASE = [(_compile(b)[0], _compile(a)[1]) for a, b in RELEASE_RENAMES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return key


def to_release_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (timm/MAE names) -> release layout (spec §6)."""
    return {_rename(k, _TO_RELEASE): v for k, v in sd.items()}


def from_release_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release layout -> native names. Drops ``text_encoder.embeddings.position_ids``,
    ``text_encoder.cls.*`` (masked-LM head) and other unused heads; a missing token-type
    table becomes zeros (2 x hidden; ``filter_state_dict`` uses the model's shape)."""
    out = {_rename(k, _FROM_RELEASE): v for k, v in sd.items()
           if not k.startswith(_IGNORED_PREFIXES) and k not in _IGNORED_KEYS}
    word = out.get("text_encoder.embeddings.word_embeddings.weight")
    if word is not None and _TOKEN_TYPE_KEY not in out:
        out[_TOKEN_TYPE_KEY] = word.new_zeros((2, word.shape[1]))
    return out


def _unwrap(sd: Mapping[str, Any]) -> dict[str, Any]:
    for key in ("model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def filter_state_dict(sd: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Any known layout (release, ours, wrapped in ``model``/``state_dict``, ``module.``
    prefixes) -> native keys of ``model``. Missing token-type embeddings become zeros of the
    model's shape (the release may lack them: behave as if they were zero)."""
    sd = _unwrap(sd)
    is_release = _RELEASE_SENTINEL in sd or any(k.startswith("visual_encoder.patch_embedding.") for k in sd)
    if is_release:
        sd = from_release_state_dict(sd)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES) and k not in _IGNORED_KEYS}
    own = model.state_dict()
    # only a checkpoint that carries a text encoder can lack its token-type embeddings; one
    # trained with the text encoder frozen carries none of it (the model keeps what it loaded)
    has_text_encoder = any(k.startswith("text_encoder.") for k in sd)
    if _TOKEN_TYPE_KEY in own and has_text_encoder:
        tt = sd.get(_TOKEN_TYPE_KEY)
        if tt is None or (is_release and tt.shape != own[_TOKEN_TYPE_KEY].shape and not tt.any()):
            sd[_TOKEN_TYPE_KEY] = torch.zeros_like(own[_TOKEN_TYPE_KEY])
            logger.info("checkpoint has no token-type embeddings: using zeros")
    pos = sd.get("visual_encoder.pos_embed")
    own_pos = own.get("visual_encoder.pos_embed")
    # a width mismatch is described with the rest of the ViT's size by load_model_state
    if pos is not None and own_pos is not None and pos.shape[-1] == own_pos.shape[-1] and pos.shape != own_pos.shape:
        raise CheckpointError(f"position embeddings {tuple(pos.shape)} do not fit the model's {tuple(own_pos.shape)}: "
                              "build the model with the crop size and patch size the checkpoint was trained with")
    return sd


def _blocks(sd: Mapping[str, Any], prefix: str) -> int:
    """How many numbered blocks ``{prefix}{n}.`` a state dict holds."""
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _vit_size(sd: Mapping[str, Any]) -> str | None:
    """The ViT's size in ``sd``; None when ``sd`` has no ViT (no position table)."""
    if "visual_encoder.pos_embed" not in sd:
        return None
    width = sd["visual_encoder.pos_embed"].shape[-1]
    hidden = sd.get("visual_encoder.blocks.0.mlp.fc1.weight")
    ratio = f"{hidden.shape[0] / width:g}" if hidden is not None else "?"
    return f"{width} wide, {_blocks(sd, 'visual_encoder.blocks.')} blocks, mlp_ratio {ratio}"


def _text_size(sd: Mapping[str, Any]) -> str | None:
    """The text encoder's size in ``sd``; None when ``sd`` has no (whole) text encoder (no word embeddings)."""
    words = sd.get("text_encoder.embeddings.word_embeddings.weight")
    if words is None:
        return None
    ffn = sd.get("text_encoder.encoder.layer.0.intermediate.dense.weight")
    return (f"{words.shape[1]} wide, {_blocks(sd, 'text_encoder.encoder.layer.')} layers, intermediate "
            f"{ffn.shape[0] if ffn is not None else '?'}, vocabulary {words.shape[0]}")


# the parts of the model a checkpoint may not fit: (key prefix, name, size description, what sets the model's)
_PARTS = (("visual_encoder.", "ViT", _vit_size, "set --config (or model.* overrides) to the model size it was "
           "trained with"),
          ("text_encoder.", "text encoder", _text_size, "set --text-encoder to the directory it was trained with"))


def _misfit(sd: Mapping[str, Any], model: nn.Module) -> str | None:
    """One line naming the part of ``model`` whose size the checkpoint ``sd`` does not have (both sizes, the flag
    that sets the model's); None when every part the checkpoint holds whole has the model's size."""
    own = model.state_dict()
    for prefix, name, size, hint in _PARTS:
        theirs = size(sd)
        if theirs is not None and theirs != size(own):
            built = ""
            if prefix == "text_encoder.":
                built = getattr(getattr(getattr(model, "text_encoder", None), "config", None), "name_or_path", "")
            built = f"{built} builds" if built else "the model built is"
            return f"the checkpoint's {name} is {theirs}; {built} {size(own)}: {hint}"
    return None


def load_model_state(model: nn.Module, sd: Mapping[str, Any], strict: bool = True,
                     source: str | Path = "checkpoint") -> dict[str, list[str]]:
    """Load a state dict in the release layout or ours into ``model`` (unwrapped).

    ``strict``: unexpected keys are an error, and so are missing keys, except parameters the
    model has frozen (``requires_grad=False``; checkpoints leave them out). A checkpoint whose
    ViT or text encoder has another size than the model's is a ``CheckpointError`` that names
    the part, both sizes and the flag to set (whatever ``strict``); NaN or inf weights are a
    ``CheckpointError`` too. Messages start with ``source`` (the checkpoint's path). Returns
    ``{"missing": [...], "unexpected": [...]}``.
    """
    sd = filter_state_dict(sd, model)
    own = model.state_dict()
    other_shape = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in own if k not in sd and k not in frozen]
    unexpected = [k for k in sd if k not in own]
    misfit = _misfit(sd, model) if other_shape or (strict and (missing or unexpected)) else None
    if misfit is not None:
        raise ModelMismatchError(f"{source}: {misfit}")
    if other_shape:
        raise CheckpointError(f"{source} does not fit the model: {len(other_shape)} tensors of another shape, "
                              f"e.g. {other_shape[:4]}")
    non_finite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{source}: {len(non_finite)} weight tensor(s) hold NaN or inf, e.g. {non_finite[:3]} "
                              "(a diverged run): use an earlier checkpoint")
    model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not fit the model: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}")
    if missing or unexpected:
        logger.warning("non-strict load: missing %s, unexpected %s", missing, unexpected)
    return {"missing": missing, "unexpected": unexpected}


def _mae_pos_embed_to_3d(pos2d: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """MAE (1, [1+]s*s, C) 2D table -> (1, d*h*w, C): drop cls, bilinear (align_corners=False)
    resize of the s x s grid to (h, w) (rows -> H, columns -> W), repeat d times along D."""
    n, length, dim = pos2d.shape
    side = math.isqrt(length)
    if side * side != length:
        side = math.isqrt(length - 1)
        if side * side != length - 1:
            raise CheckpointError(f"MAE pos_embed has {length} tokens: not [cls +] a square grid")
        pos2d = pos2d[:, 1:]
    d, h, w = grid
    table = pos2d.float().reshape(n, side, side, dim).permute(0, 3, 1, 2)  # [1, C, s, s]
    table = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)  # [1, C, h, w]
    table = table.permute(0, 2, 3, 1).reshape(n, 1, h * w, dim).expand(n, d, h * w, dim)  # [1, d, h*w, C]
    return table.reshape(n, d * h * w, dim).to(pos2d.dtype)


def load_mae_into_vit(vit: VisionTransformer3D, path: str | Path) -> dict[str, Any]:
    """Initialise ``vit`` from MAE ``mae_pretrain_vit_base.pth`` (spec §4).

    Drops decoder keys, ``mask_token``, ``cls_token`` and ``patch_embed.*``; resizes the 2D
    position table (see ``_mae_pos_embed_to_3d``); loads ``blocks.*`` and ``norm.*`` 1:1
    (blocks beyond ``vit``'s depth are skipped). Raises ``CheckpointError`` for a missing or
    malformed file. Returns ``{"loaded": [...], "skipped": [...], "not_initialised": [...]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"MAE weights not found: {path} (download mae_pretrain_vit_base.pth from facebookresearch/mae "
            "or set the MAE weights path to null to train from scratch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read MAE weights {path} (not a PyTorch weight file?): "
                              f"{one_line(e)[:200]}; set --mae-weights to mae_pretrain_vit_base.pth") from e
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict with key 'model', got {type(ckpt).__name__}")
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, Mapping) or "pos_embed" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError(f"{path}: not an MAE/timm ViT checkpoint (no 'model' dict with pos_embed and blocks.*)")
    own = vit.state_dict()
    new: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in sd.items():
        if key.startswith(("decoder", "patch_embed.")) or key in ("mask_token", "cls_token"):
            skipped.append(key)
        elif key == "pos_embed":
            if value.shape[-1] != vit.embed_dim:
                raise CheckpointError(f"{path}: pos_embed width {value.shape[-1]} != embed_dim {vit.embed_dim}")
            new["pos_embed"] = _mae_pos_embed_to_3d(value, vit.native_grid)
        elif key in own:
            if own[key].shape != value.shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
            new[key] = value
        else:
            skipped.append(key)
    vit.load_state_dict(new, strict=False)
    not_init = sorted(k for k in own if k not in new)
    logger.info("MAE init from %s: loaded %d tensors, skipped %d (%s), left at init: %s",
                path, len(new), len(skipped), ", ".join(sorted({k.split('.')[0] for k in skipped})), not_init)
    return {"loaded": sorted(new), "skipped": sorted(skipped), "not_initialised": not_init}


def _unwrap_module(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``{"model", "optimizer", "epoch", "config", **extra}`` (release key layout,
    frozen parameters left out). ``config`` and ``extra`` must hold only tensors and primitive
    containers (``load_checkpoint`` uses ``weights_only=True``)."""
    path = Path(path)
    model = _unwrap_module(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    payload: dict[str, Any] = {
        "model": to_release_state_dict(state),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "config": dict(config) if config is not None else None,
    }
    payload.update(extra or {})
    try:
        # through a Python file, so a failed write keeps its OS error (torch's own writer reports a bare
        # "unexpected pos" on a full disk)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; nothing was saved for this "
                              "epoch (the earlier checkpoints are intact): free space or fix the output "
                              "directory, then rerun with --resume") from e
    return path


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes; a copy cut short?): delete it or use another")


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return CheckpointError(f"cannot load {path} with weights_only=True: {detail}")


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint (model, optimiser, ...) on the CPU with ``weights_only=True``; ``CheckpointError`` when
    missing or not loadable as plain data. ``mmap``: map the file instead of reading it, so only the tensors
    used are read from disk (files in torch's legacy non-zip format cannot be mapped and are read whole)."""
    path = Path(path)
    _check_file(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise _load_error(path, e) from e


def load_model_weights(path: str | Path) -> Mapping[str, Any]:
    """The model's weights of a checkpoint (ours, or the release's file) without reading the rest: the file is
    memory-mapped, so the optimiser state that training checkpoints carry is never read from disk."""
    path = Path(path)
    ckpt = load_checkpoint(path, mmap=True)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return ckpt["model"]
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict: use a checkpoint of train.py "
                              "or the released fVLM weights")
    return ckpt


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint_{N}.pth`` files in ``output_dir``, by increasing N."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint_*.pth")
             if (m := re.fullmatch(r"checkpoint_(\d+)\.pth", p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """``checkpoint_{N}.pth`` with the largest N in ``output_dir`` (None when there is none)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None
