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
from tests.conftest import TRAIN_ANATOMIES, make_mae_file, make_tiny_preset, make_train_bert, make_train_cache
from utils.checkpoint import from_release_state_dict, load_checkpoint
from utils.preset import load_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup(tmp_path):
    make_train_cache(tmp_path / "data", 6)
    make_train_bert(tmp_path / "bert")
    return tmp_path, make_tiny_preset(tmp_path)


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
        calls["n"] += self.training  # the end-of-epoch check runs in eval mode
        if self.training and calls["n"] > 3:  # 3 steps per epoch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(engine.TrainStep, "forward", nan_in_epoch_1)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1.*checkpoint_0\.pth"):
        _run(cfg)
    assert (tmp / "out" / "checkpoint_0.pth").is_file() and not (tmp / "out" / "checkpoint_1.pth").exists()


def test_preset_mae_weights_are_used_without_the_flag(setup, capsys):
    """No --mae-weights: the preset's paths.mae_weights (issue 26: an absent flag was read as 'none' and the ViT
    started from random weights without a word); a missing file is in the start-up check; 'none' still means none."""
    tmp, cfg = setup
    mae = tmp / "mae_pretrain_vit_base.pth"
    preset = yaml.safe_load(cfg.read_text())
    preset["paths"]["mae_weights"] = str(mae)
    cfg.write_text(yaml.safe_dump(preset))
    assert train.main(["--config", str(cfg), "--max-steps", "1"]) == 2
    assert f"train: error: cannot start: MAE weights {mae} not found: set --mae-weights" in capsys.readouterr().err
    assert not (tmp / "out").exists()

    assert train.main(["--config", str(cfg), "--max-steps", "1", "--mae-weights", "none"]) == 0
    assert yaml.safe_load((tmp / "out" / "config.yaml").read_text())["paths"]["mae_weights"] is None

    sd = make_mae_file(mae, embed_dim=32, depth=3, num_heads=2, img_size=32)
    assert train.main(["--config", str(cfg), "--max-steps", "1", "--output-dir", str(tmp / "mae")]) == 0
    assert yaml.safe_load((tmp / "mae" / "config.yaml").read_text())["paths"]["mae_weights"] == str(mae)
    vit = from_release_state_dict(load_checkpoint(tmp / "mae" / "checkpoint_0.pth")["model"])
    blocks = [k for k in sd if k.startswith("blocks.")]
    assert len(blocks) == 3 * 12
    for k in blocks:  # one step at warmup_lr 1e-5 moves a weight by at most ~1e-5; random init: ~1e-2 away
        torch.testing.assert_close(vit["visual_encoder." + k], sd[k], rtol=0, atol=2e-5, msg=k)


def test_max_steps_stops_with_that_epochs_checkpoint(setup, capsys):
    tmp, cfg = setup  # 6 scans, batch 2: 3 steps per epoch, 2 epochs
    assert train.main(["--config", str(cfg), "--max-steps", "4"]) == 0
    assert sorted(p.name for p in (tmp / "out").glob("checkpoint_*.pth")) == ["checkpoint_0.pth", "checkpoint_1.pth"]
    steps = [json.loads(line) for line in (tmp / "out" / "log_steps.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert load_checkpoint(tmp / "out" / "checkpoint_1.pth")["epoch"] == 1

    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "one"), "optim.max_steps=1"]) == 0
    assert [p.name for p in (tmp / "one").glob("checkpoint_*.pth")] == ["checkpoint_0.pth"]
    assert len((tmp / "one" / "log_steps.jsonl").read_text().splitlines()) == 1

    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "zero"), "--max-steps", "0"]) == 2
    assert "optim.max_steps must be >= 1" in capsys.readouterr().err and not (tmp / "zero").exists()


@pytest.mark.slow
def test_short_run_lowers_loss(tmp_path):
    """~100 steps (~2-4 min on 2 busy cores): the contrastive loss leaves its initial plateau (ln N)."""
    make_train_cache(tmp_path / "data", 16, seed=1)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path, model={"patch_size": [2, 4, 4], "drop_rate": 0.0, "attn_drop_rate": 0.0},
                      epochs=50, batch_size=8, warmup_steps=3, lr=1e-3)
    _run(cfg)
    epochs = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(epochs) == 50
    # the total sums the anatomies not skipped (varies per step): compare per-anatomy means
    per_anatomy = [np.mean([e[f"loss_{a}"] for a in TRAIN_ANATOMIES if f"loss_{a}" in e]) for e in epochs]
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
    assert "torch.jit.interface" not in r.stderr
    # every rank resumes from rank 0's checkpoint
    cmd[cmd.index("--epochs") + 1] = "2"
    r = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting epoch 1" in r.stderr and len((tmp / "out" / "log_steps.jsonl").read_text().splitlines()) == 6
    # one process: another global batch (1 x 1 x 1, the checkpoint's 1 x 1 x 2), refused
    assert train.main(["--config", str(cfg), "--epochs", "3", "--batch-size", "1", "--resume"]) == 2


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
