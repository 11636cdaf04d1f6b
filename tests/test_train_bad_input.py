"""train.py on bad input and unlucky runs (issue 30 #3, #4, #8, #10, #13; issue 26 §5): each fault fed as a user
would meet it, then the message, the exit status and what is on disk are checked."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train
from tests.conftest import make_train_bert
from tests.test_bad_input import errors
from tests.test_train import setup  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the run under ``folder``: (content, mtime_ns); not the lock, which records its holder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def epochs_in(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def run(cfg: Path, *extra: str) -> int:
    return train.main(["--config", str(cfg), *extra])


# ---------------------------------------------------------------------------- 30#3 divergence

def test_lr_1e30_stops_without_saving_the_blown_up_weights(setup, caplog):
    """One step per epoch: epoch 0 runs at the warm-up LR (good), epoch 1's update at 1e30 blows the weights up;
    they are not saved and the message names checkpoint_0 as the last good one."""
    tmp, cfg = setup
    caplog.set_level(logging.INFO)
    assert run(cfg, "--batch-size", "6", "--epochs", "3", "optim.lr=1e30") == 1
    out = tmp / "out"
    assert sorted(p.name for p in out.glob("checkpoint_*")) == ["checkpoint_0.pth"]
    message = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR][-1]
    assert "epoch 1" in message and f"Last good checkpoint: {out / 'checkpoint_0.pth'}" in message
    assert epochs_in(out / "log.txt") == [0]
    model = load_checkpoint(out / "checkpoint_0.pth")["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_saved_temp_is_within_its_cap(setup):
    """An update of size ~1 moves temp 0.07 to ~1.07 or ~-0.93: the checkpoint holds it clamped (spec §4)."""
    tmp, cfg = setup
    assert run(cfg, "--batch-size", "6", "--epochs", "1", "optim.lr=1.0", "optim.warmup_lr=1.0") == 0
    temp = load_checkpoint(tmp / "out" / "checkpoint_0.pth")["model"]["temp"].item()
    assert temp in (pytest.approx(0.001), pytest.approx(0.5))


# ---------------------------------------------------------------------------- 30#4, 30#13 report JSONs

def test_anatomy_keys_matching_no_anatomy_are_an_error(setup, capsys):
    tmp, cfg = setup
    conc = tmp / "data" / "conc_info.json"
    conc.write_text(json.dumps({s: {a.capitalize(): t for a, t in e.items()}
                                for s, e in json.loads(conc.read_text()).items()}))
    assert run(cfg) == 2
    (line,) = errors(capsys)
    assert str(conc) in line and "'Lung'" in line and "match no anatomy" in line and "desc_info" not in line
    assert not (tmp / "out").exists()


def test_report_entries_of_the_wrong_type_are_an_error(setup, capsys):
    tmp, cfg = setup
    desc = tmp / "data" / "desc_info.json"
    info = json.loads(desc.read_text())
    info["train_0_a"]["lung"] = ["The lung is seen"]
    info["train_1_a"] = "The heart is seen"
    desc.write_text(json.dumps(info))
    assert run(cfg) == 2
    (line,) = errors(capsys)
    assert "1 texts are not strings, e.g. 'train_0_a'/'lung': list" in line
    assert "1 scan entries are not {anatomy: text} mappings, e.g. 'train_1_a': str" in line
    assert not (tmp / "out").exists()


# ---------------------------------------------------------------------------- 30#8, 26§5 resume

def test_resume_with_another_data_root_or_global_batch_is_refused(setup, capsys):
    tmp, cfg = setup
    assert run(cfg, "--epochs", "1") == 0
    shutil.copytree(tmp / "data", tmp / "data2")
    before = snapshot(tmp / "out")
    assert run(cfg, "--resume", "--epochs", "2", "--data-root", str(tmp / "data2")) == 2
    assert run(cfg, "--resume", "--epochs", "2", "--batch-size", "3") == 2
    root_line, batch_line = errors(capsys)
    assert f"--data-root is {tmp / 'data2'}, the checkpoint was trained on {tmp / 'data'}" in root_line
    assert "global batch is 3 (3 per process x 1 accum x 1 processes), the checkpoint's 2" in batch_line
    assert "--resume-changed" in root_line and "--resume-changed" in batch_line
    assert snapshot(tmp / "out") == before
    assert run(cfg, "--epochs", "2", "--resume-changed") == 2
    assert errors(capsys) == ["--resume-changed goes with --resume"]
    # said explicitly: it continues, config.yaml still records what the run started with
    assert run(cfg, "--resume", "--epochs", "2", "--batch-size", "3", "--resume-changed") == 0
    assert (tmp / "out" / "config.yaml").read_bytes() == before["config.yaml"][0]
    assert yaml.safe_load(before["config.yaml"][0])["optim"]["batch_size"] == 2
    ckpt = load_checkpoint(tmp / "out" / "checkpoint_1.pth")
    assert ckpt["config"]["optim"]["batch_size"] == 3 and ckpt["world_size"] == 1


def test_resume_of_a_finished_run_has_nothing_to_do(setup, caplog):
    tmp, cfg = setup
    assert run(cfg) == 0
    shutil.copytree(tmp / "data", tmp / "data2")
    before = snapshot(tmp / "out")
    caplog.set_level(logging.INFO)
    assert run(cfg, "--resume", "--data-root", str(tmp / "data2")) == 0
    assert "is epoch 1 of 2: nothing to do" in caplog.text
    assert snapshot(tmp / "out") == before


def test_checkpoint_without_optimiser_state_is_an_error(setup, capsys):
    tmp, cfg = setup
    assert run(cfg, "--epochs", "1") == 0
    path = tmp / "out" / "checkpoint_0.pth"
    ckpt = load_checkpoint(path)
    torch.save({"model": ckpt["model"], "epoch": 0}, path)  # a weights-only copy
    before = snapshot(tmp / "out")
    assert run(cfg, "--resume", "--epochs", "2") == 2
    (line,) = errors(capsys)
    assert str(path) in line and "no optimiser state" in line
    assert snapshot(tmp / "out") == before


# ---------------------------------------------------------------------------- 30#10, 30#13 logs and kills

def test_kill_between_checkpoint_and_next_step_keeps_every_log_line(setup, monkeypatch):
    """Killed right after checkpoint_1 was written: log.txt still has epoch 1, once."""
    tmp, cfg = setup
    real = train.save_checkpoint

    def killed_after_saving(path, **kwargs):
        real(path, **kwargs)
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, "--epochs", "3")
    monkeypatch.undo()
    assert epochs_in(tmp / "out" / "log.txt") == [0, 1]
    assert run(cfg, "--epochs", "3", "--resume") == 0
    assert epochs_in(tmp / "out" / "log.txt") == [0, 1, 2]
    assert epochs_in(tmp / "out" / "log_steps.jsonl") == [0] * 3 + [1] * 3 + [2] * 3


def test_partial_last_line_of_the_step_log_does_not_block_resume(setup):
    tmp, cfg = setup
    assert run(cfg) == 0
    out = tmp / "out"
    (out / "checkpoint_1.pth").unlink()  # killed while writing epoch 1's step log
    with open(out / "log_steps.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 3, "lo')
    assert run(cfg, "--resume") == 0
    assert epochs_in(out / "log_steps.jsonl") == [0] * 3 + [1] * 3
    assert epochs_in(out / "log.txt") == [0, 1]


def test_truncated_volume_mid_epoch_then_the_same_command_runs(setup, capsys):
    """A cut-short cache file stops the run with one line; once it is fixed, the same command starts over
    (the run had no checkpoint yet: only its config.yaml and step log were there)."""
    tmp, cfg = setup
    image = next((tmp / "data" / "processed_train_images").rglob("train_0_a_1.nii"))
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    assert run(cfg, "--epochs", "1") == 2
    (line,) = errors(capsys)
    assert str(image) in line and "epoch 0" in line and "same command" in line
    assert not list((tmp / "out").glob("checkpoint_*"))
    image.write_bytes(good)
    assert run(cfg, "--epochs", "1") == 0
    assert epochs_in(tmp / "out" / "log.txt") == [0]
    assert epochs_in(tmp / "out" / "log_steps.jsonl") == [0] * 3


# ---------------------------------------------------------------------------- 30#13 unreadable inputs

def test_random_bytes_as_mae_weights(setup, capsys):
    tmp, cfg = setup
    mae = tmp / "mae_pretrain_vit_base.pth"
    mae.write_bytes(os.urandom(4096))
    assert run(cfg, "--mae-weights", str(mae)) == 2
    (line,) = errors(capsys)
    assert f"cannot read MAE weights {mae}" in line and "--mae-weights" in line
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("broken", ["vocab.txt", "model.safetensors"])
def test_broken_text_encoder_file(setup, capsys, broken):
    tmp, cfg = setup
    bert = tmp / "bert"
    make_train_bert(bert)  # with weights: model.text_pretrained=true reads them
    from transformers import BertConfig, BertModel
    BertModel(BertConfig.from_pretrained(bert), add_pooling_layer=False).save_pretrained(bert)
    (bert / broken).write_bytes(b"\x8b\xff" + os.urandom(512))
    assert run(cfg, "model.text_pretrained=true") == 2
    (line,) = errors(capsys)
    assert str(bert) in line and "cannot read the" in line
    assert not (tmp / "out").exists()


def test_output_dir_that_is_a_file(setup, capsys):
    tmp, cfg = setup
    (tmp / "out").write_text("notes")
    assert run(cfg) == 2
    (line,) = errors(capsys)
    assert f"output directory {tmp / 'out'} is a file" in line
    assert (tmp / "out").read_text() == "notes"


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def train_under_mount(mount: str, cfg: Path, then: str = "true") -> subprocess.CompletedProcess:
    """``train.py --config cfg`` in a user+mount namespace after ``mount``; stdout ends with ``rc=N`` and ``then``'s."""
    script = f"{mount} && {sys.executable} {REPO / 'train.py'} --config {cfg}; echo rc=$?; {then}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a tiny tmpfs")
def test_full_disk_while_saving_a_checkpoint(setup):
    """The output directory on a 256 kB tmpfs: config and logs fit, the checkpoint does not."""
    tmp, cfg = setup
    out = tmp / "out"
    out.mkdir()
    r = train_under_mount(f"mount -t tmpfs -o size=256k tmpfs {out}", cfg, f"ls -A {out}")
    lines = r.stdout.split()
    assert "rc=2" in lines, r.stderr[-2000:]
    assert sorted(lines[lines.index("rc=2") + 1:]) == [".train.lock", "config.yaml", "log.txt", "log_steps.jsonl"]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("train: error: ")]
    assert f"cannot write checkpoint {out / 'checkpoint_0.pth'}: No space left on device" in line


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount")
def test_read_only_output_dir(setup):
    """A read-only mount (permissions would not stop root)."""
    tmp, cfg = setup
    out = tmp / "out"
    out.mkdir()
    r = train_under_mount(f"mount --bind {out} {out} && mount -o remount,ro,bind {out}", cfg)
    assert "rc=2" in r.stdout.split(), r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("train: error: ")]
    assert f"cannot write to {out} (Read-only file system)" in line
    assert not any(out.iterdir())


# ---------------------------------------------------------------------------- 26§5 retention, logs

def test_keep_checkpoints(setup, capsys):
    tmp, cfg = setup
    assert run(cfg, "--keep-checkpoints", "0") == 2
    assert "--keep-checkpoints 0" in errors(capsys)[0]
    assert run(cfg, "--keep-checkpoints", "1") == 0
    assert sorted(p.name for p in (tmp / "out").glob("checkpoint_*")) == ["checkpoint_1.pth"]
    # the checkpoint resumed from stays while this process runs
    assert run(cfg, "--resume", "--epochs", "4", "--keep-checkpoints", "1") == 0
    assert sorted(p.name for p in (tmp / "out").glob("checkpoint_*")) == ["checkpoint_1.pth", "checkpoint_3.pth"]


def test_mae_initialisation_logs_counts_not_keys(setup, caplog):
    """An MAE-format file for the tiny ViT (32 wide, 3 blocks): the log gives counts, not every key."""
    tmp, cfg = setup
    from models.vit3d import VisionTransformer3D
    vit = VisionTransformer3D(img_size=(8, 16, 16), patch_size=(4, 8, 8), embed_dim=32, depth=3, num_heads=2,
                              out_indices=(0, 1, 2))
    sd = {k: v for k, v in vit.state_dict().items() if k.startswith(("blocks.", "norm."))}
    sd["pos_embed"] = torch.zeros(1, 1 + 14 * 14, 32)
    mae = tmp / "mae_pretrain_vit_base.pth"
    torch.save({"model": sd}, mae)
    caplog.set_level(logging.INFO)
    assert run(cfg, "--mae-weights", str(mae), "--epochs", "1") == 0
    assert f"MAE init from {mae}: loaded {len(sd)} tensors" in caplog.text
    assert "blocks.0.attn.qkv.weight" not in caplog.text


@pytest.mark.slow
def test_importing_the_model_shows_no_timm_jit_warning():
    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import models.vit3d"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
