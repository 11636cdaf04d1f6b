"""Text encoder (BERT) and its WordPiece tokenizer, loaded offline without remote code.

``microsoft/BiomedVLP-CXR-BERT-specialized`` ships ``config.json`` with
``model_type: "cxr-bert"`` and an ``auto_map`` to remote code; its encoder is a plain BERT
whose weights are stored with the prefix ``bert.`` next to a masked-LM head (``cls.*``) and a
projection head (``cls_projection_head.*``). We build a ``transformers.BertConfig`` from the
fields of ``config.json``, a ``BertModel(add_pooling_layer=False)`` from it, and load the
encoder weights with the ``bert.`` prefix stripped; heads and the pooler are ignored. A plain
local BERT directory (``model_type: "bert"``, weights with or without ``bert.``) loads the
same way. Every encoder built here adds no token-type embedding (``omit_token_type_term``), as
the release's BERT, whatever the table holds. The tokenizer is ``BertTokenizerFast.from_pretrained(dir)`` (never
``BertTokenizerFast(vocab_file=...)``, which transformers 5 silently ignores).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from data.io import one_line
from utils.cli import UsageError


logger = logging.getLogger(__name__)

CXR_BERT_HUB_ID = "microsoft/BiomedVLP-CXR-BERT-specialized"
# config.json keys that describe the remote-code wrapper, not the BERT encoder
_WRAPPER_CONFIG_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path")
# weight-name prefixes of heads around the encoder (ignored)
_IGNORED_PREFIXES = ("pooler.", "cls.", "cls_projection_head.", "projection_head.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TextEncoderError(UsageError, RuntimeError):
    """A text-encoder directory is missing, incomplete or malformed."""


def _hint(path: Path) -> str:
    return (f"download {CXR_BERT_HUB_ID} (e.g. `hf download {CXR_BERT_HUB_ID} --local-dir {path}`) "
            "or point the text-encoder path at a local BERT directory")


def _read_config(path: Path) -> BertConfig:
    if not path.is_dir():
        raise TextEncoderError(f"text encoder directory not found: {path}; {_hint(path)}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TextEncoderError(f"{cfg_file} not found; {_hint(path)}")
    try:
        fields: dict[str, Any] = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TextEncoderError(f"{cfg_file} is not valid JSON: {e}") from e
    model_type = fields.get("model_type", "bert")
    if model_type not in ("bert", "cxr-bert"):
        logger.warning("%s: model_type %r, building it as a plain BERT encoder", cfg_file, model_type)
    for key in _WRAPPER_CONFIG_KEYS:
        fields.pop(key, None)
    config = BertConfig(**fields)
    config.name_or_path = str(cfg_file)  # named by utils.checkpoint when a checkpoint does not fit it
    return config


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    """One safetensors or ``torch.save`` weight file; ``TextEncoderError`` when it cannot be read."""
    try:
        if f.name.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors raises its own SafetensorError, torch.load pickle/runtime errors
        raise TextEncoderError(f"cannot read the weight file {f} ({one_line(e)[:200]}): download it again; "
                               f"{_hint(f.parent)}") from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        f = path / name
        if f.is_file():
            return _read_weight_file(f)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_read_weight_file(path / shard))
            return sd
    raise TextEncoderError(
        f"no weight file ({' or '.join(_WEIGHT_FILES)}) in {path}; {_hint(path)}")


def encoder_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BERT-encoder keys of a checkpoint (``bert.`` stripped, old ``gamma``/``beta`` renamed)
    and the list of ignored keys (heads, pooler, ``position_ids``)."""
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in sd.items():
        k = key[len("bert."):] if key.startswith("bert.") else key
        if k.startswith(_IGNORED_PREFIXES) or k.endswith(("position_ids", "token_type_ids")):
            ignored.append(key)
            continue
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = value
    return out, ignored


def _zero_token_type_term(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


def omit_token_type_term(model: BertModel) -> BertModel:
    """Make ``model``'s embeddings skip the token-type term, whatever its table holds (spec §6).

    The release calls its BERT with ``token_type_ids=None`` and its embedding layer then adds
    no token-type embedding; ``transformers.BertModel`` adds row 0 of the table instead, which
    is not zero in CXR-BERT. A forward hook replaces the table's output by zeros (``x + 0`` is
    exact), and the table is frozen: it gets no gradient, so the optimizer and DDP never see it.
    """
    table = model.embeddings.token_type_embeddings
    table.weight.requires_grad_(False)
    table.register_forward_hook(_zero_token_type_term)
    return model


def load_tokenizer(path: str | Path) -> BertTokenizerFast:
    """WordPiece tokenizer of a local BERT directory (needs ``vocab.txt``), offline."""
    path = Path(path)
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise TextEncoderError(f"no vocab.txt or tokenizer.json in {path}; {_hint(path)}")
    try:
        return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed vocabulary
        raise TextEncoderError(f"cannot read the tokenizer in {path} ({one_line(e)[:200]}): download vocab.txt / "
                               f"tokenizer.json again; {_hint(path)}") from e


def missing_parts(path: str | Path, *, weights: bool) -> list[str]:
    """The parts a text-encoder directory lacks (config, vocabulary, and weights when ``weights``); [] when complete."""
    path = Path(path)
    if not path.is_dir():
        return ["the directory itself"]
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if weights and not any((path / f).is_file() for w in _WEIGHT_FILES for f in (w, f"{w}.index.json")):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        missing.append("vocab.txt or tokenizer.json")
    return missing


def load_text_encoder(path: str | Path, *, allow_missing: bool = False) -> tuple[BertModel, BertTokenizerFast]:
    """``(BertModel(add_pooling_layer=False), tokenizer)`` from a local CXR-BERT or BERT directory.

    Raises ``TextEncoderError`` when the directory, config, weights or vocabulary is missing,
    and when encoder weights are missing from the weight file (their names are listed;
    ``allow_missing=True`` logs a warning instead). Unknown extra keys are logged.
    """
    path = Path(path)
    config = _read_config(path)
    model = omit_token_type_term(BertModel(config, add_pooling_layer=False))
    weights, ignored = encoder_state_dict(_read_weights(path))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        logger.warning("%s: %d unexpected weights ignored, e.g. %s", path, len(result.unexpected_keys),
                       result.unexpected_keys[:5])
    if result.missing_keys:
        msg = f"{path}: {len(result.missing_keys)} encoder weights missing from the checkpoint: {result.missing_keys}"
        if not allow_missing:
            raise TextEncoderError(msg)
        logger.warning("%s (left at their random init)", msg)
    logger.info("text encoder %s: loaded %d weights, ignored %d (heads/pooler/buffers)",
                path, len(weights) - len(result.unexpected_keys), len(ignored))
    return model, load_tokenizer(path)


def build_text_encoder(config_dir: str | Path, pretrained: bool = False) -> tuple[BertModel, BertTokenizerFast]:
    """Text encoder from a directory: ``pretrained=True`` loads its weights
    (``load_text_encoder``); ``False`` builds a randomly initialised BERT from its
    ``config.json`` (the demo's tiny BERT in ``configs/demo_bert/``) and its tokenizer."""
    if pretrained:
        return load_text_encoder(config_dir)
    path = Path(config_dir)
    model = omit_token_type_term(BertModel(_read_config(path), add_pooling_layer=False))
    return model, load_tokenizer(path)
