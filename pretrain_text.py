"""Pre-train a small BERT on the training reports (for presets without CXR-BERT).

    python pretrain_text.py --config configs/demo.yaml      # writes the preset's paths.text_encoder

The paper's text encoder is CXR-BERT, pre-trained on a radiology corpus; a preset that has no
such model (the synthetic demo, offline) builds one here from the anatomy texts of the
training split (spec §3), without labels. The BERT starts from the config and vocabulary in
``text_pretrain.init`` and is written, with its tokenizer, as a Hugging Face directory to
``paths.text_encoder`` (or ``--text-encoder``), which train.py and eval.py then load like
CXR-BERT. An existing output is kept (``--overwrite`` redoes it); the directory appears only
once complete.

Why: a BERT trained from scratch by the fVLM loss alone only learns to tell the ~1000
training texts apart: short zero-shot prompts fall outside what it has seen, and the sign of
a prompt pair comes out arbitrary (measured, docs/demo-findings.md: hiatal hernia and
pericardial effusion at AUC 0.02 / 0.01 while the image features separate them at 0.99).
This pre-training gives the demo's BERT the property the zero-shot protocol relies on: a
sentence is embedded near the texts that contain it.

Objective (no labels): each anatomy text is paired with one of its own sentences, drawn anew
each epoch; text and sentence embeddings ([CLS] -> a linear head that is thrown away ->
L2-normalise) are matched by a symmetric in-batch InfoNCE (``models.loss.soft_clip_loss``).
A sentence that occurs in several texts of the batch ("No hiatal hernia was detected.") is a
positive for all of them: the targets of a row are its equal sentences, normalised (the
false-negative rule of spec §5 applied to text).
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import preset_defaults, run_main

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("pretrain_text")
# command-line flag -> preset key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"data_root": "paths.data_root", "text_encoder": "paths.text_encoder"}
DEFAULT_CONFIG = "configs/demo.yaml"  # the presets without CXR-BERT are the demo's

_SENTENCE_END = re.compile(r"(?<=\.)\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report text, each ending with "." ("A.B. C" -> ["A.", "B.", "C."]).

    Anatomy texts join conclusion and findings without a space ("Hiatal hernia.A hernia...",
    spec §3), so a sentence ends at every "." whatever follows it.
    """
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    return [p if p.endswith(".") else p + "." for p in parts if p.strip(". ")]


def pretrain_text_encoder(
    encoder: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    temperature: float = 0.05,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``encoder`` (a ``BertModel``) in place on ``texts``; returns the mean loss per epoch.

    ``texts`` are de-duplicated; each batch holds ``batch_size`` distinct texts (the last
    partial batch is dropped). Deterministic for a given seed on one thread count.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from tqdm import tqdm

    from models.loss import soft_clip_loss, soft_targets
    from utils.config import ConfigError

    corpus = sorted(set(t for t in texts if split_sentences(t)))
    if len(corpus) < batch_size:
        raise ConfigError(f"{len(corpus)} distinct texts: need at least one batch of {batch_size}")
    sentences = {t: split_sentences(t) for t in corpus}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = nn.Linear(encoder.config.hidden_size, encoder.config.hidden_size)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    device = next(encoder.parameters()).device
    head.to(device)
    encoder.train()

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        cls = encoder(input_ids=enc["input_ids"].to(device),
                      attention_mask=enc["attention_mask"].to(device)).last_hidden_state[:, 0]
        return F.normalize(head(cls), dim=-1)

    losses: list[float] = []
    n_batches = len(corpus) // batch_size
    for epoch in range(epochs):
        order = corpus[:]
        rng.shuffle(order)
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"text pre-training {epoch}", disable=not progress)
        for b in bar:
            batch = order[b * batch_size:(b + 1) * batch_size]
            picked = [rng.choice(sentences[t]) for t in batch]
            same = torch.tensor([[x == y for y in picked] for x in picked], device=device)
            loss = soft_clip_loss(embed(batch) @ embed(picked).T / temperature, soft_targets(same))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        losses.append(total / n_batches)
        logger.info("text pre-training epoch %d: loss %.4f", epoch, losses[-1])
    encoder.eval()
    return losses


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("BERT pre-training on report texts", add_help=False)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"preset with a text_pretrain section (default: {DEFAULT_CONFIG})")
    p.add_argument("--data-root", dest="data_root", help="processed training cache + desc/conc_info.json")
    p.add_argument("--text-encoder", dest="text_encoder",
                   help="directory written, then read by train.py (default: the preset's paths.text_encoder)")
    p.add_argument("--overwrite", action="store_true", help="redo an existing output")
    p.add_argument("--no-pbar", dest="pbar", action="store_false", help="no progress bar (cluster logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. text_pretrain.epochs=5")
    return p


def run(args: argparse.Namespace) -> Path:
    """Pre-train and save; returns the output directory."""
    import torch

    from data.dataset import CTRateTrainDataset
    from data.io import atomic_output
    from models.text_encoder import build_text_encoder
    from utils.config import ConfigError, resolve_path
    from utils.preset import given_flags, load_preset

    cfg = load_preset(args.config, args.overrides, flags=given_flags(args, FLAG_KEYS))
    settings = cfg.text_pretrain
    if settings is None:
        raise ConfigError(f"{args.config} has no text_pretrain section")
    out = Path(cfg.paths.text_encoder)
    if out.exists() and not args.overwrite:
        logger.info("%s exists: kept (--overwrite to redo)", out)
        return out
    dataset = CTRateTrainDataset(cfg.paths.data_root, anatomy_names=cfg.pipeline.anatomy_names,
                                 crop_size=cfg.data.crop_size, split=cfg.data.split)
    texts = [t for per_scan in dataset.texts_to_encode for t in per_scan]
    torch.manual_seed(cfg.seed)  # the BERT's random init: the same text encoder on every run
    encoder, tokenizer = build_text_encoder(resolve_path(settings.init), pretrained=False)
    losses = pretrain_text_encoder(
        encoder, tokenizer, texts, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
        temperature=settings.temperature, max_length=cfg.model.text_max_length, seed=cfg.seed, progress=args.pbar)
    with atomic_output(out) as tmp:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("wrote %s (%d texts, loss %.3f -> %.3f)", out, len(set(texts)), losses[0], losses[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("pretrain_text.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     epilog=preset_defaults(FLAG_KEYS, DEFAULT_CONFIG),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    from utils.distributed import setup_logging

    setup_logging()
    return run_main("pretrain_text", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
