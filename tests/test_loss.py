"""Spec §5 loss on hand-worked examples (world_size = 1)."""
import math

import pytest
import torch

from models.loss import AnatomyContrastiveLoss, soft_clip_loss, soft_targets

E3 = torch.eye(3)


def _inputs(rows):
    """rows: (anatomy, abnormal, hash, unit-vector index) -> loss inputs with v = t = e_k."""
    anat = torch.tensor([r[0] for r in rows])
    abn = torch.tensor([r[1] for r in rows])
    hashes = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    feats = torch.stack([E3[r[3]] for r in rows])
    return feats, anat, abn, hashes


def test_hand_worked_targets_and_value():
    rows = [
        # anatomy 0: two normals (targets share 1/2) + one abnormal
        (0, False, 11, 0), (0, False, 12, 1), (0, True, 13, 2),
        # anatomy 1: one normal + two abnormal with identical raw texts (same hash)
        (1, False, 21, 0), (1, True, 22, 1), (1, True, 22, 2),
        # anatomy 2: all normal -> skipped (no abnormal)
        (2, False, 31, 0), (2, False, 32, 1),
        # anatomy 3: two identical abnormal texts -> all targets equal -> skipped
        (3, True, 41, 0), (3, True, 41, 1),
    ]
    feats, anat, abn, hashes = _inputs(rows)
    temp = torch.tensor(1.0, requires_grad=True)
    out = AnatomyContrastiveLoss(anatomy_names=["lung", "heart", "esophagus", "aorta"])(
        feats, feats.clone(), anat, abn, hashes, temp, 4)
    # logits = I (temp 1); every row: log-softmax = [1, 0, 0] - lse with lse = log(e + 2).
    # anatomy 0 targets rows [.5,.5,0], [.5,.5,0], [0,0,1] -> CE (lse-.5), (lse-.5), (lse-1)
    # anatomy 1 targets rows [1,0,0], [0,.5,.5], [0,.5,.5] -> CE (lse-1), (lse-.5), (lse-.5)
    # t2i is identical (symmetric logits and targets); mean over rows = lse - 2/3 each.
    expected = math.log(math.e + 2) - 2 / 3
    assert set(out) == {"loss", "loss_lung", "loss_heart"}
    assert out["loss_lung"].item() == pytest.approx(expected, abs=1e-6)
    assert out["loss_heart"].item() == pytest.approx(expected, abs=1e-6)
    assert out["loss"].item() == pytest.approx(2 * expected, abs=1e-6)
    out["loss"].backward()
    assert temp.grad is not None


def test_asymmetric_logits_i2t_t2i_and_temperature():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    t = torch.nn.functional.normalize(torch.randn(4, 5), dim=1)
    anat = torch.zeros(4, dtype=torch.long)
    abn = torch.tensor([False, False, True, True])
    hashes = torch.tensor([1, 2, 3, 3])
    temp = torch.tensor(0.07)
    out = AnatomyContrastiveLoss()(v, t, anat, abn, hashes, temp, 1)
    tgt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float) / 2
    logits = v @ t.T / 0.07
    i2t = -(tgt * logits.log_softmax(1)).sum(1).mean()
    t2i = -(tgt * logits.T.log_softmax(1)).sum(1).mean()
    assert out["loss_0"].item() == pytest.approx(0.5 * (i2t + t2i).item(), rel=1e-6)


def test_all_skipped_gives_connected_zero():
    feats, anat, abn, hashes = _inputs([(0, False, 1, 0), (0, False, 2, 1), (1, True, 3, 2)])
    feats.requires_grad_(True)
    temp = torch.tensor(0.07, requires_grad=True)
    out = AnatomyContrastiveLoss()(feats, feats, anat, abn, hashes, temp, 2)
    assert set(out) == {"loss"} and out["loss"].item() == 0.0
    out["loss"].backward()  # still differentiable (DDP needs a backward on every rank)
    empty = torch.zeros(0, 3)
    out = AnatomyContrastiveLoss()(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                                   torch.zeros(0, dtype=torch.int64), temp, 2)
    assert out["loss"].item() == 0.0


def test_soft_clip_loss_hand_example():
    # logits [[2, 0], [1, 0]], identity targets.
    # i2t rows: -log softmax([2, 0])[0] = log(1 + e^-2); -log softmax([1, 0])[1] = log(1 + e).
    # t2i rows (logits^T = [[2, 1], [0, 0]]): log(1 + e^-1); log 2.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    want = 0.5 * ((math.log(1 + math.exp(-2)) + math.log(1 + math.e)) / 2
                  + (math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert soft_clip_loss(logits, soft_targets(torch.eye(2, dtype=torch.bool))).item() == pytest.approx(want)


def test_soft_targets_divide_each_row_by_its_positives():
    positive = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    want = torch.tensor([[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 2, 1 / 2]])
    torch.testing.assert_close(soft_targets(positive), want)
