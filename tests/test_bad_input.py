"""Bad input and crashes in the data steps: each fault injected, its named failure/warning/lock asserted."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from data.common import Task, load_pipeline_config, run_tasks, volume_relpath
from data.io import run_lock
from data.resize import build_label_lut
from tests.test_data_pipeline import (all_files, dataset, failures, processed, raw_names, run_pipeline,  # noqa: F401
                                      run_step, tmp_files, work)
from tests.test_eval import _eval_args, eval_setup  # noqa: F401
from tests.test_metrics import CARDIO, EMPH, LABEL_COLUMNS
from tests.conftest import TRAIN_ANATOMIES, make_tiny_preset, make_train_bert, make_train_cache


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def errors(capsys) -> list[str]:
    """The one-line errors the entry points printed (``prog: error: message``, utils.cli.run_main)."""
    return [line.split(": error: ", 1)[1] for line in capsys.readouterr().err.splitlines() if ": error: " in line]


# ---------------------------------------------------------------------------- silently wrong inputs

def test_non_finite_voxels_are_a_failed_case(work):
    name = raw_names(work)[0]
    path = work / "train" / volume_relpath(name)
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0], data[1, 0, 0], data[2, 0, 0] = np.nan, np.inf, -np.inf
    float_img = nib.Nifti1Image(data, img.affine, img.header)
    float_img.set_data_dtype(np.float32)
    nib.save(float_img, path)
    assert run_step("fix", work) == 1
    assert failures(work, "fix") == {name: f"3 non-finite voxels (NaN or inf) in {name}: replace or drop the volume"}
    assert not list((work / "train_fixed").rglob(name.replace(".nii.gz", "*")))


def test_4d_volume_is_named_as_such_not_as_corrupt(work):
    name = raw_names(work)[0]
    path = work / "train" / volume_relpath(name)
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), path)
    assert run_step("fix", work) == 1
    reason = failures(work, "fix")[name]
    assert "not a 3D scalar volume" in reason and "corrupt" not in reason


def test_anatomy_absent_from_the_mask_is_a_preprocess_warning(work, caplog):
    """No lung voxel in one mask: preprocess still writes the case, with a warning row and the count."""
    name = raw_names(work)[0]
    gt = work / "totalseg_gt" / "train" / volume_relpath(name)
    img = nib.load(gt)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    cfg = load_pipeline_config()
    lung = cfg.anatomy_names.index("lung") + 1
    labels[build_label_lut(cfg)[labels] == lung] = 0
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), gt)
    caplog.set_level("INFO")
    assert run_pipeline(work) == [0, 0, 0, 0]
    case = name[: -len(".gz")]  # preprocess cases are the resized .nii files
    assert read_csv(work / "preprocess_train_warnings.csv") == [{"volume": case, "warning": "missing anatomies: lung"}]
    assert "failed 0, warnings 1" in caplog.text
    assert read_csv(work / "fix_train_warnings.csv") == []
    caplog.clear()  # a rerun skips the case and still reports its warning
    assert run_step("preprocess", work) == 0
    assert f"processed 0, skipped {len(raw_names(work))}, failed 0, warnings 1" in caplog.text
    assert len(read_csv(work / "preprocess_train_warnings.csv")) == 1


# ---------------------------------------------------------------------------- stale outputs

def test_rerun_redoes_exactly_the_cases_whose_inputs_changed(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    names = raw_names(root)
    changed = root / "totalseg_gt" / "train" / volume_relpath(names[1])
    img = nib.load(changed)
    labels = np.asarray(img.dataobj).astype(np.uint8)  # (x, y, z)
    first = build_label_lut(load_pipeline_config())[labels] == 1
    first[..., first.shape[2] // 2:] = False
    labels[first] = 0  # a corrected mask: the first anatomy loses its lower half
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), changed)
    before = all_files(root)
    caplog.set_level("INFO")
    assert run_pipeline(root) == [0, 0, 0, 0]
    assert f"fix train: processed 0, skipped {len(names)}" in caplog.text
    for step in ("mask", "resize", "preprocess"):
        assert f"{step} train: processed 1, skipped {len(names) - 1}" in caplog.text
    after = all_files(root)
    rel = volume_relpath(names[1])
    differs = {k for k in after if after[k] != before.get(k) and not k.startswith((".manifests", "totalseg_gt"))}
    assert {str("train_mask" / rel), str("resized_train_masks" / rel),
            str("processed_train_masks" / rel.with_suffix(""))} <= differs
    assert all(names[1][: -len(".nii.gz")] in k for k in differs)
    reference = tmp_path / "reference"  # the same inputs processed from scratch
    shutil.copytree(root, reference, ignore=shutil.ignore_patterns(".manifests", "*_mask", "resized_*",
                                                                   "processed_*"))
    assert run_pipeline(reference) == [0, 0, 0, 0]
    for k, v in all_files(reference).items():
        if k.startswith(("processed_", "resized_", "train_mask")):
            assert after[k] == v, k


def test_changed_metadata_row_redoes_the_fix(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    meta = root / "metadata" / "train_metadata.csv"
    rows = read_csv(meta)
    rows[0]["RescaleIntercept"] = str(float(rows[0]["RescaleIntercept"]) + 1)
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caplog.set_level("INFO")
    assert run_step("fix", root) == 0
    assert f"fix train: processed 1, skipped {len(raw_names(root)) - 1}" in caplog.text


def test_a_case_that_fails_on_rerun_keeps_its_outputs_and_is_retried(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    name = raw_names(root)[0]
    mask = root / "train_mask" / volume_relpath(name)
    good = mask.read_bytes()
    (root / "totalseg_gt" / "train" / volume_relpath(name)).write_bytes(b"not a nifti")
    assert run_step("mask", root) == 1
    assert failures(root, "mask")[name].startswith("corrupt or truncated mask")
    assert mask.read_bytes() == good  # the last good mask stays, and the next steps go on with it
    assert run_pipeline(root)[1:] == [1, 0, 0]
    caplog.set_level("INFO")
    assert run_step("mask", root) == 1  # retried, not skipped, until its input is good again
    assert f"mask train: processed 0, skipped {len(raw_names(root)) - 1}, failed 1" in caplog.text
    assert mask.read_bytes() == good


# ---------------------------------------------------------------------------- process level

def test_second_run_of_a_step_exits_2_while_shards_run_side_by_side(work, capsys):
    with run_lock(work / ".fix_train.lock", "fix train"):  # a whole-split run in progress
        assert run_step("fix", work) == 2
        assert run_step("fix", work, "train", "--shard", "0/2") == 2
    message = errors(capsys)
    assert len(message) == 2 and "is in use by another run" in message[0] and "\n" not in message[0]
    assert not (work / "train_fixed").exists() and not (work / "fix_train_failures.csv").exists()
    with run_lock(work / ".fix_train.lock", "fix", shared=True), \
            run_lock(work / ".fix_train_shard0of2.lock", "fix shard 0/2"):  # shard 0/2 in progress
        assert run_step("fix", work, "train", "--shard", "1/2") == 0
        assert run_step("fix", work, "train", "--shard", "0/2") == 2
        assert run_step("fix", work) == 2


def test_lock_is_released_when_its_holder_is_killed(work):
    holder = subprocess.Popen(["python3", "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(work / ".fix_train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_step("fix", work) == 2
    finally:
        holder.kill()
        holder.wait()
    assert run_step("fix", work) == 0


def _write_after(path: Path, seconds: float) -> None:
    time.sleep(seconds)
    path.write_text("done")


def test_killed_pool_worker_fails_only_the_cases_in_flight(tmp_path):
    tasks = [Task(f"case{i}", (tmp_path / f"case{i}",), partial(_write_after, tmp_path / f"case{i}", 0.05))
             for i in range(7)]
    tasks[2] = Task("case2", (tmp_path / "case2",), partial(os._exit, 9))
    summary = run_tasks("demo", "train", tmp_path, tasks, workers=2, pbar=False)
    failed = dict(summary.failed)
    assert "case2" in failed and len(failed) <= 2  # the crashing case and at most the other one in flight
    assert all("while this case ran" in reason for reason in failed.values())
    assert summary.processed == 7 - len(failed)
    assert all((tmp_path / t.name).is_file() for t in tasks if t.name not in failed)


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for this process, also as root (immutable attribute); undone afterwards."""
    made = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i unavailable: cannot make a folder read-only for root")
        else:
            folder.chmod(0o555)
        made.append(folder)

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_read_only_data_root_exits_2_naming_the_folder(work, read_only, capsys):
    read_only(work)
    assert run_step("fix", work) == 2
    message = errors(capsys)
    assert message == [f"cannot write to {work} (Operation not permitted): make it writable or choose another "
                       "output location"] or (len(message) == 1 and f"cannot write to {work} " in message[0])
    assert not (work / "train_fixed").exists() and not tmp_files(work)


# ---------------------------------------------------------------------------- training

def _train_args(cfg: Path, *extra: str):
    import train
    return train.get_args_parser().parse_args(["--config", str(cfg), *extra])


def test_train_reports_every_missing_input_at_once_and_writes_nothing(tmp_path):
    import train
    make_train_cache(tmp_path / "data", 4)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    (tmp_path / "data" / "conc_info.json").unlink()
    (tmp_path / "data" / "desc_info.json").write_text("{not json")
    next((tmp_path / "data" / "processed_train_masks").glob("*/*/*.nii")).unlink()
    (tmp_path / "bert" / "vocab.txt").unlink()
    with pytest.raises(train.SetupError) as info:
        train.train(_train_args(cfg, "--mae-weights", str(tmp_path / "mae.pth")))
    message = str(info.value)
    assert "\n" not in message
    for part in ("1 processed image(s) without a mask", "conc_info.json not found", "desc_info.json is not valid JSON",
                 "--mae-weights", f"text encoder {tmp_path / 'bert'} lacks vocab.txt or tokenizer.json"):
        assert part in message
    assert not (tmp_path / "out").exists()


def test_train_data_root_is_not_the_code_package(tmp_path, monkeypatch):
    import train
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    monkeypatch.chdir(tmp_path)  # no data/ here: "data" falls back to the repository's code package
    with pytest.raises(train.SetupError, match=r"the code package data/, not a data root.*--data-root"):
        train.train(_train_args(cfg, "--data-root", "data"))


def test_failed_start_leaves_no_config_and_the_next_start_runs(tmp_path):
    import train
    make_train_cache(tmp_path / "data", 4)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    with pytest.raises(train.SetupError, match="lower --batch-size"):  # fails after the input checks
        train.train(_train_args(cfg, "--batch-size", "8"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(train.SetupError, match="lower --batch-size"):
        train.train(_train_args(cfg, "--batch-size", "8"))
    assert [p.name for p in (tmp_path / "out").iterdir()] in ([], [train.RUN_LOCK])
    train.train(_train_args(cfg, "--epochs", "1"))  # not refused as "not empty"
    assert (tmp_path / "out" / "checkpoint_0.pth").is_file()


def test_second_training_run_on_one_output_dir_exits_2(tmp_path, capsys):
    import train
    make_train_cache(tmp_path / "data", 4)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    with run_lock(tmp_path / "out" / train.RUN_LOCK, "a first run"):
        assert train.main(["--config", str(cfg), "--resume"]) == 2
    assert any("in use by another run" in m for m in errors(capsys))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [train.RUN_LOCK]


def test_resume_keeps_one_log_line_per_step(tmp_path):
    import train
    make_train_cache(tmp_path / "data", 6)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    train.train(_train_args(cfg, "--output-dir", str(tmp_path / "a")))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoint_1.pth").unlink()  # killed after logging epoch 1, before its checkpoint
    train.train(_train_args(cfg, "--output-dir", str(tmp_path / "b"), "--resume"))
    for name in ("log_steps.jsonl", "log.txt"):
        keys = [[(r["epoch"], r.get("step")) for r in map(json.loads, (tmp_path / d / name).read_text().splitlines())]
                for d in ("a", "b")]
        assert keys[0] == keys[1], name


def test_zero_byte_checkpoint_is_named(tmp_path, capsys):
    import train
    from utils.checkpoint import CheckpointError, load_checkpoint
    (tmp_path / "checkpoint_0.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes"):
        load_checkpoint(tmp_path / "checkpoint_0.pth")
    make_train_cache(tmp_path / "data", 4)
    make_train_bert(tmp_path / "bert")
    cfg = make_tiny_preset(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint_0.pth").write_bytes(b"")
    assert train.main(["--config", str(cfg), "--resume"]) == 2
    assert any("is empty (0 bytes" in m for m in errors(capsys))


def test_report_gaps_are_counted_per_file_and_anatomy(tmp_path, caplog):
    from data.dataset import CTRateTrainDataset
    root = make_train_cache(tmp_path / "data", 4)
    conc = json.loads((root / "conc_info.json").read_text())
    desc = json.loads((root / "desc_info.json").read_text())
    del conc["train_1_a"]  # in desc_info only
    desc["train_2_a"][TRAIN_ANATOMIES[0]] = "  "
    desc["train_3_a"][TRAIN_ANATOMIES[0]] = None
    desc["train_3_a"][TRAIN_ANATOMIES[1]] = ""
    (root / "conc_info.json").write_text(json.dumps(conc))
    (root / "desc_info.json").write_text(json.dumps(desc))
    caplog.set_level("WARNING")
    CTRateTrainDataset(root, anatomy_names=TRAIN_ANATOMIES, crop_size=(8, 16, 16))
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("conc_info.json lacks 1 of 4 scans") and "train_1_a" in m for m in warned)
    assert not any(m.startswith("desc_info.json lacks") for m in warned)
    assert any(m.startswith("desc_info.json has empty or blank entries") and m.endswith(f"{TRAIN_ANATOMIES[0]} 2, {TRAIN_ANATOMIES[1]} 1")
               for m in warned)


# ---------------------------------------------------------------------------- eval and calc_metrics

def test_second_eval_writing_the_same_csv_exits_2(eval_setup, tmp_path, capsys):
    import eval as eval_cli
    out = tmp_path / "res" / "pred.csv"
    with run_lock(out.with_name(".pred.csv.lock"), "a first eval"):
        assert eval_cli.main(_eval_args(eval_setup, out)) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not out.exists()
    assert eval_cli.main(_eval_args(eval_setup, out)) == 0


def test_eval_counts_empty_cells_per_item(eval_setup, tmp_path, caplog):
    import eval as eval_cli
    caplog.set_level("INFO")
    assert eval_cli.main(_eval_args(eval_setup, tmp_path / "pred.csv")) == 0  # valid_2 has no heart
    line = next(m for m in (r.getMessage() for r in caplog.records) if m.startswith("empty cells"))
    heart = [c for c in pd.read_csv(tmp_path / "pred.csv").columns if c.startswith("heart_")]
    assert line.endswith(", ".join(f"{c} 1" for c in heart))


def test_eval_and_calc_metrics_find_default_paths_from_the_repository_root(eval_setup, tmp_path, monkeypatch):
    """The preset's relative paths and --data-root resolve from the current directory, else the repo root."""
    import calc_metrics
    import eval as eval_cli
    import utils.config
    repo = tmp_path / "repo"
    shutil.copytree(eval_setup, repo)
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", repo / "configs")
    cfg = yaml.safe_load((repo / "preset.yaml").read_text())
    cfg["paths"].update(data_root="data", output_dir="run", text_encoder="bert")
    (repo / "preset.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(utils.config, "REPO_ROOT", repo)
    monkeypatch.chdir(tmp_path)  # neither data/ nor run/ here
    assert eval_cli.main(["--config", "preset.yaml", "--items", "items.yaml", "--csv_file", "res/pred.csv",
                          "--no-pbar"]) == 0
    labels = pd.DataFrame({"VolumeName": pd.read_csv(tmp_path / "res" / "pred.csv")["file_name"]})
    for column in LABEL_COLUMNS:
        labels[column] = [0, 1, 0]
    (repo / "data" / "multi_abnormality_labels").mkdir()
    labels.to_csv(repo / "data" / "multi_abnormality_labels" / "valid_predicted_labels.csv", index=False)
    assert calc_metrics.main(["--csv_file", "res/pred.csv", "--data-root", "data"]) == 0


def _metrics_inputs(tmp_path: Path, cells: list[str]) -> tuple[Path, Path]:
    pred = tmp_path / "pred.csv"
    pred.write_text(f"file_name,{EMPH},{CARDIO}\n" + "".join(
        f"valid_{i}_a_1.nii.gz,{cell},0.5\n" for i, cell in enumerate(cells, start=1)))
    labels = pd.DataFrame({"VolumeName": [f"valid_{i}_a_1.nii.gz" for i in range(1, len(cells) + 2)]})
    for column in LABEL_COLUMNS:
        labels[column] = [i % 2 for i in range(len(cells) + 1)]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return pred, tmp_path / "labels.csv"


@pytest.mark.parametrize("cell", ["inf", "-inf", "1.5", "-0.01"])
def test_calc_metrics_rejects_infinite_or_out_of_range_probabilities(tmp_path, capsys, cell):
    import calc_metrics
    pred, labels = _metrics_inputs(tmp_path, ["0.2", cell, "0.7", "0.4"])
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "1 probabilities are infinite or outside [0, 1]" in err and "valid_2_a_1.nii.gz" in err
    assert not (tmp_path / "pred_metrics.csv").exists()


def test_calc_metrics_reports_empty_cells_and_what_the_csv_lacks(tmp_path, caplog):
    import calc_metrics
    pred, labels = _metrics_inputs(tmp_path, ["0.2", "", "0.7", ""])
    caplog.set_level("INFO")
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "empty cells scored as probability 0 (spec §8), per item: Emphysema 2" in warned
    assert "1 labelled volume(s) are not in the prediction CSV (not scored), e.g. valid_5_a_1.nii.gz" in warned
    assert any(m.startswith(f"{len(LABEL_COLUMNS) - 2} labelled abnormality(ies) have no item column") for m in warned)


def test_width_mismatch_hint_names_the_model_size_not_the_crop():
    import torch
    from torch import nn

    from utils.checkpoint import CheckpointError, ModelMismatchError, filter_state_dict, load_model_state
    model = nn.Module()
    model.visual_encoder = nn.Module()
    model.visual_encoder.pos_embed = nn.Parameter(torch.zeros(1, 8, 32))
    with pytest.raises(ModelMismatchError, match=r"ViT is 64 wide, 0 blocks, mlp_ratio \?; the model built is 32 wide"
                       ) as info:
        load_model_state(model, {"visual_encoder.pos_embed": torch.zeros(1, 8, 64)})
    assert "crop" not in str(info.value) and "--config" in str(info.value)
    with pytest.raises(CheckpointError, match="crop size and patch size"):
        filter_state_dict({"visual_encoder.pos_embed": torch.zeros(1, 6, 32)}, model)


def test_outputs_from_before_manifests_are_kept_unless_an_input_is_newer(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    shutil.rmtree(root / ".manifests")
    names = raw_names(root)
    raw = root / "train" / volume_relpath(names[0])
    future = time.time_ns() + 10**9
    os.utime(raw, ns=(future, future))  # replaced after its output was written
    caplog.set_level("INFO")
    assert run_step("fix", root) == 0
    assert f"fix train: processed 1, skipped {len(names) - 1}" in caplog.text
    assert len(list((root / ".manifests" / "fix_train").glob("*.json"))) == len(names)
