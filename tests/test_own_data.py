"""README "Pre-training on your own CT + reports", end to end on a synthetic CT-RATE with a fifth anatomy
(the trachea: the phantom draws it with TotalSegmentator's `trachea` label, and the reports name it):
decompose the reports, the data steps with an anatomy file of five, a training epoch and eval."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import yaml

import eval as eval_cli
import train
from data import decompose
from data.common import REPORT_FILES, SPLITS, load_pipeline_config
from data.io import list_volumes, open_volume, image_to_mask_path
from data.synthetic import generate_dataset
from tests.conftest import make_tiny_bert, make_tiny_preset
from tests.test_data_pipeline import run_pipeline
from utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_with_a_fifth_anatomy(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, n_train=4, n_valid=2, seed=0)
    for name in (decompose.DESC_FILE, decompose.CONC_FILE):  # a user's data has no decomposition
        (root / name).unlink()
    anatomy = yaml.safe_load((REPO / "configs" / "anatomy" / "ctrate.yaml").read_text())
    anatomy["anatomies"].append({"name": "trachea", "classes": ["trachea"], "terms": ["trachea"]})
    (tmp_path / "anatomy.yaml").write_text(yaml.safe_dump(anatomy))
    pipeline = yaml.safe_load((REPO / "configs" / "pipeline_demo.yaml").read_text())
    pipeline["anatomy_map"] = str(tmp_path / "anatomy.yaml")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    assert load_pipeline_config(tmp_path / "pipeline.yaml").anatomy_names[-1] == "trachea"

    # the synthetic reports call the trachea normal; a user's would also name its findings (an anatomy that is
    # never abnormal is skipped by the loss, spec §5)
    reports = pd.read_csv(root / REPORT_FILES["train"])
    for scan, finding in (("train_1_a", "Secretion in the trachea."), ("train_2_a", "Tracheal wall thickening.")):
        rows = reports["VolumeName"].str.startswith(scan + "_")
        reports.loc[rows, "Impressions_EN"] = reports.loc[rows, "Impressions_EN"] + " " + finding
    reports.to_csv(root / REPORT_FILES["train"], index=False)
    assert decompose.main(["--reports", *(str(root / REPORT_FILES[s]) for s in SPLITS), "--data-root", str(root),
                           "--anatomy", str(tmp_path / "anatomy.yaml"), "--no-pbar"]) == 0
    desc = json.loads((root / decompose.DESC_FILE).read_text())
    conc = json.loads((root / decompose.CONC_FILE).read_text())
    assert len(desc) == 6 and all(d["trachea"] == "Trachea and both main bronchi are open." for d in desc.values())
    assert conc["train_1_a"]["trachea"] == "Secretion in the trachea." and "trachea" not in conc["train_3_a"]

    for split in SPLITS:
        assert run_pipeline(root, split, "--config", str(tmp_path / "pipeline.yaml")) == [0, 0, 0, 0]
    mask = open_volume(image_to_mask_path(list_volumes(root, "train")[0]))
    assert 5 in mask  # the trachea, merged by the five-anatomy file

    make_tiny_bert(tmp_path / "bert")
    preset = make_tiny_preset(tmp_path, epochs=1, batch_size=4)  # one step, both trachea labels
    cfg = yaml.safe_load(preset.read_text())
    cfg["pipeline_config"] = str(tmp_path / "pipeline.yaml")
    cfg["data"]["crop_size"] = pipeline["min_size_dhw"]  # the demo crop: the phantom's anatomies fit whole
    preset.write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(preset)]) == 0
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint_0.pth")
    assert ckpt["model"]["query_tokens"].shape[0] == 5
    steps = [json.loads(line) for line in (tmp_path / "out" / "log_steps.jsonl").read_text().splitlines()]
    assert any("loss_trachea" in s for s in steps) and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)

    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(["--config", str(preset), "--checkpoint", str(tmp_path / "out" / "checkpoint_0.pth"),
                          "--csv_file", str(out), "--no-pbar"]) == 0
    pred = pd.read_csv(out)
    assert len(pred) == len(list_volumes(root, "valid")) and pred.iloc[:, 1:].notna().all().all()
