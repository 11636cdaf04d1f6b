"""Spec §6 schedule endpoints."""
import math

import pytest
import torch

from utils.lr_sched import apply_lr, lr_at
from utils.preset import OptimConfig

CFG = OptimConfig(lr=1e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=377, epochs=20, betas=(0.9, 0.999),
                  weight_decay=0.01, batch_size=14, accum_steps=1, amp="none")


def test_first_step():
    assert lr_at(0, 0, CFG) == pytest.approx(1e-6)


def test_warmup_midway_and_end():
    assert lr_at(0, 100, CFG) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 100 / 377)
    assert lr_at(0, 376, CFG) < 1e-4
    assert lr_at(0, 377, CFG) == pytest.approx(1e-4)
    assert lr_at(0, 900, CFG) == pytest.approx(1e-4)  # flat after warm-up


def test_epoch_one_and_last():
    e1 = (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 20)) + 1e-6
    assert lr_at(1, 0, CFG) == pytest.approx(e1)
    assert lr_at(1, 999, CFG) == pytest.approx(e1)  # constant within an epoch
    last = (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 19 / 20)) + 1e-6
    assert lr_at(19, 0, CFG) == pytest.approx(last)
    assert 1e-6 < last < 2e-6


def test_apply_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "lr_scale": 0.5}])
    apply_lr(opt, 3e-4)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[1]["lr"] == 1.5e-4
