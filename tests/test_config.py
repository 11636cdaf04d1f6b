"""Typed presets (utils/preset.py): YAML + flags + key=value overrides, casts, cross-file checks; saved config."""
from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, save_config
from utils.preset import load_preset

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def test_presets_load():
    for name in ("ctrate.yaml", "demo.yaml"):
        cfg = load_preset(REPO / "configs" / name)
        assert cfg.data.crop_size == cfg.pipeline.min_size_dhw  # both presets crop the padded size
        assert all(c % p == 0 for c, p in zip(cfg.data.crop_size, cfg.model.patch_size))


def test_release_values():
    cfg = load_preset(REPO / "configs" / "ctrate.yaml")
    assert cfg.data.crop_size == (112, 256, 352) and cfg.model.patch_size == (16, 16, 32)
    o = cfg.optim
    assert (o.lr, o.warmup_lr, o.warmup_steps, o.epochs, o.batch_size) == (1e-4, 1e-6, 377, 20, 14)
    assert o.weight_decay == 0.01 and o.betas == (0.9, 0.999) and o.amp == "none"
    assert cfg.model.text_max_length == 384 and cfg.seed == 42 and cfg.text_pretrain is None


def test_overrides_are_cast_and_type_checked():
    cfg = load_preset(DEMO, ["optim.lr=3e-4", "optim.epochs=5", "model.grad_checkpointing=true",
                             "data.split=valid", "data.crop_size=[40,48,64]", "paths.mae_weights=mae.pth",
                             "optim.min_lr=0"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.epochs == 5 and cfg.model.grad_checkpointing is True
    assert cfg.data.split == "valid" and cfg.data.crop_size == (40, 48, 64) and cfg.paths.mae_weights == "mae.pth"
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    for bad in ["optim.epochs=1.5", "optim.epochs=abc", "model.grad_checkpointing=1", "data.crop_size=[1,x,3]",
                "data.crop_size=[40,48]", "optim.lr=fast", "optim.missing=1", "nosuch.key=1", "nokey",
                "optim.amp=fp16"]:
        with pytest.raises(ConfigError):
            load_preset(DEMO, [bad])


def test_flags_apply_before_overrides():
    cfg = load_preset(DEMO, ["optim.epochs=3"], flags={"optim.epochs": 7, "paths.data_root": "x"})
    assert cfg.optim.epochs == 3 and cfg.paths.data_root == "x"


def test_unknown_and_missing_keys_name_the_file(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["depht"] = 4
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key\(s\) model.depht"):
        load_preset(tmp_path / "typo.yaml")
    raw = yaml.safe_load(DEMO.read_text())
    del raw["optim"]["betas"]
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"short.yaml: missing key\(s\) optim.betas"):
        load_preset(tmp_path / "short.yaml")


def test_crop_larger_than_the_pipeline_min_size_is_refused_at_load():
    # demo pipeline: min_size_dhw [40, 48, 72]; volumes are padded only that far
    with pytest.raises(ConfigError, match=r"data.crop_size \[40, 48, 80\] exceeds min_size_dhw \[40, 48, 72\]"):
        load_preset(DEMO, ["data.crop_size=[40,48,80]"])
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_preset(DEMO, ["data.crop_size=[40,48,60]"])


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = load_preset(DEMO)
    path = save_config(cfg.to_dict(), tmp_path / "run")
    saved = yaml.safe_load(path.read_text())
    assert saved["data"]["crop_size"] == [40, 48, 72] and "pipeline" not in saved
    assert load_preset(path) == cfg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_preset(tmp_path / "nope.yaml")
