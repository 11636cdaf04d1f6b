"""Frozen image and text features for retrieval and probing (embed.py, retrieval.py, probe.py).

Image features of a processed volume, per anatomy of the pipeline's list present in its
mask, from the zero-shot window of spec §7 (``zeroshot.ZeroShotScorer.anatomy_feature``,
the code path eval.py scores with):

- ``projected`` (N, A, E): pooled -> ``vision_projs[a]`` -> L2-normalised, the joint space;
- ``pooled`` (N, A, C): the anatomy query's attention output before the projection (captured
  by a forward hook on ``vision_projs[a]``, so the model code is not touched);
- ``present`` (N, A) bool; absent anatomies hold NaN.

Written as ONE ``.npz`` per run (``names``, ``anatomies``, ``projected``, ``pooled``,
``present``, ``source``: checkpoint path, size and mtime, data root and window size; ``files``: size and mtime of
each volume's image and mask), atomically. Resumable: every
``save_every`` volumes the features so far go to ``.partial-{name}`` beside it; a rerun with the
same source picks them up and computes only the rest (and the volumes whose files changed); the finished file
replaces the partial one.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from data.common import scan_id_of
from data.io import VolumeReadError, atomic_output, file_fingerprint, image_to_mask_path, scale_hu
from data.texts import compose_anatomy_text, text_for_encoding
from utils.cli import UsageError
from utils.preset import Preset
from zeroshot import (ZeroShotScorer, ZeroShotSetupError, load_eval_model, read_case, resolve_eval_inputs,
                      volume_name)

logger = logging.getLogger(__name__)



class EmbeddingsFileError(UsageError, ValueError):
    """An embeddings file is not one embed.py wrote (message names it)."""


@dataclass
class ImageEmbeddings:
    names: list[str]
    anatomies: list[str]
    projected: np.ndarray  # (N, A, E) float32, NaN where absent
    pooled: np.ndarray  # (N, A, C) float32, NaN where absent
    present: np.ndarray  # (N, A) bool
    source: str  # what made the features: checkpoint (path, size, mtime), data root, window size
    files: np.ndarray  # (N, 4) int64: size and mtime (ns) of each volume's processed image and mask

    def save(self, path: Path) -> None:
        """Atomic ``np.savez`` (``data.io.atomic_output``)."""
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, names=np.asarray(self.names, dtype=str), anatomies=np.asarray(self.anatomies, dtype=str),
                     projected=self.projected, pooled=self.pooled, present=self.present,
                     source=np.asarray(self.source), files=self.files)

    @classmethod
    def load(cls, path: str | Path) -> "ImageEmbeddings":
        if not Path(path).is_file():
            raise EmbeddingsFileError(f"embeddings file not found: {path} (set --embeddings; embed.py writes it)")
        try:
            with np.load(path) as z:
                names = [str(n) for n in z["names"]]
                # files written before volumes were fingerprinted match none: their features are recomputed
                files = z["files"] if "files" in z.files else np.full((len(names), 4), -1, np.int64)
                emb = cls(names, [str(a) for a in z["anatomies"]], z["projected"], z["pooled"],
                          z["present"].astype(bool), str(z["source"]), files)
        except (OSError, KeyError, ValueError, EOFError) as exc:
            raise EmbeddingsFileError(f"not an embeddings file of embed.py: {path} ({exc})") from None
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(emb.names):
            rows.setdefault(name, []).append(i)
        repeated = {name: at for name, at in rows.items() if len(at) > 1}
        if repeated:
            first, at = next(iter(repeated.items()))
            raise EmbeddingsFileError(f"{path} holds {len(repeated)} volume(s) more than once, e.g. {first} "
                                      f"(rows {', '.join(map(str, at))} of 'names'): embed them again with "
                                      "embed.py --overwrite")
        return emb

    def select(self, names: Sequence[str]) -> "ImageEmbeddings":
        index = {n: i for i, n in enumerate(self.names)}
        rows = [index[n] for n in names]
        return ImageEmbeddings(list(names), self.anatomies, self.projected[rows], self.pooled[rows],
                               self.present[rows], self.source, self.files[rows])


class AnatomyFeatureExtractor:
    """``extractor(image_hu, mask) -> (projected (A, E), pooled (A, C), present (A,))`` per volume."""

    def __init__(self, model: torch.nn.Module, anatomy_names: Sequence[str], roi: Sequence[int],
                 hu_window: Sequence[float], device: torch.device) -> None:
        proj_dim = model.text_proj.out_features
        self.scorer = ZeroShotScorer(model, [], anatomy_names, torch.zeros(0, 2, proj_dim), roi, device,
                                     transform=lambda hu: scale_hu(hu, hu_window))
        self.anatomies = list(anatomy_names)
        self.dims = (proj_dim, model.visual_encoder.embed_dim)
        self._pooled: list[torch.Tensor] = []
        for proj in model.vision_projs:
            proj.register_forward_hook(lambda _m, inputs, _out: self._pooled.append(inputs[0].detach()))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        projected = np.full((len(self.anatomies), self.dims[0]), np.nan, dtype=np.float32)
        pooled = np.full((len(self.anatomies), self.dims[1]), np.nan, dtype=np.float32)
        for a, anatomy in enumerate(self.anatomies):
            self._pooled.clear()
            feat = self.scorer.anatomy_feature(image, mask, anatomy)
            if feat is not None:
                projected[a] = feat.float().cpu().numpy()
                pooled[a] = self._pooled[-1][0].float().cpu().numpy()
        return projected, pooled, ~np.isnan(projected[:, 0])


def read_name_list(path: Path, flag: str) -> set[str]:
    """The VolumeNames listed one per line in ``path`` (a ``flag`` file); ``ZeroShotSetupError`` when it is missing."""
    if not path.is_file():
        raise ZeroShotSetupError(f"volume list not found: {path} (set {flag})")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def partial_path(path: Path) -> Path:
    return path.with_name(f".partial-{path.name}")


def volume_files(image_path: Path) -> np.ndarray:
    """(4,) int64: size and mtime (ns) of a processed image and its mask (``data.io.file_fingerprint``), what a
    rerun compares to reuse its features."""
    found = file_fingerprint([image_path, image_to_mask_path(image_path)])
    return np.asarray([v for f in found for v in (f or (-1, -1))], dtype=np.int64)


def compute_image_embeddings(extract: AnatomyFeatureExtractor, volumes: Sequence[Path], out_path: Path, *,
                             source: str, save_every: int = 50, progress: bool = True
                             ) -> tuple[ImageEmbeddings, list[tuple[str, str]], int]:
    """Features of ``volumes`` written to ``out_path`` (resumable, module docstring); (embeddings, failures, number
    of volumes computed by this call: 0 when ``out_path`` was reused as it was).

    A volume's features are reused only from a file of the same ``source`` (checkpoint path, size and mtime, data
    root, window) and when its image and mask have the size and mtime they had then."""
    out_path = Path(out_path)
    wanted = [volume_name(v) for v in volumes]
    files = {n: volume_files(v) for n, v in zip(wanted, volumes)}
    done: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    finished = None  # out_path, when it is from this source
    for previous in (out_path, partial_path(out_path)):
        if previous.is_file():
            old = ImageEmbeddings.load(previous)
            if old.source != source or old.anatomies != extract.anatomies:
                logger.warning("%s is from %s, not %s: recomputing", previous, old.source, source)
                continue
            same = [i for i, n in enumerate(old.names) if n in files and np.array_equal(old.files[i], files[n])]
            if len(same) < len(old.names):
                logger.info("%s: %d volume(s) changed since (size or mtime): recomputing them", previous,
                            len(old.names) - len(same))
            finished = old if previous == out_path and len(same) == len(old.names) else finished
            done.update({old.names[i]: (old.projected[i], old.pooled[i], old.present[i]) for i in same})
    todo = [(v, n) for v, n in zip(volumes, wanted) if n not in done]
    if finished is not None and list(finished.names) == wanted and not partial_path(out_path).is_file():
        return finished, [], 0  # nothing to add: the file stays as it is
    if len(done):
        logger.info("%s: %d volume(s) already embedded, %d to go", out_path, len(wanted) - len(todo), len(todo))

    def snapshot(names: Sequence[str]) -> ImageEmbeddings:
        a, e, c = len(extract.anatomies), *extract.dims
        rows = [done[n] for n in names]
        return ImageEmbeddings(list(names), extract.anatomies,
                               np.stack([r[0] for r in rows]) if rows else np.zeros((0, a, e), np.float32),
                               np.stack([r[1] for r in rows]) if rows else np.zeros((0, a, c), np.float32),
                               np.stack([r[2] for r in rows]) if rows else np.zeros((0, a), bool), source,
                               np.stack([files[n] for n in names]) if rows else np.zeros((0, 4), np.int64))

    failures: list[tuple[str, str]] = []
    for k, (path, name) in enumerate(tqdm(todo, desc="embed", disable=not progress), start=1):
        try:
            done[name] = extract(*read_case(path))
        except (VolumeReadError, OSError, ValueError) as exc:
            logger.warning("%s: %s", name, exc)
            failures.append((name, str(exc).replace("\n", " ")))
        if k % save_every == 0:
            snapshot(sorted(done)).save(partial_path(out_path))
    result = snapshot([n for n in wanted if n in done])
    result.save(out_path)
    partial_path(out_path).unlink(missing_ok=True)
    return result, failures, len(todo)


# ---------------------------------------------------------------------------- text side

def anatomy_texts(names: Sequence[str], anatomies: Sequence[str], desc_info: Mapping[str, Mapping[str, str]],
                  conc_info: Mapping[str, Mapping[str, str]]) -> list[list[str] | None]:
    """Per volume, the spec §3 text of each anatomy as encoded in training; None when its scan has no report."""
    out: list[list[str] | None] = []
    for name in names:
        scan = scan_id_of(name)
        if scan not in desc_info and scan not in conc_info:
            out.append(None)
            continue
        out.append([text_for_encoding(compose_anatomy_text(scan, a, desc_info, conc_info), a) for a in anatomies])
    return out


@torch.no_grad()
def encode_texts(encode: Callable[[list[str]], torch.Tensor], texts: Sequence[str], batch_size: int = 64,
                 progress: bool = False) -> np.ndarray:
    """(len(texts), E) float32 features, ``encode`` called on batches of distinct texts."""
    unique = list(dict.fromkeys(texts))
    feats = []
    for i in tqdm(range(0, len(unique), batch_size), desc="texts", disable=not progress):
        feats.append(encode(unique[i:i + batch_size]).float().cpu().numpy())
    table = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    position = {t: i for i, t in enumerate(unique)}
    return table[[position[t] for t in texts]]


# ---------------------------------------------------------------------------- shared CLI setup

@dataclass
class FeatureSetup:
    cfg: Preset
    anatomies: list[str]
    data_root: Path
    checkpoint: Path
    volumes: list[Path]
    extractor: AnatomyFeatureExtractor
    model: Any
    tokenizer: Any
    device: torch.device
    source: str  # identifies the features (ImageEmbeddings.source)


def setup_features(args: argparse.Namespace) -> FeatureSetup:
    """Preset, checkpoint, model and the split's processed volumes; ZeroShotSetupError names the flag to fix."""
    inputs = resolve_eval_inputs(args)
    cfg, pipe, roi, data_root, checkpoint, volumes = (inputs.preset, inputs.preset.pipeline, inputs.roi,
                                                      inputs.data_root, inputs.checkpoint, inputs.volumes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_eval_model(cfg, checkpoint, device)
    extractor = AnatomyFeatureExtractor(model, pipe.anatomy_names, roi, pipe.hu_window, device)
    size, mtime = file_fingerprint([checkpoint])[0]  # new weights at the same path are other features
    source = (f"{Path(checkpoint).resolve()} ({size} bytes, mtime {mtime} ns) on {Path(data_root).resolve()} "
              f"roi {list(roi)}")
    return FeatureSetup(cfg, pipe.anatomy_names, Path(data_root), Path(checkpoint), volumes, extractor, model,
                        tokenizer, device, source)
