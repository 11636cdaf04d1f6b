"""fVLM: 3D ViT + BERT towers, anatomy-wise pooling, projections and temperature (spec §4).

Attribute names are the release's checkpoint names (``visual_encoder``, ``text_encoder``,
``text_proj``, ``vision_projs``, ``query_tokens``, ``attention``, ``temp``); inside the ViT the
names follow timm/MAE and ``utils/checkpoint.py`` translates them (spec §6).

Anatomy pooling: the visual tokens of anatomy ``a`` in a sample are the patches whose mask
contains ``a`` (3D max-pool of the binary mask, kernel = stride = patch). Keys/values are
those tokens taken from the four ViT levels concatenated (``4L`` keys, the token mask
repeated 4x); the query is ``query_tokens[a]``; one shared ``nn.MultiheadAttention``; the
output goes through ``vision_projs[a]`` and is L2-normalised.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.vit3d import VisionTransformer3D

logger = logging.getLogger(__name__)

def anatomy_token_masks(mask: torch.Tensor, n_anatomies: int, patch_size: Sequence[int]) -> torch.Tensor:
    """mask (B, D, H, W) integer anatomy ids -> (B, A, L) bool, L = flattened (d, h, w) grid.

    Token ``l`` belongs to anatomy ``a`` (id ``a + 1``) when any voxel of its patch has that id:
    the 3D max-pool of the binary mask with kernel = stride = patch, > 0 (floor mode, like
    the Conv3d patch embedding).
    """
    b, dd, hh, ww = mask.shape
    pd, ph, pw = (int(p) for p in patch_size)
    d, h, w = dd // pd, hh // ph, ww // pw
    mask = mask[:, : d * pd, : h * ph, : w * pw]
    out = mask.new_zeros((b, n_anatomies, d * h * w), dtype=torch.bool)
    for a in range(n_anatomies):  # one bool pass per anatomy: no (B, A, D, H, W) float tensor
        hit = (mask == a + 1).view(b, d, pd, h, ph, w, pw)
        out[:, a] = hit.any(dim=6).any(dim=4).any(dim=2).reshape(b, -1)
    return out


class FVLM(nn.Module):
    """fVLM model (spec §4).

    Args:
        visual_encoder: ``VisionTransformer3D`` returning four levels (B, L, C).
        text_encoder: ``transformers.BertModel`` (no pooler); [CLS] of its last layer is used.
        n_anatomies: number of anatomies A (ids 1..A in the masks).
        proj_dim: joint embedding size (256).
        temp_init: initial temperature (0.07).
        pool_heads, pool_dropout: the shared pooling ``nn.MultiheadAttention`` (4 heads, 0.1).
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer3D,
        text_encoder: nn.Module,
        *,
        n_anatomies: int,
        proj_dim: int = 256,
        temp_init: float = 0.07,
        pool_heads: int = 4,
        pool_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dim = visual_encoder.embed_dim
        self.n_anatomies = int(n_anatomies)
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, proj_dim)
        self.vision_projs = nn.ModuleList([nn.Linear(dim, proj_dim) for _ in range(self.n_anatomies)])
        self.query_tokens = nn.Parameter(torch.zeros(self.n_anatomies, dim))
        self.attention = nn.MultiheadAttention(dim, pool_heads, dropout=pool_dropout, batch_first=True)
        self.temp = nn.Parameter(torch.tensor(float(temp_init)))

    # ------------------------------------------------------------------ image side
    def anatomy_token_masks(self, mask: torch.Tensor, n_anatomies: int | None = None) -> torch.Tensor:
        """mask (B, D, H, W) anatomy ids -> (B, A, L) bool token masks (see module function)."""
        return anatomy_token_masks(mask, n_anatomies or self.n_anatomies, self.visual_encoder.patch_size)

    def encode_image(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """image (B, 1, D, H, W), mask (B, D, H, W) -> (4 levels (B, L, C), token masks (B, A, L))."""
        levels = self.visual_encoder(image)
        return levels, self.anatomy_token_masks(mask)

    def pool_anatomies(
        self,
        levels: Sequence[torch.Tensor],
        token_mask: torch.Tensor,
        anatomy_idx: torch.Tensor,
        sample_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Pooled, projected, L2-normalised features of P distinct (sample, anatomy) pairs.

        levels: 4 x (B, L, C); token_mask (P, L) bool (tokens of the pair's anatomy);
        anatomy_idx, sample_idx (P,) long. Returns (P, proj_dim).

        One batched attention call for the whole batch: each sample's 4L keys/values are
        projected once, and sample b gets one query per anatomy (A queries) with a per-query
        attention mask, which is exactly the per-pair attention over that pair's tokens.
        Queries of pairs not requested attend to everything and are discarded.
        """
        if token_mask.shape[0] == 0:
            return levels[-1].new_zeros((0, self.text_proj.out_features))
        if not bool(token_mask.any(dim=1).all()):
            raise ValueError("a (sample, anatomy) pair has no visual token (its anatomy is absent from the mask)")
        kv = torch.cat(list(levels), dim=1)  # [B, 4L, C]
        b, n_levels = kv.shape[0], len(levels)
        n_anat = self.n_anatomies
        allowed = token_mask.new_ones((b, n_anat, token_mask.shape[1]))  # [B, A, L]; unused rows: all keys
        allowed[sample_idx, anatomy_idx] = token_mask
        blocked = ~allowed.repeat(1, 1, n_levels)  # [B, A, 4L], True = not attended
        blocked = blocked.repeat_interleave(self.attention.num_heads, dim=0)  # [B*heads, A, 4L]
        query = self.query_tokens.to(kv.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, A, C]
        pooled, _ = self.attention(query, kv, kv, attn_mask=blocked, need_weights=False)  # [B, A, C]
        pooled = pooled[sample_idx, anatomy_idx]  # [P, C]
        out = pooled.new_empty((pooled.shape[0], self.text_proj.out_features))
        for a in torch.unique(anatomy_idx).tolist():  # loop over anatomies (A is small), not samples
            sel = anatomy_idx == a
            out[sel] = self.vision_projs[a](pooled[sel])
        return F.normalize(out, dim=-1)

    def encode_anatomy_window(
        self, image: torch.Tensor, anatomy_mask: torch.Tensor, anatomy_idx: int
    ) -> torch.Tensor:
        """Zero-shot helper (spec §7): encode windows and pool one anatomy.

        image (B, 1, D, H, W) float in [0, 1], any (D, H, W) that is a multiple of the patch
        (position embeddings are interpolated to its grid); anatomy_mask (B, D, H, W) binary
        (non-zero = the anatomy); anatomy_idx: 0-based anatomy index (mask id - 1), selecting
        the query and projection. Returns (B, proj_dim) L2-normalised features. Call under
        ``torch.no_grad()`` and ``model.eval()``.
        """
        levels = self.visual_encoder(image)
        token_mask = anatomy_token_masks((anatomy_mask > 0).to(torch.uint8), 1, self.visual_encoder.patch_size)[:, 0]
        b = image.shape[0]
        sample_idx = torch.arange(b, device=image.device)
        anat = torch.full((b,), int(anatomy_idx), dtype=torch.long, device=image.device)
        return self.pool_anatomies(levels, token_mask, anat, sample_idx)

    # ------------------------------------------------------------------ text side
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids + mask -> (N, proj_dim): [CLS] of the last layer -> text_proj -> normalise."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def encode_texts(
        self, texts: Sequence[str], tokenizer: Any, max_length: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Encode strings -> (N, proj_dim). Each distinct text is encoded once, the batch is padded
        to its longest text (truncated at ``max_length`` tokens); equal to per-text padding to
        ``max_length`` up to float error."""
        if device is None:
            device = self.text_proj.weight.device
        if len(texts) == 0:
            return self.text_proj.weight.new_zeros((0, self.text_proj.out_features))
        unique = list(dict.fromkeys(texts))
        position = {t: i for i, t in enumerate(unique)}
        enc = tokenizer(unique, padding="longest", truncation=True, max_length=int(max_length), return_tensors="pt")
        feats = self.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # [U, 256]
        index = torch.tensor([position[t] for t in texts], dtype=torch.long, device=feats.device)
        return feats[index]  # [N, 256]

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def clamp_temp(self, min_value: float = 0.001, max_value: float = 0.5) -> None:
        """Clamp ``temp`` in place to [min_value, max_value] (call before each optimiser step)."""
        self.temp.clamp_(min_value, max_value)

    def forward_train(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        texts: Sequence[Sequence[str]],
        text_hash: torch.Tensor,
        usable: torch.Tensor,
        abnormal: torch.Tensor,
        *,
        tokenizer: Any,
        max_length: int,
    ) -> dict[str, torch.Tensor]:
        """Everything the loss needs for the P usable (sample, anatomy) pairs of a batch.

        image (B, 1, D, H, W), mask (B, D, H, W), texts [B][A] the texts to encode (spec §5: a
        normal text without its template, see ``data.texts.text_for_encoding``), text_hash (B, A)
        int64 hashes of the raw texts (they define which texts are identical), usable and
        abnormal (B, A) bool. Returns image_feats, text_feats (P, proj_dim), anatomy_idx,
        sample_idx (P,) long, abnormal (P,) bool, text_hash (P,) int64.
        """
        levels, token_masks = self.encode_image(image, mask)  # [B, L, C] x4, [B, A, L]
        sample_idx, anatomy_idx = usable.to(token_masks.device).bool().nonzero(as_tuple=True)  # [P], [P]
        image_feats = self.pool_anatomies(levels, token_masks[sample_idx, anatomy_idx], anatomy_idx, sample_idx)
        pair_texts = [texts[s][a] for s, a in zip(sample_idx.tolist(), anatomy_idx.tolist())]
        text_feats = self.encode_texts(pair_texts, tokenizer, max_length, device=image_feats.device)
        return {
            "image_feats": image_feats,
            "text_feats": text_feats,
            "anatomy_idx": anatomy_idx,
            "sample_idx": sample_idx,
            "abnormal": abnormal.to(image_feats.device).bool()[sample_idx, anatomy_idx],
            "text_hash": text_hash.to(image_feats.device)[sample_idx, anatomy_idx],
        }

