"""Training step and epoch loop of fVLM pre-training (spec §3-6), called by train.py."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from data.dataset import model_inputs
from utils.distributed import all_reduce_mean, is_main_process
from utils.lr_sched import apply_lr, lr_at
from utils.preset import Preset

logger = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Model + loss as one module, so DDP sees the whole training forward in one call.

    forward(image (B,1,D,H,W), mask (B,D,H,W), texts [B][A] (to encode), text_hash (B,A),
    abnormal (B,A), usable (B,A)) -> the loss dict (``loss`` + per-anatomy ``loss_{name}``) and
    ``n_pairs``. Only the usable (sample, anatomy) pairs enter pooling, text encoding and the
    loss (``FVLM.forward_train``).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, tokenizer: Any, text_max_length: int) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.tokenizer = tokenizer
        self.text_max_length = int(text_max_length)

    def forward(self, image: torch.Tensor, mask: torch.Tensor, texts: list[list[str]], text_hash: torch.Tensor,
                abnormal: torch.Tensor, usable: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.model.forward_train(image, mask, texts, text_hash, usable, abnormal, tokenizer=self.tokenizer,
                                     max_length=self.text_max_length)
        out = self.loss_fn(f["image_feats"].float(), f["text_feats"].float(), f["anatomy_idx"], f["abnormal"],
                           f["text_hash"], self.model.temp, self.model.n_anatomies)
        out["n_pairs"] = torch.tensor(float(f["anatomy_idx"].numel()))
        return out


def _check_finite(loss: torch.Tensor, what: str, last_checkpoint: str | None) -> None:
    """``FloatingPointError`` (``what`` formatted with the loss) when ``loss`` is NaN or inf."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{what.format(value)}. Last good checkpoint: {last_checkpoint or 'none'} "
                                 "(lower optim.lr, or check the inputs of those scans)")


class ChunkedTrainStep(TrainStep):
    """The module ``GradCache`` runs (and DDP wraps) when the batch is encoded in chunks.

    ``features`` encodes a chunk (``FVLM.forward_train``). ``forward(chunk..., image_grad (P, E), text_grad
    (P, E), temp_grad scalar)`` encodes it again and returns ``Σ feats·image/text_grad + temp·temp_grad``, whose
    backward gives each parameter the loss's gradient through this chunk's features (and ``temp``): the towers
    and ``temp`` are inside the forward DDP sees, so it finds the unused parameters and syncs ``temp`` as usual.
    """

    def features(self, image: torch.Tensor, mask: torch.Tensor, texts: list[list[str]], text_hash: torch.Tensor,
                 abnormal: torch.Tensor, usable: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(image, mask, texts, text_hash, usable, abnormal, tokenizer=self.tokenizer,
                                        max_length=self.text_max_length)

    def forward(self, image: torch.Tensor, mask: torch.Tensor, texts: list[list[str]], text_hash: torch.Tensor,
                abnormal: torch.Tensor, usable: torch.Tensor, image_grad: torch.Tensor, text_grad: torch.Tensor,
                temp_grad: torch.Tensor) -> torch.Tensor:
        f = self.features(image, mask, texts, text_hash, abnormal, usable)
        with torch.autocast(device_type=image.device.type, enabled=False):  # the loss's float32 features
            return ((f["image_feats"].float() * image_grad).sum() + (f["text_feats"].float() * text_grad).sum()
                    + self.model.temp.float() * temp_grad)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class GradCache:
    """A training step with the batch encoded in chunks of ``chunk_size`` scans (gradient caching, Gao et al.
    2021): the loss and gradients of the whole batch in one pass, holding the activations of one chunk.

    ``step_module``: a (possibly DDP-wrapped) ``ChunkedTrainStep``. Use as ``TrainStep``, plus one call:
    ``out = grad_cache(image, mask, texts, text_hash, abnormal, usable)`` encodes every chunk without autograd,
    keeping its features and the random state it started from, and returns the loss over the whole (global:
    features gathered across ranks) batch, as ``TrainStep`` does, computed on detached copies of the features
    and ``temp``; ``out["loss"].backward()`` reaches only those copies; ``grad_cache.backward_chunks()`` then
    encodes each chunk again under its saved random state (the same dropout masks), under the same autocast,
    and backpropagates the copies' gradients into the parameters. Under DDP all chunks but the last run in
    ``no_sync``: gradients are all-reduced once (on the last chunk, when the caller syncs this step).
    Every chunk is encoded twice: a step costs one more forward than one pass.
    """

    def __init__(self, step_module: nn.Module, chunk_size: int) -> None:
        self.step_module = step_module
        self.is_ddp = isinstance(step_module, nn.parallel.DistributedDataParallel)
        self.step = step_module.module if self.is_ddp else step_module
        if not isinstance(self.step, ChunkedTrainStep):
            raise TypeError(f"GradCache needs a ChunkedTrainStep, got {type(self.step).__name__}")
        self.chunk_size = int(chunk_size)
        self._cache: dict[str, Any] | None = None

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, texts: list[list[str]], text_hash: torch.Tensor,
                 abnormal: torch.Tensor, usable: torch.Tensor) -> dict[str, torch.Tensor]:
        device = image.device
        chunks, rng_states, feats = [], [], []
        with torch.no_grad():
            for start in range(0, image.shape[0], self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                chunks.append((image[sl], mask[sl], texts[sl], text_hash[sl], abnormal[sl], usable[sl]))
                rng_states.append(_rng_state(device))
                feats.append(self.step.features(*chunks[-1]))
        image_feats = torch.cat([f["image_feats"].float() for f in feats]).requires_grad_()
        text_feats = torch.cat([f["text_feats"].float() for f in feats]).requires_grad_()
        temp = self.step.model.temp.detach().requires_grad_()
        out = self.step.loss_fn(image_feats, text_feats, *(torch.cat([f[k] for f in feats])
                                                           for k in ("anatomy_idx", "abnormal", "text_hash")),
                                temp, self.step.model.n_anatomies)
        out["n_pairs"] = torch.tensor(float(image_feats.shape[0]))
        self._cache = {"chunks": chunks, "rng_states": rng_states,
                       "n_pairs": [f["image_feats"].shape[0] for f in feats],
                       "image_feats": image_feats, "text_feats": text_feats, "temp": temp,
                       "autocast": (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))}
        return out

    def backward_chunks(self) -> None:
        """Backpropagate the gradients of the last call's loss into the parameters, chunk by chunk."""
        if self._cache is None:
            raise RuntimeError("GradCache.backward_chunks() without a step: call the GradCache and "
                               "backpropagate its loss first")
        cache, self._cache = self._cache, None
        image_grads = torch.split(_grad(cache["image_feats"]), cache["n_pairs"])
        text_grads = torch.split(_grad(cache["text_feats"]), cache["n_pairs"])
        temp_grad = _grad(cache["temp"])
        device = cache["image_feats"].device
        autocast_on, autocast_dtype = cache["autocast"]
        n = len(cache["chunks"])
        for k, (chunk, (cpu_state, cuda_state), image_grad, text_grad) in enumerate(
                zip(cache["chunks"], cache["rng_states"], image_grads, text_grads)):
            last = k == n - 1
            sync = contextlib.nullcontext() if (last or not self.is_ddp) else self.step_module.no_sync()
            with sync:
                # the chunk's first-pass random state, restored afterwards: the step leaves the
                # generators where the first pass left them
                with torch.random.fork_rng(devices=[device] if cuda_state is not None else [],
                                           device_type=device.type):
                    torch.set_rng_state(cpu_state)
                    if cuda_state is not None:
                        torch.cuda.set_rng_state(cuda_state, device)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_on):
                        surrogate = self.step_module(*chunk, image_grad, text_grad,
                                                     temp_grad if last else torch.zeros_like(temp_grad))
                surrogate.backward()


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient; zeros when the loss did not reach it (no pair of this rank contributed)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def train_one_epoch(
    step_module: nn.Module,
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    cfg: Preset,
    world_size: int,
    device: torch.device,
    log_path: Path | None = None,
    last_checkpoint: str | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """One epoch; returns the epoch means of the logged values.

    ``step_module`` is the (possibly DDP-wrapped) ``TrainStep``, a ``ChunkedTrainStep`` when
    ``optim.chunk_size`` is set (the batch is then encoded in chunks, ``GradCache``); ``model`` the unwrapped FVLM
    (temperature clamp); ``world_size`` the number of processes (for the samples/s figure).
    ``loader`` yields ``data.dataset.collate`` batches: their flips and HU scaling
    (``model_inputs``, window ``loader.dataset.hu_window``) run here, on ``device``.
    The LR is set per optimiser step from ``utils.lr_sched.lr_at``. ``max_steps``: stop after that many
    optimiser steps of this epoch (``--max-steps``).
    Raises ``FloatingPointError`` on a non-finite loss, before any update from that step, and when the
    epoch's final weights give a non-finite loss on its last batch (one forward, no update), so a
    diverged model is never returned for saving. The temperature is clamped after every update.
    """
    optim_cfg, model_cfg = cfg.optim, cfg.model
    accum = optim_cfg.accum_steps
    steps_per_epoch = len(loader) // accum if max_steps is None else min(len(loader) // accum, max_steps)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if optim_cfg.amp == "bf16" \
        else contextlib.nullcontext()
    is_ddp = isinstance(step_module, nn.parallel.DistributedDataParallel)
    grad_cache = GradCache(step_module, optim_cfg.chunk_size) if optim_cfg.chunk_size else None
    forward = step_module if grad_cache is None else grad_cache
    hu_window = loader.dataset.hu_window
    step_module.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    log_file = open(log_path, "a") if (log_path is not None and is_main_process()) else None
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True)
    t0 = time.perf_counter()
    step_stats: dict[str, float] = {}
    try:
        for it, batch in enumerate(loader):
            step = it // accum
            if step >= steps_per_epoch:
                break
            if it % accum == 0:
                lr = lr_at(epoch, step, optim_cfg)
                apply_lr(optimizer, lr)
                model.clamp_temp(model_cfg.temp_min, model_cfg.temp_max)
                step_stats = {}
            sync = (it + 1) % accum == 0
            ctx = step_module.no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
            image, mask = model_inputs(batch["hu"].to(device, non_blocking=True),
                                       batch["mask"].to(device, non_blocking=True), batch["flip"], hu_window)
            inputs = (image, mask, batch["texts"], batch["text_hash"], batch["abnormal"], batch["usable"])
            with ctx:
                with amp:
                    out = forward(*inputs)
                loss = out["loss"]
                _check_finite(loss, f"loss is {{}} at epoch {epoch}, step {step} (scans {batch['scan_id']}); "
                              "stopping without updating the weights", last_checkpoint)
                (loss / accum).backward()
                if grad_cache is not None:  # the towers' gradients, chunk by chunk
                    grad_cache.backward_chunks()
            for k, v in out.items():
                if k.startswith("loss") or k == "n_pairs":
                    step_stats[k] = step_stats.get(k, 0.0) + float(v.detach()) / accum
            if not sync:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_temp(model_cfg.temp_min, model_cfg.temp_max)  # what the next step would use, also if saved
            t1 = time.perf_counter()
            n_samples = len(batch["scan_id"]) * accum * world_size
            step_stats.update(lr=lr, temp=model.temp.item(), samples_per_s=n_samples / (t1 - t0))
            t0 = t1
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if log_file is not None:
                log_file.write(json.dumps({"epoch": epoch, "step": step, **step_stats}) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{step_stats['loss']:.4f}", lr=f"{lr:.2e}", temp=f"{step_stats['temp']:.4f}")
            bar.update(1)
        # the last update has not been through a forward yet: its weights become a checkpoint only if
        # they give a finite loss (a blown-up update can leave huge but finite weights)
        step_module.eval()
        with torch.no_grad(), amp:
            out = forward(*inputs)
        _check_finite(out["loss"], f"the weights after epoch {epoch} give a loss of {{}} on its last batch; "
                      "not saving them", last_checkpoint)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    # per-anatomy losses exist only on steps where the anatomy was not skipped, and ranks may
    # skip differently: average those locally; all-reduce only the keys every rank has
    stats = {k: v / counts[k] for k, v in sums.items()}
    for k in ("loss", "n_pairs", "samples_per_s"):
        stats[k] = all_reduce_mean(stats.get(k, 0.0))
    return stats

