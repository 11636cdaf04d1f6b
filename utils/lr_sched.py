"""Learning-rate schedule of the fVLM release (spec §6), as one pure function.

Epoch 0: linear warm-up by optimiser step from ``warmup_lr`` to ``lr`` over
``warmup_steps`` steps, then flat at ``lr``. Epochs >= 1: one value per epoch,
``(lr - min_lr) * 0.5 * (1 + cos(pi * epoch / epochs)) + min_lr``.

The learning rate applies to gradients that DDP has averaged over ranks; see
the note in ``configs/ctrate.yaml`` (``optim``) for what that means for this loss.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def lr_at(epoch: int, step_in_epoch: int, cfg: Mapping[str, Any]) -> float:
    """Learning rate for optimiser step ``step_in_epoch`` (0-based) of ``epoch`` (0-based).

    ``cfg`` holds ``lr``, ``min_lr``, ``warmup_lr``, ``warmup_steps`` and ``epochs``
    (the ``optim`` section of a preset).
    """
    base, min_lr, epochs = float(cfg["lr"]), float(cfg["min_lr"]), int(cfg["epochs"])
    if epoch == 0:
        warmup_steps = int(cfg["warmup_steps"])
        if warmup_steps <= 0:
            return base
        warmup_lr = float(cfg["warmup_lr"])
        return min(base, warmup_lr + (base - warmup_lr) * step_in_epoch / warmup_steps)
    return (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (times an optional ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
