"""Inputs the evaluation tools cannot use (issues 26 §4, 30 #3/#13): each fed as a user would, then the one-line
error, the exit status and what is on disk checked."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import make_tiny_bert, make_tiny_preset, make_train_bert, make_train_cache
from tests.test_eval import _eval_args, _phantom_ct, _write_sitk, eval_setup  # noqa: F401

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def errors(capsys) -> list[str]:
    """The one-line errors printed (``prog: error: message``, utils.cli.run_main)."""
    return [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]


def _checkpoint_with(eval_setup: Path, tmp: Path, change) -> Path:
    """A copy of the fixture's checkpoint (optimiser-free) with ``change(model_state)`` applied."""
    ckpt = torch.load(eval_setup / "run" / "checkpoint_3.pth", weights_only=True)
    change(ckpt["model"])
    path = tmp / "other_run" / "checkpoint_3.pth"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------- a checkpoint of another model

def test_eval_names_the_vit_that_differs_and_the_flag(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    out = tmp_path / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["model.mlp_ratio=2"]) == 2
    ckpt = eval_setup / "run" / "checkpoint_3.pth"
    assert errors(capsys) == [
        f"eval: error: {ckpt}: the checkpoint's ViT is 32 wide, 3 blocks, mlp_ratio 4; the model built is 32 wide, "
        "3 blocks, mlp_ratio 2: set --config (or model.* overrides) to the model size it was trained with"]
    assert not out.exists() and not list(tmp_path.glob("pred*"))


def test_eval_names_the_text_encoder_that_differs_and_the_flag(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    other = make_tiny_bert(tmp_path / "bert24", hidden=24, layers=2)
    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--text-encoder", str(other)]) == 2
    (line,) = errors(capsys)
    assert line.startswith(f"eval: error: {eval_setup / 'run' / 'checkpoint_3.pth'}: the checkpoint's text encoder "
                           "is 16 wide, 1 layers, intermediate ")
    assert f"; {other / 'config.json'} builds 24 wide, 2 layers" in line
    assert line.endswith(": set --text-encoder to the directory it was trained with")
    assert not out.exists() and not list(out.parent.glob("pred*"))


def test_predict_names_the_part_that_differs(eval_setup, tmp_path, capsys):
    import predict as predict_cli

    hu, labels = _phantom_ct()
    _write_sitk(tmp_path / "ct.nii.gz", hu, LPS, (0.0, 0.0, 0.0))
    _write_sitk(tmp_path / "seg.nii.gz", labels, LPS, (0.0, 0.0, 0.0))
    args = ["--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "seg.nii.gz"),
            "--checkpoint", str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
            "--items", str(eval_setup / "items.yaml"), "--device", "cpu", "model.depth=2", "model.out_indices=[0,1]"]
    assert predict_cli.main(args) == 2
    (line,) = errors(capsys)
    assert "the checkpoint's ViT is 32 wide, 3 blocks, mlp_ratio 4; the model built is 32 wide, 2 blocks" in line
    assert line.endswith("set --config (or model.* overrides) to the model size it was trained with")
    assert not capsys.readouterr().out


def test_resume_names_the_part_that_differs_and_writes_nothing(tmp_path, capsys):
    import train
    from models.builder import build_model
    from utils.checkpoint import save_checkpoint
    from utils.preset import load_preset

    make_train_cache(tmp_path / "data", 6)
    make_train_bert(tmp_path / "bert")
    preset = make_tiny_preset(tmp_path)
    cfg = load_preset(preset)
    model, _ = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=cfg.pipeline.n_anatomies,
                           text_encoder_dir=tmp_path / "bert")
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "out" / "checkpoint_0.pth", model=model, optimizer=optimizer, epoch=0,
                           config=cfg.to_dict())
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert train.main(["--config", str(preset), "--resume", "model.mlp_ratio=2"]) == 2
    assert errors(capsys) == [
        f"train: error: {ckpt}: the checkpoint's ViT is 32 wide, 3 blocks, mlp_ratio 4; the model built is 32 wide, "
        "3 blocks, mlp_ratio 2: set --config (or model.* overrides) to the model size it was trained with"]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}
    assert after == before  # no config.yaml, no log


# ---------------------------------------------------------------------------- diverged checkpoints

def test_eval_refuses_non_finite_weights_and_writes_no_csv(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    ckpt = _checkpoint_with(eval_setup, tmp_path, lambda sd: sd["temp"].fill_(float("nan")))
    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--checkpoint", str(ckpt)]) == 2
    assert errors(capsys) == [f"eval: error: {ckpt}: 1 weight tensor(s) hold NaN or inf, e.g. ['temp'] (a diverged "
                              "run): use an earlier checkpoint (set --checkpoint, or the --config it was trained with)"]
    assert not out.exists() and not list(out.parent.glob("pred*"))


def test_eval_refuses_non_finite_outputs_and_writes_no_csv(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    patch_embed = "visual_encoder.patch_embedding.patch_embeddings.weight"  # finite, overflows float32
    ckpt = _checkpoint_with(eval_setup, tmp_path, lambda sd: sd[patch_embed].fill_(1e38))
    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--checkpoint", str(ckpt)]) == 2
    (line,) = errors(capsys)
    assert line.startswith("eval: error: valid_1_a_1.nii.gz: the model gives NaN or inf for 16 item(s), e.g. ")
    assert line.endswith("(finite weights, diverged outputs): use an earlier checkpoint")
    assert not out.exists() and not list(out.parent.glob("pred*"))


# ---------------------------------------------------------------------------- items, images, setup order

def test_item_of_an_anatomy_the_pipeline_lacks_is_one_line(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    items = yaml.safe_load((eval_setup / "items.yaml").read_text())
    items["items"].append(["liver", "Steatosis", "Not steatosis.", "Steatosis."])
    (tmp_path / "items.yaml").write_text(yaml.safe_dump(items))
    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--items", str(tmp_path / "items.yaml")]) == 2
    assert errors(capsys) == [f"eval: error: {tmp_path / 'items.yaml'}: item anatomy liver is not one of the "
                              "pipeline's anatomies (lung, heart, esophagus, aorta): fix --items, or set the preset "
                              "whose pipeline has it"]
    assert not out.exists() and not list(out.parent.glob("pred*"))


def test_predict_reads_a_dicom_series_folder_as_import_ct_does(eval_setup, tmp_path, capsys):
    import predict as predict_cli
    from data.synthetic_external import write_dicom_series

    hu, labels = _phantom_ct()
    _write_sitk(tmp_path / "ct.nii.gz", hu, LPS, (0.0, 0.0, 0.0))
    _write_sitk(tmp_path / "seg.nii.gz", labels, LPS, (0.0, 0.0, 0.0))
    write_dicom_series(tmp_path / "series", hu, (4.0, 4.0, 8.0), (0.0, 0.0, 0.0))
    common = ["--mask", str(tmp_path / "seg.nii.gz"), "--json", "--checkpoint",
              str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
              "--items", str(eval_setup / "items.yaml"), "--device", "cpu"]
    assert predict_cli.main(["--image", str(tmp_path / "ct.nii.gz"), *common]) == 0
    from_nifti = json.loads(capsys.readouterr().out)["items"]
    assert predict_cli.main(["--image", str(tmp_path / "series"), *common]) == 0
    from_dicom = json.loads(capsys.readouterr().out)["items"]
    np.testing.assert_allclose([i["probability"] for i in from_dicom], [i["probability"] for i in from_nifti],
                               rtol=1e-6)
    assert predict_cli.main(["--image", str(tmp_path / "gone"), *common]) == 2
    assert errors(capsys) == [f"predict: error: image not found: {tmp_path / 'gone'} (set --image: a CT file or a "
                              "DICOM series folder)"]
    (tmp_path / "empty").mkdir()
    assert predict_cli.main(["--image", str(tmp_path / "empty"), *common]) == 2
    assert errors(capsys) == ["predict: error: no DICOM series in folder empty"]


def test_predict_without_mask_names_missing_totalsegmentator_weights_before_loading_the_model(
        eval_setup, tmp_path, monkeypatch, capsys, caplog):
    import predict as predict_cli

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    hu, _ = _phantom_ct()
    _write_sitk(tmp_path / "ct.nii.gz", hu, LPS, (0.0, 0.0, 0.0))
    caplog.set_level("INFO")
    start = time.perf_counter()
    assert predict_cli.main(["--image", str(tmp_path / "ct.nii.gz"), "--checkpoint",
                             str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
                             "--items", str(eval_setup / "items.yaml"), "--device", "cpu"]) == 2
    took = time.perf_counter() - start
    (line,) = errors(capsys)
    assert line.startswith("predict: error: TotalSegmentator weights not installed")
    assert not any(r.name == "models.builder" for r in caplog.records), "the model was loaded first"
    assert took < 10
    assert not (tmp_path / "tshome").exists() or not any((tmp_path / "tshome").rglob("*.pth"))


def test_probe_with_fewer_volumes_per_class_than_folds_is_one_line(tmp_path, capsys):
    import probe
    from tests.test_metrics import LABEL_COLUMNS
    from utils.embeddings import ImageEmbeddings

    names = [f"valid_{i}_a_1.nii.gz" for i in range(1, 7)]
    rng = np.random.default_rng(0)
    ImageEmbeddings(names, ["lung", "heart", "esophagus", "aorta"], rng.standard_normal((6, 4, 8)).astype(np.float32),
                    rng.standard_normal((6, 4, 8)).astype(np.float32), np.ones((6, 4), bool), "test",
                    np.zeros((6, 4), np.int64)).save(tmp_path / "emb.npz")
    labels = {"VolumeName": names, **{c: [1, 1, 1, 0, 0, 0] for c in LABEL_COLUMNS}}
    pd.DataFrame(labels).to_csv(tmp_path / "labels.csv", index=False)
    assert probe.main(["--embeddings", str(tmp_path / "emb.npz"), "--labels", str(tmp_path / "labels.csv"),
                       "--items", str(Path(__file__).resolve().parents[1] / "configs" / "zeroshot_items.yaml"),
                       "--folds", "5"]) == 2
    assert errors(capsys) == ["probe: error: Emphysema: 5 folds need at least 5 volumes of one class, got 3 negative "
                              "and 3 positive (lower --folds)"]
    assert not list(tmp_path.glob("emb_probe*"))


# ---------------------------------------------------------------------------- prediction, label and feature files

def test_calc_metrics_refuses_nan_text_and_names_the_lines(tmp_path, capsys):
    """Issue 30 #3: eval marks an absent anatomy with an empty cell; 'nan' is a diverged model, never scored 0."""
    import calc_metrics
    from tests.test_bad_input import _metrics_inputs

    pred, labels = _metrics_inputs(tmp_path, ["0.2", "", "nan", "NaN"])
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    assert errors(capsys) == [
        f"calc_metrics: error: prediction CSV {pred} holds 2 NaN probabilities (not empty cells, which mark an absent "
        "anatomy) on lines 4, 5, e.g. valid_3_a_1.nii.gz: the model's outputs are not numbers; re-run eval.py"]
    assert not list(tmp_path.glob("pred_*"))


def test_calc_metrics_refuses_a_volume_listed_twice(tmp_path, capsys):
    """Issue 30 #9: a repeated row was scored as one more volume (the mean AUC moved)."""
    import calc_metrics
    from tests.test_bad_input import _metrics_inputs

    pred, labels = _metrics_inputs(tmp_path, ["0.2", "0.4", "0.7", "0.1"])
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join([*lines, lines[2]]) + "\n")  # valid_2 again, as line 6
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    assert errors(capsys) == [f"calc_metrics: error: prediction CSV {pred} lists 1 volume(s) more than once, e.g. "
                              "valid_2_a_1.nii.gz on lines 3, 6: keep one row per volume"]
    assert not list(tmp_path.glob("pred_*"))


def test_labels_disagreeing_for_one_volume_are_an_error(tmp_path, capsys):
    import calc_metrics
    from tests.test_bad_input import _metrics_inputs

    pred, labels = _metrics_inputs(tmp_path, ["0.2", "0.4", "0.7", "0.1"])
    rows = labels.read_text().splitlines()
    same, other = rows[1], rows[1].replace(",0", ",1")
    labels.write_text("\n".join([*rows, same]) + "\n")  # the same row twice: used once, with a warning
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 0
    labels.write_text("\n".join([*rows, other]) + "\n")
    capsys.readouterr()
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    assert errors(capsys) == [f"calc_metrics: error: labels CSV {labels} gives valid_1_a_1.nii.gz different labels "
                              f"on lines 2, {len(rows) + 1}: keep one row per volume"]


def test_probe_refuses_embeddings_listing_a_volume_twice(tmp_path, capsys):
    import probe
    from utils.embeddings import ImageEmbeddings

    names = ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz", "valid_1_a_1.nii.gz"]
    feats = np.zeros((3, 4, 8), np.float32)
    ImageEmbeddings(names, ["lung", "heart", "esophagus", "aorta"], feats, feats, np.ones((3, 4), bool), "test",
                    np.zeros((3, 4), np.int64)).save(tmp_path / "emb.npz")
    (tmp_path / "labels.csv").write_text("VolumeName,Emphysema\nvalid_1_a_1.nii.gz,1\nvalid_2_a_1.nii.gz,0\n")
    assert probe.main(["--embeddings", str(tmp_path / "emb.npz"), "--labels", str(tmp_path / "labels.csv")]) == 2
    assert errors(capsys) == [f"probe: error: {tmp_path / 'emb.npz'} holds 1 volume(s) more than once, e.g. "
                              "valid_1_a_1.nii.gz (rows 0, 2 of 'names'): embed them again with embed.py --overwrite"]
    assert not list(tmp_path.glob("emb_probe*"))


# ---------------------------------------------------------------------------- caches keyed by content (30 #7)

def _embed_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name in ("embed", "retrieval")]


def test_embed_and_retrieval_caches_follow_the_content_of_their_inputs(eval_setup, tmp_path, monkeypatch, caplog):
    """New weights at the same checkpoint path, a changed volume, changed report JSONs: recomputed; unchanged
    inputs: reused, and the log says which."""
    import embed
    import retrieval
    from tests.conftest import write_cache_case
    from tests.test_eval import _fake_case
    from utils.embeddings import ImageEmbeddings

    monkeypatch.chdir(tmp_path)
    shutil.copytree(eval_setup / "run", tmp_path / "run")
    shutil.copytree(eval_setup / "data", tmp_path / "data")
    scans = ["valid_1_a", "valid_2_a", "valid_10_a"]
    anatomy_json = {s: {a: f"{a} of {s} is normal." for a in ("lung", "heart", "esophagus", "aorta")} for s in scans}
    for name in ("desc_info.json", "conc_info.json"):
        (tmp_path / "data" / name).write_text(json.dumps(anatomy_json))
    ckpt = tmp_path / "run" / "checkpoint_3.pth"
    args = ["--config", str(eval_setup / "preset.yaml"), "--items", str(eval_setup / "items.yaml"), "--no-pbar",
            "--checkpoint", str(ckpt), "--data-root", str(tmp_path / "data")]
    out = tmp_path / "res" / "embed_checkpoint_3_valid.npz"
    caplog.set_level("INFO")

    assert embed.main(args) == 0
    assert _embed_log(caplog)[-1].startswith(f"wrote {Path('res') / out.name}: 3 volumes x 4 anatomies (3 computed")
    first, stamp = ImageEmbeddings.load(out), out.stat().st_mtime_ns
    caplog.clear()
    assert embed.main(args) == 0
    assert _embed_log(caplog)[-1].startswith(f"reused {Path('res') / out.name}: 3 volumes x 4 anatomies (0 computed")
    assert out.stat().st_mtime_ns == stamp

    # new weights saved at the same path
    state = torch.load(ckpt, weights_only=True)
    state["model"]["query_tokens"] += 1.0
    torch.save(state, ckpt)
    caplog.clear()
    assert embed.main(args) == 0
    assert "(3 computed now)" in _embed_log(caplog)[-1]
    second = ImageEmbeddings.load(out)
    assert not np.allclose(np.nan_to_num(second.pooled), np.nan_to_num(first.pooled))

    # one volume re-preprocessed: only it is computed again
    write_cache_case(tmp_path / "data", "valid", "valid_2_a_1.nii.gz", *_fake_case(7, False))
    caplog.clear()
    assert embed.main(args) == 0
    assert "(1 computed now)" in _embed_log(caplog)[-1]

    # retrieval: text features are reused until the anatomy texts change
    caplog.clear()
    assert retrieval.main(args) == 0
    assert "wrote text features" in " ".join(_embed_log(caplog)) and "reused image features" in " ".join(
        _embed_log(caplog))
    caplog.clear()
    assert retrieval.main(args) == 0
    assert "reused text features" in " ".join(_embed_log(caplog))
    anatomy_json["valid_1_a"]["lung"] = "emphysema in the lung."
    (tmp_path / "data" / "desc_info.json").write_text(json.dumps(anatomy_json))
    caplog.clear()
    assert retrieval.main(args) == 0
    assert "wrote text features" in " ".join(_embed_log(caplog))


def test_retrieval_table_prints_a_half_median_rank():
    """26 §5: a median rank of 1.5 was printed as 2."""
    from utils.retrieval import evaluate_both_directions, format_table

    table = pd.DataFrame(evaluate_both_directions(np.array([[1.0, 0.0], [1.0, 0.0]]), ["a", "b"], ["a", "b"], "all"))
    row = next(line for line in format_table(table).splitlines() if line.startswith("all volume->report"))
    assert row.split()[-3] == "1.5"  # median rank, then queries and gallery


# ---------------------------------------------------------------------------- --help before the heavy imports (26 §5)

@pytest.mark.parametrize("script", ["eval.py", "predict.py", "embed.py", "retrieval.py", "probe.py", "calc_metrics.py",
                                    "pretrain_text.py"])
def test_help_is_printed_before_torch_and_the_model_code_are_imported(script):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import runpy, sys\n"
            "script = sys.argv[1]\n"
            "sys.argv = [script, '--help']\n"
            "try:\n"
            "    runpy.run_path(script, run_name='__main__')\n"
            "except SystemExit as exit:\n"
            "    assert exit.code == 0, exit.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'pandas', 'SimpleITK') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, script], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and "(default" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"


def test_model_weights_are_read_alone_from_zip_and_legacy_files(tmp_path):
    """load_model_weights maps a checkpoint (zip format) and reads its model entry only; torch's legacy format
    cannot be mapped and is read whole; a file holding no state dict is named."""
    from utils.checkpoint import CheckpointError, load_model_weights

    payload = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "epoch": 1}
    torch.save(payload, tmp_path / "zip.pth")
    torch.save(payload, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        weights = load_model_weights(tmp_path / name)
        assert list(weights) == ["w"] and torch.equal(weights["w"], torch.ones(3))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_model_weights(tmp_path / "list.pth")
