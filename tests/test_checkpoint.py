"""Checkpoints: MAE init, release key layout, atomic save / weights_only load, CXR-BERT directories."""
import json

import pytest
import torch
import torch.nn.functional as F

from models.fvlm import FVLM
from models.text_encoder import TextEncoderError, build_text_encoder, load_text_encoder
from models.vit3d import VisionTransformer3D
from tests.conftest import make_mae_file, make_tiny_bert
from utils.checkpoint import (
    RELEASE_RENAMES, CheckpointError, from_release_state_dict, load_checkpoint, load_mae_into_vit,
    load_model_state, save_checkpoint, to_release_state_dict,
)

TT = "text_encoder.embeddings.token_type_embeddings.weight"


def _tiny_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer3D(img_size=(16, 16, 24), patch_size=(8, 8, 8), embed_dim=32, depth=2, num_heads=2,
                              out_indices=(0, 0, 1))
    bert, _ = build_text_encoder(make_tiny_bert(tmp_path / "bert"), pretrained=False)
    return FVLM(vit, bert, n_anatomies=2)


# ---------------------------------------------------------------- MAE
@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mae") / "mae_pretrain_vit_base.pth"
    return path, make_mae_file(path)


def test_mae_loading_paper_shapes(mae_file):
    path, sd = mae_file
    vit = VisionTransformer3D()  # ViT-B: state dict only, no forward
    report = load_mae_into_vit(vit, path)
    own = vit.state_dict()
    block_keys = [k for k in sd if k.startswith("blocks.")]
    assert len(block_keys) == 12 * 12
    for k in block_keys + ["norm.weight", "norm.bias"]:
        assert torch.equal(own[k], sd[k]), k
    assert set(report["loaded"]) == set(block_keys) | {"norm.weight", "norm.bias", "pos_embed"}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "decoder_embed.weight"} <= set(report["skipped"])
    assert set(report["not_initialised"]) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    # spec §4: drop cls, 14x14 -> bilinear (align_corners=False) (16, 11), rows -> H, cols -> W, repeat 7x along D
    grid2d = sd["pos_embed"][0, 1:].reshape(14, 14, 768).permute(2, 0, 1)[None]
    resized = F.interpolate(grid2d, size=(16, 11), mode="bilinear", align_corners=False)[0]  # [C, 16, 11]
    pos = vit.pos_embed.detach().reshape(7, 16, 11, 768)
    for d in range(7):
        torch.testing.assert_close(pos[d], resized.permute(1, 2, 0))
    assert torch.equal(pos[3, 0, 0], resized[:, 0, 0])


def test_mae_missing_and_malformed(tmp_path):
    vit = VisionTransformer3D(img_size=(16, 16, 16), patch_size=(8, 8, 8), embed_dim=32, depth=1, num_heads=2,
                              out_indices=(0,))
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_mae_into_vit(vit, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_mae_into_vit(vit, bad)
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="not an MAE"):
        load_mae_into_vit(vit, bad)


# ---------------------------------------------------------------- release layout
def test_release_layout_round_trip_and_strict_load(tmp_path):
    model = _tiny_model(tmp_path, seed=0)
    sd = model.state_dict()
    rel = to_release_state_dict(sd)
    assert "visual_encoder.patch_embedding.patch_embeddings.weight" in rel
    assert "visual_encoder.patch_embedding.position_embeddings" in rel
    assert "visual_encoder.blocks.1.attn.out_proj.weight" in rel and "visual_encoder.blocks.0.mlp.linear2.bias" in rel
    assert not any(".attn.proj." in k or ".fc1." in k or "patch_embed." in k or "pos_embed" in k for k in rel)
    for key in ("query_tokens", "temp", "attention.in_proj_weight", "attention.out_proj.bias", "text_proj.weight",
                "vision_projs.1.weight", "visual_encoder.norm.weight", "visual_encoder.blocks.0.attn.qkv.bias",
                TT, "text_encoder.encoder.layer.1.output.dense.weight"):
        assert key in rel, key
    assert from_release_state_dict(rel).keys() == sd.keys()
    assert len(RELEASE_RENAMES) == 5
    # release extras that must be ignored; strict load into a fresh model reproduces every tensor
    rel["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    rel["text_encoder.cls.predictions.bias"] = torch.zeros(10)
    other = _tiny_model(tmp_path, seed=1)
    load_model_state(other, rel, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    rel["visual_encoder.something_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model_state(other, rel, strict=True)


def test_missing_token_type_embeddings_behave_as_zero(tmp_path):
    model = _tiny_model(tmp_path)
    rel = to_release_state_dict(model.state_dict())
    del rel[TT]
    load_model_state(model, rel, strict=True)
    assert torch.count_nonzero(model.text_encoder.embeddings.token_type_embeddings.weight) == 0


def test_save_and_load_checkpoint(tmp_path):
    model = _tiny_model(tmp_path)
    for p in model.text_encoder.embeddings.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.temp.grad = torch.tensor(1.0)
    opt.step()
    path = save_checkpoint(tmp_path / "out" / "checkpoint_0.pth", model=model, optimizer=opt, epoch=0,
                           config={"model": {"embed_dim": 32}, "crop": [16, 16, 24]},
                           extra={"rng_cpu": torch.get_rng_state(), "step": 7})
    assert path.is_file() and not list(path.parent.glob(".tmp-*"))
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["epoch"] == 0 and ckpt["step"] == 7 and ckpt["config"]["crop"] == [16, 16, 24]
    assert not any(k.startswith("text_encoder.embeddings.") for k in ckpt["model"])  # frozen: left out
    assert "visual_encoder.patch_embedding.position_embeddings" in ckpt["model"]
    other = _tiny_model(tmp_path, seed=3)
    for p in other.text_encoder.embeddings.parameters():
        p.requires_grad_(False)
    load_model_state(other, ckpt, strict=True)
    torch.testing.assert_close(other.visual_encoder.pos_embed, model.visual_encoder.pos_embed)
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-4)
    opt2.load_state_dict(ckpt["optimizer"])
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(_tiny_model(tmp_path), ckpt, strict=True)  # not frozen there: a real gap
    with pytest.raises(CheckpointError, match="checkpoint_9"):
        load_checkpoint(tmp_path / "checkpoint_9.pth")


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    import argparse
    path = tmp_path / "release_style.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, path)  # the release pickles its args
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


# ---------------------------------------------------------------- text encoder directories
def test_cxr_bert_format_directory_loads_offline(tmp_path):
    plain = make_tiny_bert(tmp_path / "plain", with_weights=True)
    ref, tok_ref = load_text_encoder(plain)  # plain local BERT dir
    cxr = make_tiny_bert(tmp_path / "cxr")
    cfg = json.loads((cxr / "config.json").read_text())
    cfg.update(model_type="cxr-bert", architectures=["CXRBertModel"], projection_size=16,
               auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                         "AutoModel": "modeling_cxrbert.CXRBertModel"})
    (cxr / "config.json").write_text(json.dumps(cfg))
    sd = {"bert." + k: v for k, v in ref.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(64)[None]
    sd["cls.predictions.bias"] = torch.zeros(cfg["vocab_size"])
    sd["cls_projection_head.dense_to_hidden.weight"] = torch.zeros(32, 32)
    torch.save(sd, cxr / "pytorch_model.bin")
    model, tok = load_text_encoder(cxr)
    ref.eval(), model.eval()
    enc = tok(["pleural effusion in the left lower lobe.", "lung"], padding="longest", return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0])[:3] == ["[CLS]", "pleural", "effusion"]
    with torch.no_grad():
        a = model(**enc).last_hidden_state[:, 0]
        b = ref(**enc).last_hidden_state[:, 0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a missing encoder weight is reported by name
    del sd["bert.encoder.layer.1.output.dense.weight"]
    torch.save(sd, cxr / "pytorch_model.bin")
    with pytest.raises(TextEncoderError, match="encoder.layer.1.output.dense.weight"):
        load_text_encoder(cxr)


def test_text_encoder_missing_files(tmp_path):
    with pytest.raises(TextEncoderError, match="BiomedVLP-CXR-BERT-specialized"):
        load_text_encoder(tmp_path / "absent")
    d = make_tiny_bert(tmp_path / "noweights")
    with pytest.raises(TextEncoderError, match="pytorch_model.bin"):
        load_text_encoder(d)
    model, tok = build_text_encoder(d, pretrained=False)  # random init from config is fine
    assert model.config.hidden_size == 32 and tok.vocab_size > 10
