"""3D ViT: shapes, the four levels, position-embedding resampling, layer settings (spec §4)."""
import pytest
import torch
from torch import nn

from models.vit3d import VisionTransformer3D, resample_pos_embed_3d


def tiny_vit(**kw) -> VisionTransformer3D:
    args = dict(img_size=(16, 16, 24), patch_size=(8, 8, 8), embed_dim=32, depth=4, num_heads=2,
                 out_indices=(0, 1, 2))
    args.update(kw)
    return VisionTransformer3D(**args)


def test_levels_shapes_and_values():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    x = torch.rand(2, 1, 16, 16, 24)
    levels = vit(x)
    assert vit.native_grid == (2, 2, 3) and vit.grid_size((16, 16, 24)) == (2, 2, 3)
    assert len(levels) == 4 and all(t.shape == (2, 12, 32) for t in levels)
    with torch.no_grad():  # manual pass: token order = flattened (d, h, w) conv grid
        tok = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed
        ref = []
        for i, blk in enumerate(vit.blocks):
            tok = blk(tok)
            if i in (0, 1, 2):
                ref.append(tok)
        ref.append(vit.norm(tok))
        conv = vit.patch_embed.proj(x)  # [B, C, d, h, w]
        assert torch.equal(conv[:, :, 1, 0, 2], conv.flatten(2).transpose(1, 2)[:, 1 * 6 + 0 * 3 + 2])
    for a, b in zip(levels, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(levels[2], levels[3])  # levels 1-3 are not normed


def test_default_paper_shapes_without_forward():
    vit = VisionTransformer3D(depth=1, out_indices=(0,))  # ViT-B width, one block: only shapes, no forward
    assert vit.native_grid == (7, 16, 11)
    assert vit.pos_embed.shape == (1, 1232, 768)
    assert vit.patch_embed.proj.kernel_size == (16, 16, 32) and vit.patch_embed.proj.stride == (16, 16, 32)


def test_layer_settings():
    vit = tiny_vit(drop_rate=0.1, attn_drop_rate=0.1)
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m.eps == 1e-5 for m in norms)
    gelus = [m for m in vit.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 4 and all(m.approximate == "none" for m in gelus)
    assert vit.pos_drop.p == 0.1
    for blk in vit.blocks:
        assert blk.attn.fused_attn  # timm's F.scaled_dot_product_attention path
        assert blk.attn.qkv.bias is not None
        assert blk.attn.attn_drop.p == 0.1 and blk.attn.proj_drop.p == 0.1
        assert blk.mlp.drop1.p == 0.1 and blk.mlp.drop2.p == 0.1
        assert blk.mlp.fc1.out_features == 4 * 32
    assert not hasattr(vit, "cls_token")
    assert 0 < vit.pos_embed.std() < 0.05


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    vit = tiny_vit(drop_rate=0.5, attn_drop_rate=0.5)
    x = torch.rand(1, 1, 16, 16, 24)
    vit.train()
    assert not torch.allclose(vit(x)[-1], vit(x)[-1])
    vit.eval()
    torch.testing.assert_close(vit(x)[-1], vit(x)[-1])


def test_pos_embed_resample():
    pos = torch.randn(1, 2 * 3 * 4, 8)
    assert resample_pos_embed_3d(pos, (2, 3, 4), (2, 3, 4)) is pos
    out = resample_pos_embed_3d(pos, (4, 6, 5), (2, 3, 4))
    assert out.shape == (1, 120, 8)
    const = torch.ones(1, 24, 8) * 3.0
    torch.testing.assert_close(resample_pos_embed_3d(const, (3, 5, 7), (2, 3, 4)), torch.full((1, 105, 8), 3.0))
    # an exact 2x upsampling of a table constant along H and W keeps the D profile's end values
    prof = torch.arange(2.0).view(1, 2, 1, 1, 1).expand(1, 2, 3, 4, 8).reshape(1, 24, 8)
    up = resample_pos_embed_3d(prof, (4, 3, 4), (2, 3, 4)).reshape(1, 4, 3, 4, 8)
    torch.testing.assert_close(up[0, :, 0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    with pytest.raises(ValueError):
        resample_pos_embed_3d(pos, (1, 1, 1), (2, 2, 2))


def test_other_grid_forward():
    vit = tiny_vit().eval()
    levels = vit(torch.rand(1, 1, 24, 8, 16))  # grid (3, 1, 2)
    assert all(t.shape == (1, 6, 32) for t in levels)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    vit = tiny_vit(drop_rate=0.0, attn_drop_rate=0.0).train()
    x = torch.rand(2, 1, 16, 16, 24)
    sum(t.sum() for t in vit(x)).backward()
    ref = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    sum(t.sum() for t in vit(x)).backward()
    for g, p in zip(ref, vit.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
