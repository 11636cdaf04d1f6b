"""Anatomy-wise contrastive loss with false-negative calibration (spec §5).

For each anatomy ``o``, over the global batch (all ranks): rows = usable (sample, o) pairs;
logits ``v tᵀ / temp`` (image->text) and ``t vᵀ / temp`` (text->image); targets 1 on the
diagonal and where both pairs are normal or their raw texts are identical (equal text hashes),
each row divided by its sum; ``loss_o = ½ (softCE(i2t) + softCE(t2i))``, mean over rows.
``o`` is skipped when no pair is abnormal, when all targets are equal, or when this rank has no
pair of ``o`` of its own. Total = sum of ``loss_o`` over the anatomies not skipped.

Distributed design (``world_size > 1``): every rank gathers the features of all ranks
(counts all-gathered, features padded to the largest count, all-gathered, unpadded), puts its
own local tensors back into its slot (so only they carry gradient, as in open_clip's
``gather_features``) and computes the loss over ALL global rows (not open_clip's
``local_loss``). Hence:

- each rank's loss value equals the single-process loss of the concatenated global batch;
- d(loss_r)/d(local features of r) = d(L_global)/d(those features), because the gathered
  copies of other ranks are constants; summed over ranks this is the full global-batch
  gradient, and DDP's averaging turns it into ``1/world_size`` x the single-process gradient
  for every parameter upstream of the features;
- ``temp`` enters every rank's loss in full, so each rank's ``temp`` gradient is already the
  single-process one and DDP's average keeps it unchanged.

The ``local_loss`` alternative (local rows x global columns, no gradient to gathered columns)
gives neither the global loss value nor the full gradient. The two properties hold exactly
when every non-skipped anatomy has at least one pair on every rank (a rank without a pair of
``o`` skips it, spec §5, so its value and its ``temp`` gradient miss ``loss_o``).
Memory: (global pairs of o)² logits per anatomy, a few KB at batch 56.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def gather_rows(
    feats: torch.Tensor, meta: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather (P_r, 2E) features and (P_r, 3) int64 metadata of all ranks.

    Returns (global feats with this rank's rows = the local tensor, global meta,
    (N,) bool "row is local")."""
    if not _dist_ready(world_size):
        return feats, meta, torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    n = torch.tensor([feats.shape[0]], dtype=torch.int64, device=feats.device)
    counts_t = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(counts_t, n)
    counts = [int(c.item()) for c in counts_t]
    m = max(counts)
    if m == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=feats.device)
        return feats, meta, empty
    pad_f = feats.new_zeros((m, feats.shape[1]))
    pad_f[: feats.shape[0]] = feats.detach()
    pad_m = meta.new_zeros((m, meta.shape[1]))
    pad_m[: meta.shape[0]] = meta
    all_f = [torch.zeros_like(pad_f) for _ in range(world_size)]
    all_m = [torch.zeros_like(pad_m) for _ in range(world_size)]
    dist.all_gather(all_f, pad_f)
    dist.all_gather(all_m, pad_m)
    all_f[rank] = feats  # the local slice keeps its gradient
    g_feats = torch.cat([f[:c] for f, c in zip(all_f, counts)])
    g_meta = torch.cat([x[:c] for x, c in zip(all_m, counts)])
    local = torch.cat([torch.full((c,), r == rank, dtype=torch.bool, device=feats.device)
                       for r, c in enumerate(counts)])
    return g_feats, g_meta, local


def soft_targets(positive: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, N) symmetric bool "pair j is a positive of row i" -> targets, each row divided by its sum.

    As the mask is symmetric, row j of the result is also the target of text row j (t2i)."""
    targets = positive.to(dtype)
    return targets / targets.sum(dim=1, keepdim=True)


def soft_clip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``½ (softCE(logits, targets) + softCE(logitsᵀ, targets))``, each the mean over rows of
    ``-Σ_j targets_ij log_softmax(row i)_j``; ``targets`` from :func:`soft_targets`."""
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


class AnatomyContrastiveLoss(nn.Module):
    """Spec §5 loss. ``rank``/``world_size`` come from the caller (no global lookups in forward).

    forward(image_feats (P, E), text_feats (P, E), anatomy_idx (P,) long 0-based, abnormal (P,)
    bool, text_hash (P,) int64 of the raw texts, temp scalar tensor, n_anatomies) ->
    ``{"loss": scalar, "loss_{name}": detached scalar for each anatomy not skipped}``
    (name = ``anatomy_names[o]`` when given, else ``o``). P may be 0 (the rank still joins
    the collectives). When every anatomy is skipped, ``loss`` is a zero connected to the inputs.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, anatomy_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.anatomy_names = list(anatomy_names) if anatomy_names is not None else None

    def _name(self, o: int) -> str:
        return self.anatomy_names[o] if self.anatomy_names is not None else str(o)

    def forward(
        self,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        anatomy_idx: torch.Tensor,
        abnormal: torch.Tensor,
        text_hash: torch.Tensor,
        temp: torch.Tensor,
        n_anatomies: int,
    ) -> dict[str, torch.Tensor]:
        """See the class docstring. Runs in float32 with autocast disabled (logits / temp
        and log-softmax in bf16 would lose the precision the soft targets need)."""
        with torch.autocast(device_type=image_feats.device.type, enabled=False):
            image_feats, text_feats, temp = image_feats.float(), text_feats.float(), temp.float()
            dim = image_feats.shape[1]
            feats = torch.cat([image_feats, text_feats], dim=1)  # [P, 2E]
            meta = torch.stack([anatomy_idx.long(), abnormal.long(), text_hash.long()], dim=1)  # [P, 3]
            g_feats, g_meta, local = gather_rows(feats, meta, self.rank, self.world_size)  # [N, 2E], [N, 3], [N]
            g_anat, g_abn, g_hash = g_meta[:, 0], g_meta[:, 1].bool(), g_meta[:, 2]

            # zero that keeps backward (and DDP's all-reduce) alive when everything is skipped
            total = 0.0 * (image_feats.sum() + text_feats.sum()) + 0.0 * temp
            out: dict[str, torch.Tensor] = {}
            for o in range(int(n_anatomies)):
                sel = g_anat == o
                if not bool((sel & g_abn).any()) or not bool((sel & local).any()):
                    continue
                v, t = g_feats[sel, :dim], g_feats[sel, dim:]  # [N_o, E]
                abn, h = g_abn[sel], g_hash[sel]
                normal = ~abn
                n_o = v.shape[0]
                positive = (torch.eye(n_o, dtype=torch.bool, device=v.device)
                            | (normal[:, None] & normal[None, :]) | (h[:, None] == h[None, :]))
                if bool(positive.all()):
                    continue  # all targets equal: nothing to contrast
                logits = v @ t.T / temp  # [N_o, N_o] image -> text
                loss_o = soft_clip_loss(logits, soft_targets(positive, v.dtype))
                out[f"loss_{self._name(o)}"] = loss_o.detach()
                total = total + loss_o
            out["loss"] = total
            return out
