"""The demo's chain is deterministic on one machine (issue 26 §2): the same seed and data give an
identical text encoder, checkpoint (model and optimiser) and prediction CSV.

A synthetic CT-RATE through the four data steps (demo pipeline), then twice, each time in fresh
processes as `make demo` runs them: pretrain_text.py -> one epoch of configs/demo.yaml (its
DataLoader worker included) -> eval.py. Across machines the demo's figures differ (floating-point
kernels): README, docs/demo-findings.md.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.synthetic import generate_dataset
from utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def _python(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{args[0]}: {r.stderr[-3000:]}"


def make_data(data: Path) -> Path:
    from data import fix_data, generate_mask, preprocess, resize
    generate_dataset(data, n_train=4, n_valid=2, seed=0)
    for split in ("train", "valid"):
        common = ["--data-root", str(data), "--split", split, "--config", "configs/pipeline_demo.yaml", "--no-pbar"]
        assert fix_data.main(common) == 0
        assert generate_mask.main([*common, "--masks-from", str(data / "totalseg_gt")]) == 0
        assert resize.main(common) == 0 and preprocess.main(common) == 0
    return data


def run_chain(data: Path, root: Path) -> Path:
    paths = ["--data-root", str(data), "--text-encoder", str(root / "text"), "--config", DEMO]
    _python("pretrain_text.py", *paths, "--no-pbar", "text_pretrain.epochs=1", "text_pretrain.batch_size=4")
    _python("train.py", *paths, "--output-dir", str(root / "out"), "--epochs", "1", "--batch-size", "2")
    _python("eval.py", *paths, "--output-dir", str(root / "out"), "--csv_file", str(root / "pred.csv"), "--no-pbar")
    return root


def _flat(tree, prefix=""):
    """Every tensor of a nested state (model / optimiser), with its path."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}/{i}")


@pytest.mark.slow
def test_same_seed_same_data_same_checkpoint_and_predictions(tmp_path):
    data = make_data(tmp_path / "ctrate")
    a, b = run_chain(data, tmp_path / "a"), run_chain(data, tmp_path / "b")
    text_a, text_b = (load_file(str(r / "text" / "model.safetensors")) for r in (a, b))
    assert text_a.keys() == text_b.keys() and all(torch.equal(text_a[k], text_b[k]) for k in text_a)
    ckpt_a, ckpt_b = (load_checkpoint(r / "out" / "checkpoint_0.pth") for r in (a, b))
    tensors_a, tensors_b = dict(_flat([ckpt_a["model"], ckpt_a["optimizer"]])), \
        dict(_flat([ckpt_b["model"], ckpt_b["optimizer"]]))
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) > 50
    assert [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])] == []
    assert ckpt_a["optimizer"]["state"], "the epoch made no optimiser step"
    assert (a / "pred.csv").read_bytes() == (b / "pred.csv").read_bytes()
    assert len((a / "pred.csv").read_text().splitlines()) > 2
