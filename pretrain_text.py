"""Pre-train a small BERT on the training reports (for presets without CXR-BERT).

    python pretrain_text.py --config configs/demo.yaml      # writes the preset's paths.text_encoder

The paper's text encoder is CXR-BERT, pre-trained on a radiology corpus; a preset that has no
such model (the synthetic demo, offline) builds one here from the anatomy texts of the
training split (spec §3), without labels: models/text_pretrain.py. The BERT starts from the
config and vocabulary in ``text_pretrain.init`` and is written, with its tokenizer, as a
Hugging Face directory to ``paths.text_encoder`` (or ``--output``), which train.py and eval.py
then load like CXR-BERT. An existing output is kept (``--overwrite`` redoes it); the directory
appears only once complete.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from data.io import atomic_output
from data.common import PipelineError, load_pipeline_config
from data.dataset import CTRateTrainDataset
from models.text_encoder import TextEncoderError, build_text_encoder
from models.text_pretrain import pretrain_text_encoder
from utils.config import ConfigError, apply_overrides, load_config, resolve_path
from utils.distributed import setup_logging

logger = logging.getLogger("pretrain_text")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("BERT pre-training on report texts", add_help=False)
    p.add_argument("--config", default="configs/demo.yaml", help="preset with a text_pretrain section")
    p.add_argument("--data-root", dest="data_root", help="processed training cache + desc/conc_info.json")
    p.add_argument("--output", help="output directory (default: the preset's paths.text_encoder)")
    p.add_argument("--overwrite", action="store_true", help="redo an existing output")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. text_pretrain.epochs=5")
    return p


def run(args: argparse.Namespace) -> Path:
    """Pre-train and save; returns the output directory."""
    cfg = apply_overrides(load_config(resolve_path(args.config)), args.overrides)
    settings = cfg.get("text_pretrain")
    if not settings:
        raise ConfigError(f"{args.config} has no text_pretrain section")
    out = Path(args.output or cfg["paths"]["text_encoder"])
    if out.exists() and not args.overwrite:
        logger.info("%s exists: kept (--overwrite to redo)", out)
        return out
    pipe = load_pipeline_config(resolve_path(cfg["pipeline_config"]))
    data_root = args.data_root or cfg["paths"]["data_root"]
    dataset = CTRateTrainDataset(data_root, anatomy_names=pipe.anatomy_names, crop_size=cfg["data"]["crop_size"],
                                 split=cfg["data"]["split"])
    texts = [t for per_scan in dataset.texts_to_encode for t in per_scan]
    torch.manual_seed(int(cfg["seed"]))  # the BERT's random init: the same text encoder on every run
    encoder, tokenizer = build_text_encoder(resolve_path(settings["init"]), pretrained=False)
    losses = pretrain_text_encoder(
        encoder, tokenizer, texts, epochs=int(settings["epochs"]), lr=float(settings["lr"]),
        batch_size=int(settings["batch_size"]), temperature=float(settings["temperature"]),
        max_length=int(cfg["model"]["text_max_length"]), seed=int(cfg["seed"]), progress=args.progress)
    with atomic_output(out) as tmp:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("wrote %s (%d texts, loss %.3f -> %.3f)", out, len(set(texts)), losses[0], losses[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("pretrain_text.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run(args)
    except (ConfigError, PipelineError, TextEncoderError, FileNotFoundError, ValueError) as e:
        print(f"pretrain_text: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
