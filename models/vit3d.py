"""3D Vision Transformer image encoder of fVLM (spec §4).

Shapes: an image batch is ``(B, C, D, H, W)`` with ``(D, H, W) = (z, y, x)``; tokens are
``(B, L, C)`` with ``L = d * h * w`` in the flattened ``(d, h, w)`` order of the Conv3d output
grid. No cls token.

Module names follow timm/MAE (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.proj``,
``blocks.N.mlp.fc1``...), so MAE ImageNet weights load 1:1; ``utils/checkpoint.py`` translates
them to the release's key layout (spec §6). The transformer blocks are timm's ``Block``
(pre-norm; attention through ``F.scaled_dot_product_attention``), built with PyTorch's
``nn.LayerNorm`` (eps 1e-5, not timm's 1e-6) and exact (erf) GELU.

Dropout (``drop_rate``) sits after the position-embedding add, after the attention output
projection, and in the MLP after the GELU and after the second linear; ``attn_drop_rate``
applies to the attention weights.
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

with warnings.catch_warnings():  # timm's import uses torch.jit.interface, which torch deprecates: not ours to act on
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.*", category=FutureWarning)
    from timm.models.vision_transformer import Block

logger = logging.getLogger(__name__)


def resample_pos_embed_3d(
    pos: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int]
) -> torch.Tensor:
    """Trilinearly resample a (1, L_old, C) position table to ``new_grid`` -> (1, L_new, C).

    Token order is the flattened ``(d, h, w)`` grid on both sides. Returns ``pos`` itself when
    the grids are equal. Interpolates in float32 (``align_corners=False``) and casts back.
    """
    new_grid, old_grid = tuple(int(g) for g in new_grid), tuple(int(g) for g in old_grid)
    if new_grid == old_grid:
        return pos
    n, length, dim = pos.shape
    if length != old_grid[0] * old_grid[1] * old_grid[2]:
        raise ValueError(f"position table has {length} tokens, not a {old_grid} grid")
    grid = pos.float().reshape(n, *old_grid, dim).permute(0, 4, 1, 2, 3)  # [1, C, d, h, w]
    grid = F.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)
    out = grid.permute(0, 2, 3, 4, 1).reshape(n, -1, dim).to(pos.dtype)  # [1, L_new, C]
    logger.debug("resampled position embeddings %s -> %s", old_grid, new_grid)
    return out


class VisionTransformer3D(nn.Module):
    """3D ViT returning four token levels (spec §4).

    Args:
        img_size: native crop ``(D, H, W)``; fixes the learnable position table's grid.
        patch_size: Conv3d kernel = stride ``(pd, ph, pw)``.
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        drop_rate: dropout after the position add, the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        out_indices: 0-based blocks whose (un-normed) outputs are returned before the final norm.
        grad_checkpointing: recompute each block in backward (training only).
    """

    def __init__(
        self,
        *,
        img_size: Sequence[int] = (112, 256, 352),
        patch_size: Sequence[int] = (16, 16, 32),
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.1,
        attn_drop_rate: float = 0.1,
        out_indices: Sequence[int] = (3, 6, 9),
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = tuple(int(s) for s in img_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.out_indices = tuple(int(i) for i in out_indices)
        if any(not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} outside 0..{depth - 1}")
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.native_grid = self.grid_size(self.img_size)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        n_tokens = self.native_grid[0] * self.native_grid[1] * self.native_grid[2]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, act_layer=nn.GELU, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """pos_embed and Linear weights trunc-normal(0.02), biases 0, LayerNorm (1, 0);
        the Conv3d keeps PyTorch's default init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid_size(self, spatial_dhw: Sequence[int]) -> tuple[int, int, int]:
        """Token grid ``(d, h, w)`` of an input of spatial size ``(D, H, W)`` (floor division)."""
        d, h, w = (int(s) // p for s, p in zip(spatial_dhw, self.patch_size))
        return d, h, w

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, D, H, W) -> [level_1, level_2, level_3, final], each (B, L, C).

        Levels 1-3 are the un-normed outputs of blocks ``out_indices``; the last is the final
        LayerNorm output. Any input whose size is a multiple of the patch works; the position
        table is resampled trilinearly when its grid differs from the native one.
        """
        x = self.patch_embed.proj(x)  # [B, C, d, h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, L, C]
        x = x + resample_pos_embed_3d(self.pos_embed, grid, self.native_grid)
        x = self.pos_drop(x)
        levels = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            levels.extend(x for j in self.out_indices if j == i)
        levels.append(self.norm(x))
        return levels
