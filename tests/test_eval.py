"""Zero-shot evaluation: window protocol (spec §7), CSV format, eval.py end to end, predict.py."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import make_tiny_bert, write_cache_case
from zeroshot import ZeroShotItem, ZeroShotScorer, anatomy_window, crop_anatomy_window, pad_to_multiple

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CSV = REPO / "tests" / "data" / "fvlm_release_valid_probs.csv"
# header of the release's prediction CSV (REFERENCE_CSV)
RELEASE_HEADER = (
    "file_name,lung_Emphysema_Not Emphysema._Emphysema.,lung_Atelectasis_Not Atelectatic._Atelectatic.,"
    "lung_Lung nodule_Not Nodule._Nodule.,lung_Lung opacity_Not Opacity._Opacity.,"
    "lung_Pulmonary fibrotic sequela_Not Pulmonary fibrotic._Pulmonary fibrotic.,"
    "lung_Pleural effusion_Not Pleural effusion._Pleural effusion.,"
    "lung_Mosaic attenuation pattern_Not Mosaic attenuation pattern._Mosaic attenuation pattern.,"
    "lung_Peribronchial thickening_Not Peribronchial thickening._Peribronchial thickening.,"
    "lung_Consolidation_Not Consolidation._Consolidation.,lung_Bronchiectasis_Not Bronchiectasis._Bronchiectasis.,"
    "lung_Interlobular septal thickening_Not Interlobular septal thickening._Interlobular septal thickening.,"
    "heart_Cardiomegaly_Not Cardiomegaly._Cardiomegaly.,"
    "heart_Pericardial effusion_Not Pericardial effusion._Pericardial effusion.,"
    "heart_Coronary artery wall calcification_Not Coronary artery wall calcification._Coronary artery wall "
    "calcification.,esophagus_Hiatal hernia_Not Hiatal hernia._Hiatal hernia.,"
    "aorta_Arterial wall calcification_Not Arterial wall calcification._Arterial wall calcification."
)
ROI = (112, 288, 352)


# ----------------------------------------------------------------------------- window protocol

def _span(s: slice) -> tuple[int, int]:
    return s.start, s.stop


def test_window_centred_on_small_anatomy():
    # centre (110, 230, 350); start = centre - roi // 2
    w = anatomy_window((100, 200, 300), (120, 260, 400), (300, 600, 800), ROI)
    assert [_span(s) for s in w] == [(54, 166), (86, 374), (174, 526)]


def test_window_near_the_edges_is_shifted_inside():
    # z: centre 144 -> start 88, end min(150, 200) = 150 is short -> start = 150 - 112 = 38
    # y: centre 2 -> start max(0, 2 - 144) = 0, end 288
    # x: bbox at the far end, centre 395 -> start 219, end min(400, 571) = 400 -> start 48
    w = anatomy_window((140, 0, 390), (149, 5, 399), (150, 300, 400), ROI)
    assert [_span(s) for s in w] == [(38, 150), (0, 288), (48, 400)]


def test_window_of_anatomy_larger_than_roi_uses_max_minus_min():
    # z: size = max(112, 210 - 10) = 200, centre 110 -> (10, 210): the release's max - min
    # y: size 400, centre 250 -> start 50 -> (50, 450); x: volume smaller than roi -> whole axis
    w = anatomy_window((10, 50, 20), (210, 450, 200), (300, 600, 256), ROI)
    assert [_span(s) for s in w] == [(10, 210), (50, 450), (0, 256)]


def test_window_never_leaves_the_volume():
    rng = np.random.default_rng(0)
    for _ in range(300):
        dims = rng.integers(1, 500, size=3)
        lo = np.array([rng.integers(0, d) for d in dims])
        hi = np.array([rng.integers(a, d) for a, d in zip(lo, dims)])
        for s, d, a, b, r in zip(anatomy_window(lo, hi, dims, ROI), dims, lo, hi, ROI):
            assert 0 <= s.start < s.stop <= d
            assert s.stop - s.start == min(d, max(r, b - a))
            assert s.start <= a and (s.stop >= b or b - a >= r)  # the box is inside (up to max - min)


def test_pad_to_multiple_pads_at_the_end():
    a = np.ones((5, 16, 33), dtype=np.float32)
    out = pad_to_multiple(a, (16, 16, 32), 0.0)
    assert out.shape == (16, 16, 64)
    assert out[:5, :, :33].all() and not out[5:].any() and not out[:, :, 33:].any()
    b = a[:, :, :32]
    assert pad_to_multiple(b, (5, 16, 32)) is b  # already a multiple: unchanged


def test_crop_keeps_only_the_target_anatomy_and_pads():
    image = np.arange(40 * 50 * 60, dtype=np.float32).reshape(40, 50, 60) / 1e6
    mask = np.zeros((40, 50, 60), dtype=np.uint8)
    mask[10:20, 10:30, 5:25] = 1
    mask[15:18, 12:20, 30:40] = 2  # another anatomy inside the window
    crop = crop_anatomy_window(image, mask, 1, (24, 36, 36), (8, 8, 16))
    assert crop is not None
    crop_image, crop_mask = crop
    # z: centre 14, size 24 -> start 2, end 26; y: centre 19, size 36 -> 1..37; x: centre 14 -> 0..36
    assert crop_image.shape == crop_mask.shape == (24, 40, 48)
    np.testing.assert_array_equal(crop_image[:, :36, :36], image[2:26, 1:37, 0:36])
    assert not crop_image[:, 36:].any() and not crop_image[:, :, 36:].any()
    assert set(np.unique(crop_mask)) == {0, 1}
    np.testing.assert_array_equal(crop_mask[:, :36, :36], (mask[2:26, 1:37, 0:36] == 1))
    assert crop_anatomy_window(image, mask, 3, (24, 36, 36), (8, 8, 16)) is None


def test_crop_transform_applies_before_padding():
    hu = np.full((10, 10, 10), 350, dtype=np.int16)
    mask = np.ones((10, 10, 10), dtype=np.uint8)
    crop_image, _ = crop_anatomy_window(hu, mask, 1, (4, 4, 4), (8, 8, 8), transform=lambda x: x / 350.0)
    # box 0..9 -> size max(4, 9 - 0) = 9 (release formula), padded to 16
    assert crop_image.shape == (16, 16, 16)
    assert (crop_image[:9, :9, :9] == 1).all() and (crop_image[9:] == 0).all()


class _StubModel(torch.nn.Module):
    """Records the windows it encodes; feature = unit vector along the anatomy index."""

    def __init__(self) -> None:
        super().__init__()
        self.visual_encoder = torch.nn.Module()
        self.visual_encoder.patch_size = (4, 4, 4)
        self.temp = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[tuple[int, ...], set[int], int]] = []

    def encode_anatomy_window(self, image, anatomy_mask, anatomy_idx):
        self.calls.append((tuple(image.shape), set(anatomy_mask.unique().tolist()), anatomy_idx))
        v = torch.zeros(1, 4)
        v[0, anatomy_idx] = 1.0
        return v


def test_scorer_scores_each_present_anatomy_once_with_its_own_mask():
    items = [ZeroShotItem("lung", "Emphysema", "Not Emphysema.", "Emphysema."),
             ZeroShotItem("heart", "Cardiomegaly", "Not Cardiomegaly.", "Cardiomegaly."),
             ZeroShotItem("lung", "Lung nodule", "Not Nodule.", "Nodule."),
             ZeroShotItem("aorta", "Arterial wall calcification", "Not A.", "A.")]
    text = torch.zeros(4, 2, 4)
    text[0, 1, 0] = 1.0  # lung Emphysema: positive prompt aligned with the lung feature
    text[1, 0, 1] = 1.0  # heart: negative prompt aligned
    model = _StubModel()
    scorer = ZeroShotScorer(model, items, ["lung", "heart", "esophagus", "aorta"], text, (8, 8, 8),
                            torch.device("cpu"))
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[1:5, 1:5, 1:5] = 1
    mask[6:9, 6:9, 6:9] = 2  # no aorta (4)
    probs = scorer(np.zeros((12, 12, 12), dtype=np.float32), mask)
    assert set(probs) == {items[0].column, items[1].column, items[2].column}  # aorta absent
    assert [c[2] for c in model.calls] == [0, 1]  # one pass per present anatomy
    assert all(c[1] <= {0, 1} for c in model.calls)  # binary mask of that anatomy only
    assert all(c[0] == (1, 1, 8, 8, 8) for c in model.calls)
    e = float(np.exp(1 / 0.5))
    assert probs[items[0].column] == pytest.approx(e / (1 + e))
    assert probs[items[1].column] == pytest.approx(1 / (1 + e))
    assert probs[items[2].column] == pytest.approx(0.5)


def test_scorer_rejects_unknown_anatomy():
    with pytest.raises(ValueError, match="kidney"):
        ZeroShotScorer(_StubModel(), [ZeroShotItem("kidney", "X", "Not X.", "X.")], ["lung"],
                       torch.zeros(1, 2, 4), (8, 8, 8), torch.device("cpu"))


# ----------------------------------------------------------------------------- CSV format

def test_default_items_give_the_release_header():
    from zeroshot import load_items

    roi, items = load_items(REPO / "configs" / "zeroshot_items.yaml")
    assert roi == ROI
    assert ",".join(["file_name"] + [i.column for i in items]) == RELEASE_HEADER
    with open(REFERENCE_CSV) as f:
        assert next(csv.reader(f)) == RELEASE_HEADER.split(",")


def test_demo_items_are_the_spec_items_with_prompts_the_synthetic_reports_use():
    from data.synthetic import ABSENT_DESC, CONC, SIMULATED
    from zeroshot import load_items

    roi, spec = load_items(REPO / "configs" / "zeroshot_items.yaml")
    demo_roi, demo = load_items(REPO / "configs" / "zeroshot_items_demo.yaml")
    assert demo_roi == roi
    assert [(i.anatomy, i.abnormality) for i in demo] == [(i.anatomy, i.abnormality) for i in spec]
    place = {"lobes": "right lower lobe", "effusion": "Pleural effusion on the right."}
    for item, spec_item in zip(demo, spec):
        if item.abnormality in SIMULATED:  # the generator's first sentences, as the reports write them
            assert item.positive == CONC[item.abnormality][0].format(**place)
            assert item.negative == ABSENT_DESC[item.abnormality][0]
        else:
            assert item.positive == spec_item.positive
            assert item.negative == f"No {item.abnormality.lower()}."
    presets = {name: yaml.safe_load((REPO / "configs" / name).read_text()) for name in ("ctrate.yaml", "demo.yaml")}
    assert presets["ctrate.yaml"]["zeroshot_items"] == "configs/zeroshot_items.yaml"
    assert presets["demo.yaml"]["zeroshot_items"] == "configs/zeroshot_items_demo.yaml"


def test_prediction_csv_sorted_with_empty_cells_for_absent_anatomy(tmp_path):
    from zeroshot import load_items, write_prediction_csv

    _, items = load_items(REPO / "configs" / "zeroshot_items.yaml")
    lung = {i.column: 0.25 for i in items if i.anatomy == "lung"}
    rows = {"valid_2_a_1.nii.gz": {i.column: 0.5 for i in items}, "valid_10_a_1.nii.gz": lung}
    out = tmp_path / "res" / "x.csv"
    write_prediction_csv(out, rows, items)
    assert out.read_text().splitlines()[0] == RELEASE_HEADER
    df = pd.read_csv(out)
    assert df["file_name"].tolist() == ["valid_10_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    heart = [i.column for i in items if i.anatomy != "lung"]
    assert df.loc[0, heart].isna().all() and (df.loc[0, list(lung)] == 0.25).all()
    assert (df.loc[1, [i.column for i in items]] == 0.5).all()
    assert not list(out.parent.glob(".tmp-*"))


# ----------------------------------------------------------------------------- eval.py end to end

SHAPE = (24, 40, 48)  # processed (D, H, W) of the fake cache
ITEMS_ROI = [16, 24, 32]


def _tiny_bert(folder: Path) -> Path:
    from zeroshot import load_items

    _, items = load_items(REPO / "configs" / "zeroshot_items.yaml")
    words = sorted({w for i in items for t in (i.negative, i.positive) for w in t.lower().replace(".", " ").split()})
    return make_tiny_bert(folder, [".", *words], hidden=16, layers=1)


def _fake_case(seed: int, with_heart: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1100, 300, size=SHAPE).astype(np.int16)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:20, 4:36, 4:22] = 1  # lung
    if with_heart:
        mask[8:16, 14:30, 20:30] = 2
    mask[3:22, 25:28, 23:26] = 3  # esophagus
    mask[4:20, 10:14, 24:28] = 4  # aorta
    return hu, mask


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """Tiny preset + random model checkpoint (utils.checkpoint) + fake processed cache of 3 volumes."""
    from models.builder import build_model
    from utils.checkpoint import save_checkpoint
    from utils.preset import load_preset

    tmp = tmp_path_factory.mktemp("eval")
    bert = _tiny_bert(tmp / "bert")
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["paths"].update(text_encoder=str(bert), output_dir=str(tmp / "run"), data_root=str(tmp / "data"))
    cfg["data"]["crop_size"] = [16, 32, 32]
    cfg["model"].update(patch_size=[8, 8, 8], embed_dim=32, depth=3, num_heads=2, out_indices=[0, 1, 2],
                        text_max_length=16, text_pretrained=False, freeze_text_encoder=False)
    (tmp / "preset.yaml").write_text(yaml.safe_dump(cfg))
    items = yaml.safe_load((REPO / "configs" / "zeroshot_items.yaml").read_text())
    items["roi_dhw"] = ITEMS_ROI
    (tmp / "items.yaml").write_text(yaml.safe_dump(items))

    torch.manual_seed(0)
    preset = load_preset(tmp / "preset.yaml")
    model, _ = build_model(preset.model, img_size=preset.data.crop_size, n_anatomies=4, text_encoder_dir=bert)
    with torch.no_grad():
        model.query_tokens.normal_()  # zero queries would pool every window to the same mean
    save_checkpoint(tmp / "run" / "checkpoint_3.pth", model=model, epoch=3, config=cfg)
    for i, heart in ((1, True), (2, False), (10, True)):
        write_cache_case(tmp / "data", "valid", f"valid_{i}_a_1.nii.gz", *_fake_case(i, heart))
    return tmp


def _eval_args(tmp: Path, out: Path) -> list[str]:
    return ["--config", str(tmp / "preset.yaml"), "--items", str(tmp / "items.yaml"), "--csv_file", str(out),
            "--no-pbar"]


def test_eval_end_to_end_on_a_fake_cache(eval_setup, tmp_path):
    import eval as eval_cli

    out = tmp_path / "res" / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out)) == 0  # default checkpoint: latest in output_dir
    lines = out.read_text().splitlines()
    assert lines[0] == RELEASE_HEADER
    df = pd.read_csv(out)
    assert df["file_name"].tolist() == ["valid_10_a_1.nii.gz", "valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    cols = df.columns[1:]
    heart = [c for c in cols if c.startswith("heart_")]
    assert df.loc[2, heart].isna().all()  # valid_2 has no heart: empty cells
    values = df[cols].to_numpy()
    present = ~np.isnan(values)
    assert present.sum() == 3 * 16 - 3
    assert ((values[present] > 0) & (values[present] < 1)).all()
    assert not np.allclose(values[0], values[1])  # different volumes, different scores
    failures = pd.read_csv(tmp_path / "res" / "pred_failures.csv")
    assert list(failures.columns) == ["volume", "reason"] and failures.empty

    # the same numbers from the scorer used directly on one volume (the code predict.py shares)
    from data.io import scale_hu
    from utils.preset import load_preset
    from zeroshot import ZeroShotScorer, load_eval_model, load_items, prompt_features

    model, tok = load_eval_model(load_preset(eval_setup / "preset.yaml"), eval_setup / "run" / "checkpoint_3.pth",
                                 torch.device("cpu"))
    roi, items = load_items(eval_setup / "items.yaml")
    scorer = ZeroShotScorer(model, items, ["lung", "heart", "esophagus", "aorta"],
                            prompt_features(model, tok, items, 16, torch.device("cpu")), roi,
                            torch.device("cpu"), transform=lambda x: scale_hu(x, (-1150, 350)))
    probs = scorer(*_fake_case(1, True))
    np.testing.assert_allclose([probs[c] for c in cols], df.loc[1, cols].to_numpy(dtype=float), rtol=1e-6)


def test_eval_unreadable_volume_is_reported_and_the_rest_go_on(eval_setup, tmp_path):
    import shutil

    import eval as eval_cli

    data = tmp_path / "data"
    shutil.copytree(eval_setup / "data", data)
    bad = data / "processed_valid_images" / "valid_3" / "valid_3_a" / "valid_3_a_1.nii"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "pred.csv"
    args = _eval_args(eval_setup, out) + ["--data-root", str(data), "--checkpoint",
                                          str(eval_setup / "run" / "checkpoint_3.pth")]
    assert eval_cli.main(args) == 1
    assert len(pd.read_csv(out)) == 3
    failures = pd.read_csv(tmp_path / "pred_failures.csv")
    assert failures["volume"].tolist() == ["valid_3_a_1.nii.gz"]
    assert failures["reason"].str.len().iloc[0] > 0


def test_eval_setup_errors_exit_2(eval_setup, tmp_path, capsys):
    import eval as eval_cli

    out = tmp_path / "pred.csv"
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert eval_cli.main(_eval_args(eval_setup, out) + ["--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "--data-root" in err
    assert not out.exists()


def test_default_output_is_per_run_and_other_inputs_are_not_overwritten(eval_setup, tmp_path, monkeypatch, capsys):
    """Issue 30 #2: checkpoint_3.pth of two runs gets two CSVs; a CSV of other inputs is replaced only with
    --overwrite, and then the calc_metrics files of the replaced CSV go."""
    import shutil

    import eval as eval_cli

    monkeypatch.chdir(tmp_path)
    shutil.copytree(eval_setup / "run", tmp_path / "run2")
    args = ["--config", str(eval_setup / "preset.yaml"), "--items", str(eval_setup / "items.yaml"), "--no-pbar"]
    assert eval_cli.main(args) == 0
    first = tmp_path / "res" / "run_checkpoint_3.csv"
    assert first.is_file()
    assert json.loads((tmp_path / "res" / "run_checkpoint_3_inputs.json").read_text())["checkpoint"] == str(
        eval_setup / "run" / "checkpoint_3.pth")
    assert eval_cli.main(args) == 0  # same inputs: rewritten without asking
    other = ["--checkpoint", str(tmp_path / "run2" / "checkpoint_3.pth")]
    assert eval_cli.main(args + other) == 0
    assert (tmp_path / "res" / "run2_checkpoint_3.csv").is_file()

    stale = [tmp_path / "res" / f"run_checkpoint_3{s}" for s in ("_metrics.csv", "_metrics.md", "_roc.png")]
    for path in stale:
        path.write_text("scores of the first CSV")
    before = first.read_bytes()
    capsys.readouterr()
    assert eval_cli.main(args + other + ["--name", "run_checkpoint_3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert err == [(f"eval: error: {Path('res') / 'run_checkpoint_3.csv'} exists and was made from other inputs "
                   "(checkpoint differ): pass --overwrite to replace it, or set --csv_file or --name")]
    assert first.read_bytes() == before and all(p.is_file() for p in stale)
    assert eval_cli.main(args + other + ["--name", "run_checkpoint_3", "--overwrite"]) == 0
    assert not any(p.exists() for p in stale)
    assert json.loads((tmp_path / "res" / "run_checkpoint_3_inputs.json").read_text())["checkpoint"] == other[1]
    (tmp_path / "res" / "run_checkpoint_3_inputs.json").unlink()  # e.g. a CSV of the release, or of an older eval
    assert eval_cli.main(args + other + ["--name", "run_checkpoint_3"]) == 2
    assert "no record of its inputs (run_checkpoint_3_inputs.json is missing)" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_two_ranks_gives_the_same_csv(eval_setup, tmp_path):
    import eval as eval_cli

    one = tmp_path / "one.csv"
    assert eval_cli.main(_eval_args(eval_setup, one)) == 0
    two = tmp_path / "two.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "eval.py"), *_eval_args(eval_setup, two)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()  # same model, same windows, one volume per pass
    a, b = pd.read_csv(one), pd.read_csv(two)
    assert a["file_name"].tolist() == b["file_name"].tolist()
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(dtype=float), b.iloc[:, 1:].to_numpy(dtype=float),
                               rtol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------- predict.py

def _phantom_ct() -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, TotalSegmentator `total` labels) as (D, H, W) in LPS order, 4x4x8 mm."""
    from totalsegmentator.map_to_binary import class_map

    ids = {name: idx for idx, name in class_map["total"].items()}
    shape = (14, 44, 56)
    rng = np.random.default_rng(5)
    hu = rng.integers(-200, 100, size=shape).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:12, 6:38, 4:24] = ids["lung_upper_lobe_right"]
    labels[2:12, 6:38, 32:52] = ids["lung_upper_lobe_left"]
    labels[4:9, 16:30, 24:34] = ids["heart"]
    labels[1:13, 32:35, 27:30] = ids["esophagus"]
    labels[3:12, 28:31, 31:34] = ids["aorta"]
    labels[0:2, 10:20, 10:20] = ids["liver"]  # not an anatomy: merged to 0
    hu[labels == ids["lung_upper_lobe_left"]] = -850
    return hu, labels


def _write_sitk(path: Path, array: np.ndarray, direction, origin) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing((4.0, 4.0, 8.0))
    img.SetDirection(direction)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def test_predict_with_mask_is_orientation_invariant(eval_setup, tmp_path, capsys):
    import predict as predict_cli

    hu, labels = _phantom_ct()
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    _write_sitk(tmp_path / "ct.nii.gz", hu, lps, (-100.0, -80.0, 40.0))
    _write_sitk(tmp_path / "seg.nii.gz", labels, lps, (-100.0, -80.0, 40.0))
    # the same scan stored RAS-style (x and y flipped, as dcm2niix writes): same physical voxels
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    far = (-100.0 + 4.0 * (hu.shape[2] - 1), -80.0 + 4.0 * (hu.shape[1] - 1), 40.0)
    _write_sitk(tmp_path / "ct_ras.nii.gz", hu[:, ::-1, ::-1].copy(), ras, far)
    _write_sitk(tmp_path / "seg_ras.nii.gz", labels[:, ::-1, ::-1].copy(), ras, far)

    common = ["--checkpoint", str(eval_setup / "run" / "checkpoint_3.pth"), "--config",
              str(eval_setup / "preset.yaml"), "--items", str(eval_setup / "items.yaml"), "--device", "cpu"]
    assert predict_cli.main(["--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "seg.nii.gz"),
                             "--json", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    probs = [i["probability"] for i in first["items"]]
    assert len(probs) == 16 and all(0 < p < 1 for p in probs)
    assert predict_cli.main(["--image", str(tmp_path / "ct_ras.nii.gz"), "--mask", str(tmp_path / "seg_ras.nii.gz"),
                             "--json", *common]) == 0
    second = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose([i["probability"] for i in second["items"]], probs, rtol=1e-5)

    assert predict_cli.main(["--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "seg.nii.gz"),
                             *common]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["Anatomy", "Abnormality", "Probability"] and len(table) == 18


def test_predict_shares_eval_scoring(eval_setup, tmp_path, capsys):
    """predict.py on a volume already in the pipeline's layout = the scorer eval.py uses on its cache."""
    import SimpleITK as sitk

    import predict as predict_cli
    from data.io import scale_hu
    from data.common import load_pipeline_config
    from utils.preset import load_preset
    from zeroshot import ZeroShotScorer, load_eval_model, load_items, prompt_features

    hu, labels = _phantom_ct()
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    _write_sitk(tmp_path / "ct.nii.gz", hu, lps, (0.0, 0.0, 0.0))
    _write_sitk(tmp_path / "seg.nii.gz", labels, lps, (0.0, 0.0, 0.0))
    args = ["--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "seg.nii.gz"), "--json",
            "--checkpoint", str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
            "--items", str(eval_setup / "items.yaml"), "--device", "cpu"]
    assert predict_cli.main(args) == 0
    got = json.loads(capsys.readouterr().out)["items"]

    pipe = load_pipeline_config(REPO / "configs" / "pipeline_demo.yaml")
    image_hu, anatomy = predict_cli.prepare_case(sitk.ReadImage(str(tmp_path / "ct.nii.gz")),
                                                 sitk.ReadImage(str(tmp_path / "seg.nii.gz")), pipe)
    assert anatomy.shape == image_hu.shape and all(a >= b for a, b in zip(anatomy.shape, pipe.min_size_dhw))
    assert set(np.unique(anatomy)) == {0, 1, 2, 3, 4}
    # the spacing already is the demo pipeline's: resampling is the identity, so the cache arrays are
    # crop/pad of the LPS arrays -- also for the same scan stored RAS-style (reoriented to LPS first)
    from data.preprocess import crop_pad_case
    from data.resize import build_label_lut

    want_hu, want_mask = crop_pad_case(hu, build_label_lut(pipe)[labels], pipe)
    np.testing.assert_array_equal(image_hu, want_hu)
    np.testing.assert_array_equal(anatomy, want_mask)
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    far = (4.0 * (hu.shape[2] - 1), 4.0 * (hu.shape[1] - 1), 0.0)
    _write_sitk(tmp_path / "ct_ras.nii.gz", hu[:, ::-1, ::-1].copy(), ras, far)
    _write_sitk(tmp_path / "seg_ras.nii.gz", labels[:, ::-1, ::-1].copy(), ras, far)
    ras_hu, ras_mask = predict_cli.prepare_case(sitk.ReadImage(str(tmp_path / "ct_ras.nii.gz")),
                                                sitk.ReadImage(str(tmp_path / "seg_ras.nii.gz")), pipe)
    np.testing.assert_array_equal(ras_hu, want_hu)
    np.testing.assert_array_equal(ras_mask, want_mask)
    model, tok = load_eval_model(load_preset(eval_setup / "preset.yaml"), eval_setup / "run" / "checkpoint_3.pth",
                                 torch.device("cpu"))
    roi, items = load_items(eval_setup / "items.yaml")
    scorer = ZeroShotScorer(model, items, pipe.anatomy_names, prompt_features(model, tok, items, 16, torch.device("cpu")),
                            roi, torch.device("cpu"), transform=lambda x: scale_hu(x, pipe.hu_window))
    want = scorer(image_hu, anatomy)
    np.testing.assert_allclose([g["probability"] for g in got], [want[i.column] for i in items], rtol=1e-6)


def test_predict_bad_mask_is_a_clear_error(eval_setup, tmp_path, capsys):
    import predict as predict_cli

    hu, labels = _phantom_ct()
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    _write_sitk(tmp_path / "ct.nii.gz", hu, lps, (0.0, 0.0, 0.0))
    _write_sitk(tmp_path / "seg.nii.gz", labels[:, :, :40].copy(), lps, (0.0, 0.0, 0.0))
    args = ["--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "seg.nii.gz"),
            "--checkpoint", str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
            "--items", str(eval_setup / "items.yaml"), "--device", "cpu"]
    assert predict_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("predict: error:") and "geometry" in err and len(err.splitlines()) == 1
