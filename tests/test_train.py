"""train.py end to end on a tiny fake processed cache: resume equivalence, non-finite loss,
missing paths, output-dir guard, a short run that lowers the loss, torchrun with 2 processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pretrain_text
import train
from data.dataset import CTRateTrainDataset
from tests.conftest import make_tiny_bert, write_cache_case
from utils.checkpoint import load_checkpoint
from utils.preset import load_preset

REPO = Path(__file__).resolve().parents[1]
NAMES = ["lung", "heart", "esophagus", "aorta"]
FINDINGS = ["Emphysema.", "Cardiomegaly.", "Hiatal hernia.", "Arterial wall calcification."]
SHAPE = (10, 20, 20)
# boxes inside every (8, 16, 16) crop of a (10, 20, 20) volume -> always usable
BOXES = [(slice(3, 7), slice(5, 10), slice(5, 10)), (slice(3, 7), slice(11, 15), slice(5, 10)),
         (slice(3, 7), slice(5, 10), slice(11, 15)), (slice(3, 7), slice(11, 15), slice(11, 15))]


def make_cache(root: Path, n_scans: int, seed: int = 0) -> Path:
    """Processed cache + desc/conc_info.json; abnormal anatomies are brighter."""
    rng = np.random.default_rng(seed)
    conc, desc = {}, {}
    for i in range(n_scans):
        scan = f"train_{i}_a"
        abnormal = rng.random(4) < 0.5
        conc[scan] = {a: f for a, f, ab in zip(NAMES, FINDINGS, abnormal) if ab}
        desc[scan] = {a: f"The {a} is seen" for a in NAMES}
        for r in range(1 + i % 2):
            image = rng.integers(-1100, -900, SHAPE).astype(np.int16)
            mask = np.zeros(SHAPE, np.uint8)
            for k, (box, ab) in enumerate(zip(BOXES, abnormal)):
                mask[box] = k + 1
                image[box] += 100 + 600 * int(ab)
            write_cache_case(root, "train", f"{scan}_{r + 1}.nii.gz", image, mask)
    (root / "conc_info.json").write_text(json.dumps(conc))
    (root / "desc_info.json").write_text(json.dumps(desc))
    return root


def make_bert(path: Path) -> Path:
    words = {w.strip(".").lower() for t in FINDINGS for w in t.split()}
    words |= {"the", "is", "seen", "shows", "no", "significant", "abnormalities", *NAMES}
    return make_tiny_bert(path, [".", *sorted(words)], vocab_size=64)


def make_config(tmp: Path, model: dict | None = None, **optim) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["pipeline_config"] = str(REPO / "configs" / "pipeline_demo.yaml")
    cfg["paths"].update(data_root=str(tmp / "data"), text_encoder=str(tmp / "bert"), mae_weights=None,
                        output_dir=str(tmp / "out"))
    cfg["data"].update(crop_size=[8, 16, 16], workers=0)
    cfg["model"].update(patch_size=[4, 8, 8], embed_dim=32, depth=3, num_heads=2, out_indices=[0, 1, 2],
                        text_max_length=32, text_pretrained=False, freeze_text_encoder=False)
    cfg["model"].update(model or {})
    cfg["optim"].update({"lr": 1e-3, "warmup_steps": 2, "epochs": 2, "batch_size": 2, **optim})
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def setup(tmp_path):
    make_cache(tmp_path / "data", 6)
    make_bert(tmp_path / "bert")
    return tmp_path, make_config(tmp_path)


def _run(cfg: Path, *extra: str) -> dict:
    return train.train(train.get_args_parser().parse_args(["--config", str(cfg), *extra]))


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_resume_equals_straight_run(setup):
    tmp, cfg = setup
    _run(cfg, "--output-dir", str(tmp / "a"))
    shutil.copytree(tmp / "a", tmp / "b")
    (tmp / "b" / "checkpoint_1.pth").unlink()  # killed during epoch 1
    _run(cfg, "--output-dir", str(tmp / "b"), "--resume")
    a, b = _weights(tmp / "a" / "checkpoint_1.pth"), _weights(tmp / "b" / "checkpoint_1.pth")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ckpt = load_checkpoint(tmp / "a" / "checkpoint_1.pth")
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "config"} <= set(ckpt)
    assert any(k.startswith("visual_encoder.patch_embedding.") for k in ckpt["model"])  # release layout
    steps = [json.loads(line) for line in (tmp / "a" / "log_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * 3 and {"loss", "lr", "temp", "samples_per_s"} <= set(steps[0])
    assert any(k.startswith("loss_") for k in steps[0])
    assert steps[0]["lr"] == pytest.approx(1e-5)  # demo warmup_lr, first step
    # 2 epochs on a fresh dir = same first epoch as the copied run (deterministic)
    assert (tmp / "a" / "config.yaml").is_file()


def test_refuses_non_empty_output_dir(setup):
    tmp, cfg = setup
    (tmp / "out").mkdir()
    (tmp / "out" / "x").write_text("")
    with pytest.raises(train.SetupError, match="--resume"):
        _run(cfg)
    assert train.main(["--config", str(cfg)]) == 2


def test_missing_paths_name_the_flag(setup, tmp_path):
    tmp, cfg = setup
    for flag in ("--data-root", "--text-encoder", "--mae-weights"):
        with pytest.raises(train.SetupError, match=flag):
            _run(cfg, flag, str(tmp_path / "nope"), "--output-dir", str(tmp / "o"))


def test_non_finite_loss_stops_and_keeps_checkpoint(setup, monkeypatch):
    tmp, cfg = setup
    import engine
    real = engine.TrainStep.forward
    calls = {"n": 0}

    def nan_in_epoch_1(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:  # 3 steps per epoch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(engine.TrainStep, "forward", nan_in_epoch_1)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1.*checkpoint_0\.pth"):
        _run(cfg)
    assert (tmp / "out" / "checkpoint_0.pth").is_file() and not (tmp / "out" / "checkpoint_1.pth").exists()


@pytest.mark.slow
def test_short_run_lowers_loss(tmp_path):
    """~100 steps (~2-4 min on 2 busy cores): the contrastive loss leaves its initial plateau (ln N)."""
    make_cache(tmp_path / "data", 16, seed=1)
    make_bert(tmp_path / "bert")
    cfg = make_config(tmp_path, model={"patch_size": [2, 4, 4], "drop_rate": 0.0, "attn_drop_rate": 0.0},
                      epochs=50, batch_size=8, warmup_steps=3, lr=1e-3)
    _run(cfg)
    epochs = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(epochs) == 50
    # the total sums the anatomies not skipped (varies per step): compare per-anatomy means
    per_anatomy = [np.mean([e[f"loss_{a}"] for a in NAMES if f"loss_{a}" in e]) for e in epochs]
    assert np.mean(per_anatomy[-5:]) < 0.9 * np.mean(per_anatomy[:5]), per_anatomy


@pytest.mark.slow
def test_torchrun_two_processes(setup):
    tmp, cfg = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(REPO / "train.py"), "--config", str(cfg), "--epochs", "1", "--batch-size", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "out" / "checkpoint_0.pth").is_file()
    steps = (tmp / "out" / "log_steps.jsonl").read_text().splitlines()
    assert len(steps) == 3  # 6 scans / (1 per rank x 2 ranks), logged by rank 0 only


def test_demo_preset_on_synthetic_pipeline(tmp_path):
    """Synthetic CT-RATE -> the four pipeline steps (demo config) -> text pre-training -> one epoch of
    configs/demo.yaml."""
    from data import fix_data, generate_mask, preprocess, resize
    from data.synthetic import generate_dataset
    root = tmp_path / "data"
    generate_dataset(root, n_train=4, n_valid=1, seed=0)
    common = ["--data-root", str(root), "--split", "train", "--config", "configs/pipeline_demo.yaml", "--no-pbar"]
    assert fix_data.main(common) == 0
    assert generate_mask.main([*common, "--masks-from", str(root / "totalseg_gt")]) == 0
    assert resize.main(common) == 0
    assert preprocess.main(common) == 0
    # The demo crop is tight around the phantoms' anatomies: none may be cut (unusable) by it.
    demo = load_preset(REPO / "configs" / "demo.yaml")
    ds = CTRateTrainDataset(root, anatomy_names=demo.pipeline.anatomy_names, crop_size=demo.data.crop_size, flip_prob=0.0,
                            split="train", seed=0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        assert all(bool(ds[i]["usable"].all()) for i in range(len(ds)))
    text = tmp_path / "text_encoder"
    assert pretrain_text.main(["--config", str(REPO / "configs" / "demo.yaml"), "--data-root", str(root),
                               "--text-encoder", str(text), "--no-pbar", "text_pretrain.epochs=1",
                               "text_pretrain.batch_size=4"]) == 0
    out = tmp_path / "out"
    rc = train.main(["--config", str(REPO / "configs" / "demo.yaml"), "--data-root", str(root),
                     "--text-encoder", str(text), "--output-dir", str(out), "--epochs", "1", "--batch-size", "2",
                     "--workers", "0"])
    assert rc == 0
    ckpt = load_checkpoint(out / "checkpoint_0.pth")
    assert ckpt["epoch"] == 0 and ckpt["config"]["data"]["crop_size"] == [40, 48, 72]
