"""FVLM: anatomy token masks, batched pooling == per-pair loop, text dedupe/padding, template stripping."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.fvlm import FVLM, anatomy_token_masks
from models.text_encoder import build_text_encoder
from models.vit3d import VisionTransformer3D
from tests.conftest import REPO_ROOT as REPO, make_tiny_bert



def tiny_fvlm(tmp_path: Path, n_anatomies: int = 3) -> tuple[FVLM, object]:
    torch.manual_seed(0)
    vit = VisionTransformer3D(img_size=(16, 16, 24), patch_size=(8, 8, 8), embed_dim=32, depth=2, num_heads=2,
                              out_indices=(0, 0, 1))
    bert, tok = build_text_encoder(make_tiny_bert(tmp_path / "bert"), pretrained=False)
    model = FVLM(vit, bert, n_anatomies=n_anatomies)
    with torch.no_grad():
        model.query_tokens.normal_()  # zero queries make every attention uniform: test something sharper
    return model, tok


def test_token_masks_equal_max_pool():
    torch.manual_seed(0)
    mask = torch.randint(0, 4, (2, 16, 16, 24), dtype=torch.uint8)
    mask[mask > 0] = torch.where(torch.rand(int((mask > 0).sum())) < 0.9, 0, mask[mask > 0]).to(torch.uint8)
    out = anatomy_token_masks(mask, 3, (8, 8, 8))
    assert out.shape == (2, 3, 2 * 2 * 3) and out.dtype == torch.bool
    for a in range(3):
        ref = F.max_pool3d((mask == a + 1).float()[:, None], kernel_size=8, stride=8)[:, 0] > 0
        assert torch.equal(out[:, a], ref.flatten(1))


def test_attribute_names_and_init(tmp_path):
    model, _ = tiny_fvlm(tmp_path)
    assert model.query_tokens.shape == (3, 32)
    assert len(model.vision_projs) == 3 and model.vision_projs[0].out_features == 256
    assert model.text_proj.in_features == 32 and model.text_proj.out_features == 256
    assert model.attention.num_heads == 4 and model.attention.dropout == 0.1 and model.attention.batch_first
    assert model.temp.detach().item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(3.0)
    model.clamp_temp(0.001, 0.5)
    assert model.temp.detach().item() == 0.5


def _per_pair(model: FVLM, levels, token_masks, s: int, a: int) -> torch.Tensor:
    keys = torch.cat([lv[s] for lv in levels], dim=0)  # [4L, C]
    sel = token_masks[s, a].repeat(len(levels))  # [4L]
    kv = keys[sel][None]
    out, _ = model.attention(model.query_tokens[a][None, None], kv, kv)
    return F.normalize(model.vision_projs[a](out[0, 0]), dim=-1)


def test_pooling_batched_equals_per_pair_loop(tmp_path):
    model, _ = tiny_fvlm(tmp_path)
    model.eval()
    torch.manual_seed(1)
    image = torch.rand(3, 1, 16, 16, 24)
    mask = torch.zeros(3, 16, 16, 24, dtype=torch.uint8)
    mask[:, 2:10, 0:12, 0:9] = 1
    mask[0, 12:16, 8:16, 12:24] = 2
    mask[1, 0:4, 0:4, 20:24] = 2
    mask[2, 9:11, 9:11, 9:11] = 3
    mask[0, 0:16, 15, 23] = 3
    with torch.no_grad():
        levels, tm = model.encode_image(image, mask)
        usable = tm.any(dim=2)
        usable[1, 0] = False  # a present but unusable pair is left out
        s_idx, a_idx = usable.nonzero(as_tuple=True)
        batched = model.pool_anatomies(levels, tm[s_idx, a_idx], a_idx, s_idx)
        loop = torch.stack([_per_pair(model, levels, tm, s, a) for s, a in zip(s_idx.tolist(), a_idx.tolist())])
    assert batched.shape == (len(s_idx), 256)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(s_idx)))


def test_pooling_gradients_flow(tmp_path):
    model, _ = tiny_fvlm(tmp_path)
    image = torch.rand(2, 1, 16, 16, 24)
    mask = torch.zeros(2, 16, 16, 24, dtype=torch.uint8)
    mask[:, :8] = 1
    levels, tm = model.encode_image(image, mask)
    s_idx, a_idx = tm.any(dim=2).nonzero(as_tuple=True)
    model.pool_anatomies(levels, tm[s_idx, a_idx], a_idx, s_idx).sum().backward()
    assert model.query_tokens.grad is not None and model.vision_projs[0].weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError):
        model.pool_anatomies(levels, torch.zeros(1, 12, dtype=torch.bool), a_idx[:1], s_idx[:1])


def test_encode_anatomy_window_other_grid(tmp_path):
    model, _ = tiny_fvlm(tmp_path)
    model.eval()
    image = torch.rand(1, 1, 24, 32, 16)  # grid (3, 4, 2) != native (2, 2, 3)
    amask = torch.zeros(1, 24, 32, 16, dtype=torch.uint8)
    amask[0, 3:12, 5:20, 2:9] = 1
    with torch.no_grad():
        feat = model.encode_anatomy_window(image, amask, 2)
        levels, _ = model.encode_image(image, amask)
        tm = anatomy_token_masks(amask, 1, (8, 8, 8))  # id 1 -> treat as anatomy 3 below
        tm3 = torch.zeros(1, 3, tm.shape[2], dtype=torch.bool)
        tm3[:, 2] = tm[:, 0]
        ref = _per_pair(model, levels, tm3, 0, 2)
    assert feat.shape == (1, 256)
    torch.testing.assert_close(feat[0], ref, atol=1e-5, rtol=0)


def test_encode_texts_dedupe_equals_pad_to_max(tmp_path):
    model, tok = tiny_fvlm(tmp_path)
    model.eval()
    texts = ["lung shows no significant abnormalities.", "Pleural effusion in the left lower lobe.",
             "lung shows no significant abnormalities.", "nodule", "heart shows cardiomegaly and effusion " * 8]
    with torch.no_grad():
        fast = model.encode_texts(texts, tok, max_length=48)
        ref = []
        for t in texts:
            enc = tok([t], padding="max_length", truncation=True, max_length=48, return_tensors="pt")
            assert enc["input_ids"].shape[1] == 48
            ref.append(model.encode_text(enc["input_ids"], enc["attention_mask"])[0])
    torch.testing.assert_close(fast, torch.stack(ref), atol=1e-5, rtol=0)
    assert torch.equal(fast[0], fast[2])
    assert model.encode_texts([], tok, 48).shape == (0, 256)


def test_forward_train_selects_usable_pairs(tmp_path):
    from data.texts import text_for_encoding, text_hash
    names = ["lung", "heart", "aorta"]
    model, tok = tiny_fvlm(tmp_path)
    model.eval()
    raw = [["lung shows no significant abnormalities.", "heart shows no significant abnormalities.Small effusion.",
            "aorta calcification."],
           ["lung nodule.", "heart shows no significant abnormalities.", "aorta shows no significant abnormalities."]]
    texts = [[text_for_encoding(t, n) for t, n in zip(row, names)] for row in raw]
    hashes = torch.tensor([[text_hash(t) for t in row] for row in raw])
    usable = torch.tensor([[True, True, True], [True, False, True]])
    abnormal = torch.tensor([[False, False, True], [True, False, False]])
    mask = torch.zeros(2, 16, 16, 24, dtype=torch.uint8)
    mask[:, 0:8, 0:8] = 1
    mask[:, 8:16, 0:8] = 2
    mask[:, 8:16, 8:16] = 3
    with torch.no_grad():
        out = model.forward_train(torch.rand(2, 1, 16, 16, 24), mask, texts, hashes, usable, abnormal,
                                  tokenizer=tok, max_length=32)
        pairs = list(zip(out["sample_idx"].tolist(), out["anatomy_idx"].tolist()))
        assert pairs == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]
        encoded = [texts[s][a] for s, a in pairs]
        assert encoded[1] == "Small effusion." and encoded[0] == "lung shows no significant abnormalities."
        torch.testing.assert_close(out["text_feats"], model.encode_texts(encoded, tok, 32), atol=1e-6, rtol=0)
    assert out["text_hash"].tolist() == [text_hash(raw[s][a]) for s, a in pairs]
    assert out["abnormal"].tolist() == [False, False, True, True, False]
    assert out["image_feats"].shape == (5, 256)


def test_text_encoder_weights_come_from_one_decision(tmp_path):
    """models.builder's table: the directory's weights at training start when pretrained, and from a
    checkpoint only when frozen (frozen weights are not saved); a frozen random BERT is refused."""
    from dataclasses import replace

    from models.builder import build_model, text_weights_from_directory
    from utils.preset import load_preset

    demo = load_preset(REPO / "configs" / "demo.yaml").model  # pretrained + frozen
    trained = replace(demo, freeze_text_encoder=False)
    scratch = replace(trained, text_pretrained=False)
    assert [text_weights_from_directory(m, from_checkpoint=False) for m in (demo, trained, scratch)] == [True, True, False]
    assert [text_weights_from_directory(m, from_checkpoint=True) for m in (demo, trained, scratch)] == [True, False, False]
    with pytest.raises(ValueError, match="text_pretrained"):
        replace(demo, text_pretrained=False)

    bert = make_tiny_bert(tmp_path / "bert", with_weights=True, seed=3)
    tiny = dict(patch_size=(8, 8, 8), embed_dim=32, depth=2, num_heads=2, out_indices=(0, 1))
    model, _ = build_model(replace(demo, **tiny), img_size=(16, 16, 24), n_anatomies=2, text_encoder_dir=bert)
    loaded = model.text_encoder.embeddings.word_embeddings.weight
    assert not loaded.requires_grad
    torch.manual_seed(0)
    model, _ = build_model(replace(scratch, **tiny), img_size=(16, 16, 24), n_anatomies=2, text_encoder_dir=bert)
    assert model.text_encoder.embeddings.word_embeddings.weight.requires_grad
    assert not torch.equal(model.text_encoder.embeddings.word_embeddings.weight, loaded)
