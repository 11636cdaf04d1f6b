"""Pre-training a small BERT on report texts, for presets without a pre-trained text encoder.

fVLM starts from CXR-BERT, a BERT that has read a large radiology corpus. The synthetic demo
has no such model offline, and a BERT trained from scratch by the fVLM loss alone only learns
to tell the ~1000 training texts apart: short zero-shot prompts fall outside what it has
seen, and the sign of a prompt pair comes out arbitrary (measured in the README: hiatal
hernia and pericardial effusion at AUC 0.02 / 0.01 while the image features separate them at
0.99). This module gives the demo's BERT the property the zero-shot protocol relies on: a
sentence is embedded near the texts that contain it.

Objective (no labels): each anatomy text is paired with one of its own sentences, drawn anew
each epoch; text and sentence embeddings ([CLS] -> a linear head that is thrown away ->
L2-normalise) are matched by a symmetric in-batch InfoNCE. A sentence that occurs in several
texts of the batch ("No hiatal hernia was detected.") is a positive for all of them: the
targets of a row are its equal sentences, normalised (the false-negative rule of spec §5
applied to text).
"""
from __future__ import annotations

import logging
import random
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=\.)\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report text, each ending with "." ("A.B. C" -> ["A.", "B.", "C."]).

    Anatomy texts join conclusion and findings without a space ("Hiatal hernia.A hernia...",
    spec §3), so a sentence ends at every "." whatever follows it.
    """
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    return [p if p.endswith(".") else p + "." for p in parts if p.strip(". ")]


def _soft_info_nce(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = a @ b.T / temperature
    return 0.5 * (-(targets * logits.log_softmax(dim=1)).sum(1).mean()
                  - (targets.T * logits.T.log_softmax(dim=1)).sum(1).mean())


def pretrain_text_encoder(
    encoder: nn.Module,
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
    corpus = sorted(set(t for t in texts if split_sentences(t)))
    if len(corpus) < batch_size:
        raise ValueError(f"{len(corpus)} distinct texts: need at least one batch of {batch_size}")
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
            same = torch.tensor([[x == y for y in picked] for x in picked], dtype=torch.float32, device=device)
            loss = _soft_info_nce(embed(batch), embed(picked), same / same.sum(1, keepdim=True), temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        losses.append(total / n_batches)
        logger.info("text pre-training epoch %d: loss %.4f", epoch, losses[-1])
    encoder.eval()
    return losses
