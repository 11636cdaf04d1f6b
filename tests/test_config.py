"""YAML presets, key=value overrides with type checks, resolved config saved."""
from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_presets_load():
    for name in ("ctrate.yaml", "demo.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert len(cfg["data"]["crop_size"]) == 3 and len(cfg["model"]["patch_size"]) == 3
        for c, p in zip(cfg["data"]["crop_size"], cfg["model"]["patch_size"]):
            assert c % p == 0
        assert max(cfg["model"]["out_indices"]) < cfg["model"]["depth"]


def test_release_values():
    cfg = load_config(REPO / "configs" / "ctrate.yaml")
    assert cfg["data"]["crop_size"] == [112, 256, 352] and cfg["model"]["patch_size"] == [16, 16, 32]
    o = cfg["optim"]
    assert (o["lr"], o["warmup_lr"], o["warmup_steps"], o["epochs"], o["batch_size"]) == (1e-4, 1e-6, 377, 20, 14)
    assert o["weight_decay"] == 0.01 and o["betas"] == [0.9, 0.999] and o["amp"] == "none"
    assert cfg["model"]["text_max_length"] == 384 and cfg["seed"] == 42


def test_overrides_types():
    cfg = {"a": {"lr": 1e-4, "n": 3, "flag": True, "name": "x", "crop": [1, 2, 3], "opt": None}}
    out = apply_overrides(cfg, ["a.lr=3e-4", "a.n=5", "a.flag=false", "a.name=y", "a.crop=[4,5,6]", "a.opt=7"])
    assert out["a"] == {"lr": 3e-4, "n": 5, "flag": False, "name": "y", "crop": [4, 5, 6], "opt": 7}
    assert cfg["a"]["lr"] == 1e-4  # input untouched
    assert apply_overrides(cfg, ["a.lr=1"])["a"]["lr"] == 1.0 and isinstance(
        apply_overrides(cfg, ["a.lr=1"])["a"]["lr"], float)
    for bad in ["a.n=1.5", "a.n=abc", "a.flag=1", "a.crop=[1,x]", "a.lr=fast", "a.missing=1", "b.c=1", "nokey"]:
        with pytest.raises(ConfigError):
            apply_overrides(cfg, [bad])


def test_save_config(tmp_path):
    cfg = {"a": {"b": [1, 2]}, "c": "d"}
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text()) == cfg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")
