"""Learning-rate schedule of the fVLM release (spec §6), as one pure function.

Epoch 0: linear warm-up by optimiser step from ``warmup_lr`` to ``lr`` over
``warmup_steps`` steps, then flat at ``lr``. Epochs >= 1: one value per epoch,
``(lr - min_lr) * 0.5 * (1 + cos(pi * epoch / epochs)) + min_lr``.

The learning rate applies to gradients that DDP has averaged over ranks; see
the note in ``configs/ctrate.yaml`` (``optim``) for what that means for this loss.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from utils.preset import OptimConfig


def lr_at(epoch: int, step_in_epoch: int, optim: OptimConfig) -> float:
    """Learning rate for optimiser step ``step_in_epoch`` (0-based) of ``epoch`` (0-based)
    from ``optim``'s ``lr``, ``min_lr``, ``warmup_lr``, ``warmup_steps`` and ``epochs``."""
    base, min_lr = optim.lr, optim.min_lr
    if epoch == 0:
        if optim.warmup_steps <= 0:
            return base
        return min(base, optim.warmup_lr + (base - optim.warmup_lr) * step_in_epoch / optim.warmup_steps)
    return (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / optim.epochs)) + min_lr


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (times an optional ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
