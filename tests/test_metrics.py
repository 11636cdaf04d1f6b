"""calc_metrics.py / utils/metrics.py: spec §8 on hand-computed examples and the release's CSV."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import calc_metrics
from utils.metrics import (
    METRICS,
    SingleClassWarning,
    align,
    bootstrap_ci,
    compute_metrics,
    fast_item_metrics,
    item_metrics,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CSV = REPO / "tests" / "data" / "fvlm_release_valid_probs.csv"  # the release's zero-shot output
LABEL_COLUMNS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
EMPH = "lung_Emphysema_Not Emphysema._Emphysema."
CARDIO = "heart_Cardiomegaly_Not Cardiomegaly._Cardiomegaly."


def _write_hand_example(tmp_path: Path) -> tuple[Path, Path]:
    """5 volumes, 2 items. Empty cell for valid_5 (anatomy absent) must count as 0."""
    pred = tmp_path / "pred.csv"
    pred.write_text(
        f"file_name,{EMPH},{CARDIO}\n"
        "valid_1_a_1.nii.gz,0.9,0.1\n"
        "valid_2_a_1.nii.gz,0.3,0.8\n"
        "valid_3_a_1.nii.gz,0.6,0.8\n"
        "valid_4_a_1.nii.gz,0.2,0.5\n"
        "valid_5_a_1.nii.gz,,0.05\n"
    )
    labels = pd.DataFrame({"VolumeName": [f"valid_{i}_a_1.nii.gz" for i in (5, 4, 3, 2, 1, 6)]})
    for c in LABEL_COLUMNS:
        labels[c] = 0
    # rows are in another order than the predictions and hold an extra volume: matching is by name
    labels["Emphysema"] = [0, 0, 0, 1, 1, 1]
    labels["Cardiomegaly"] = [1, 1, 0, 1, 0, 0]
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    return pred, path


def test_hand_example_every_figure(tmp_path):
    pred, labels = _write_hand_example(tmp_path)
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 0
    report = pd.read_csv(tmp_path / "pred_metrics.csv").set_index("abnormality")

    # Emphysema: labels [1,1,0,0,0], probs [0.9,0.3,0.6,0.2,0(NaN)].
    # AUC: positive/negative pairs won: 0.9 > {0.6,0.2,0} (3), 0.3 > {0.2,0} (2) -> 5/6.
    # thresholds i/99: i=0..19 TPR 1 FPR 2/3; i=20..29 (0.2 <= t < 0.3) TPR 1 FPR 1/3 -> 1/3 (min);
    # i=30..59 -> 0.601; i=60..89 -> 0.5; i>=90 -> 1. Tie over i=20..29 -> the later: t = 29/99.
    # predictions [1,1,1,0,0]: TP 2, FP 1, TN 2, FN 0.
    e = report.loc["Emphysema"]
    assert e["auc"] == pytest.approx(5 / 6)
    assert e["threshold"] == pytest.approx(29 / 99)
    assert e["accuracy"] == pytest.approx(4 / 5)
    assert e["specificity"] == pytest.approx(2 / 3)
    assert e["sensitivity"] == pytest.approx(1.0)
    assert e["precision"] == pytest.approx(2 / 3)
    # F1 class 1 = 2*2/(2*2+1+0) = 0.8 (support 2); class 0: P 1, R 2/3 -> 0.8 (support 3)
    assert e["f1_weighted"] == pytest.approx(0.8)

    # Cardiomegaly: labels [0,1,0,1,1], probs [0.1,0.8,0.8,0.5,0.05].
    # AUC: 0.8 vs {0.1: 1, 0.8: 0.5}, 0.5 vs {0.1: 1}, 0.05: 0 -> 2.5/6 = 5/12.
    # i=10..49 (0.1 <= t < 0.5): TPR 2/3, FPR 1/2 -> 0.601 (min; others 1, 1.054, 0.833, 1) -> t = 49/99.
    # predictions [0,1,1,1,0]: TP 2, FP 1, TN 1, FN 1.
    c = report.loc["Cardiomegaly"]
    assert c["auc"] == pytest.approx(5 / 12)
    assert c["threshold"] == pytest.approx(49 / 99)
    assert c["accuracy"] == pytest.approx(3 / 5)
    assert c["specificity"] == pytest.approx(1 / 2)
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["precision"] == pytest.approx(2 / 3)
    # F1 class 1 = 4/6 (support 3), class 0 = 2/4 (support 2) -> (3*2/3 + 2*1/2)/5 = 0.6
    assert c["f1_weighted"] == pytest.approx(0.6)

    m = report.loc["mean"]
    for key, want in dict(auc=(5 / 6 + 5 / 12) / 2, accuracy=0.7, specificity=7 / 12, sensitivity=5 / 6,
                          f1_weighted=0.7, precision=2 / 3).items():
        assert m[key] == pytest.approx(want), key
    assert (tmp_path / "pred_metrics.md").read_text().count("\n|") >= 4
    assert (tmp_path / "pred_roc.png").stat().st_size > 1000


def test_tie_between_distinct_operating_points_takes_the_later_threshold():
    # labels [1,1,0,0], probs [0.9,0.4,0.7,0.1]:
    # i=10..39 (0.1 <= t < 0.4): TPR 1, FPR 1/2 -> 0.5 ; i=70..89 (0.7 <= t < 0.9): TPR 1/2, FPR 0 -> 0.5.
    # Later threshold wins: t = 89/99, predictions [1,0,0,0].
    labels, probs = np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.7, 0.1])
    m = item_metrics(labels, probs)
    assert m["threshold"] == pytest.approx(89 / 99)
    # AUC: 0.9 beats both negatives, 0.4 beats 0.1 only -> 3/4; predictions [1,0,0,0]: TP 1, FN 1, TN 2
    want = dict(auc=3 / 4, accuracy=3 / 4, specificity=1.0, sensitivity=1 / 2, precision=1.0,
                f1_weighted=(2 / 3 + 0.8) / 2)  # class 1: 2/(2+1) = 2/3; class 0: 4/(4+1) = 0.8
    for key, value in want.items():
        assert m[key] == pytest.approx(value), key
    np.testing.assert_allclose(fast_item_metrics(labels, probs), [want[k] for k in METRICS], rtol=0, atol=1e-12)


def test_fast_path_equals_item_metrics():
    rng = np.random.default_rng(1)
    for n in (7, 50, 300):
        y = (rng.random(n) < 0.3).astype(np.int64)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), 1)  # many ties
        m = item_metrics(y, p)
        fast = fast_item_metrics(y, p)
        np.testing.assert_allclose(fast, [m[k] for k in METRICS], rtol=0, atol=1e-12)


def test_single_class_abnormality_is_nan_and_left_out_of_the_mean(tmp_path):
    pred, labels = _write_hand_example(tmp_path)
    df = pd.read_csv(labels)
    df["Cardiomegaly"] = 0
    df.to_csv(labels, index=False)
    table = align(pd.read_csv(pred), pd.read_csv(labels))
    with pytest.warns(SingleClassWarning, match="Cardiomegaly"):
        report = compute_metrics(table).set_index("abnormality")
    assert np.isnan(report.loc["Cardiomegaly", "auc"])
    assert report.loc["mean", "auc"] == pytest.approx(5 / 6)


def test_missing_file_names_are_an_error(tmp_path, capsys):
    pred, labels = _write_hand_example(tmp_path)
    with open(pred, "a") as f:
        f.write("valid_99_a_1.nii.gz,0.5,0.5\nvalid_98_b_2.nii.gz,0.5,0.5\n")
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "2 file name(s)" in err and "valid_99_a_1.nii.gz" in err and "valid_98_b_2.nii.gz" in err


def test_unknown_abnormality_column_is_an_error(tmp_path, capsys):
    pred, labels = _write_hand_example(tmp_path)
    df = pd.read_csv(pred).rename(columns={CARDIO: "heart_Cardiomegalyy_Not X._X."})
    df.to_csv(pred, index=False)
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Cardiomegalyy" in err


def test_unreadable_csv_is_an_error(tmp_path, capsys):
    _, labels = _write_hand_example(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\xff\xfe garbage")
    assert calc_metrics.main(["--csv_file", str(bad), "--labels", str(labels)]) == 2
    assert calc_metrics.main(["--csv_file", str(tmp_path / "none.csv"), "--labels", str(labels)]) == 2
    assert calc_metrics.main(["--csv_file", str(labels), "--labels", str(tmp_path / "nolabels.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("calc_metrics: error:") for line in err)


def test_default_labels_path_under_data_root(tmp_path):
    pred, labels = _write_hand_example(tmp_path)
    root = tmp_path / "root"
    (root / "multi_abnormality_labels").mkdir(parents=True)
    shutil.copy(labels, root / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert calc_metrics.main(["--csv_file", str(pred), "--data-root", str(root)]) == 0


def test_bootstrap_ci_brackets_point_estimate_and_is_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    names = [f"valid_{i}_a_1.nii.gz" for i in range(n)]
    labels = pd.DataFrame({"VolumeName": names, **{c: (rng.random(n) < 0.3).astype(int) for c in LABEL_COLUMNS}})
    pred = pd.DataFrame({"file_name": names, EMPH: np.clip(labels["Emphysema"] * 0.3 + rng.random(n) * 0.7, 0, 1),
                         CARDIO: rng.random(n)})
    pred.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "l.csv", index=False)
    args = ["--csv_file", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "l.csv"), "--bootstrap", "200",
            "--seed", "3"]
    assert calc_metrics.main(args) == 0
    first = pd.read_csv(tmp_path / "p_metrics.csv")
    for m in METRICS:
        assert (first[f"{m}_ci_low"] <= first[m] + 1e-12).all(), m
        assert (first[m] <= first[f"{m}_ci_high"] + 1e-12).all(), m
    assert (first["auc_ci_high"] - first["auc_ci_low"] > 0.01).all()
    assert calc_metrics.main(args) == 0
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "p_metrics.csv"))
    table = align(pred, labels)
    low, _ = bootstrap_ci(table, 20, seed=4)
    low2, _ = bootstrap_ci(table, 20, seed=5)
    assert not np.allclose(low, low2)


def test_reads_the_release_csv_unchanged(tmp_path):
    csv = tmp_path / "fvlm_release.csv"
    shutil.copy(REFERENCE_CSV, csv)
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    probs = pd.read_csv(csv)
    rng = np.random.default_rng(0)
    labels = pd.DataFrame({"VolumeName": probs["file_name"][::-1].to_numpy()})
    for c in LABEL_COLUMNS:
        labels[c] = (rng.random(len(labels)) < 0.2).astype(int)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleClassWarning)
        assert calc_metrics.main(["--csv_file", str(csv), "--labels", str(tmp_path / "labels.csv")]) == 0
    assert hashlib.sha256(csv.read_bytes()).hexdigest() == digest
    report = pd.read_csv(tmp_path / "fvlm_release_metrics.csv").set_index("abnormality")
    assert len(report) == 17 and report.index[-1] == "mean"
    # independent recomputation of one AUC: NaN -> 0, labels matched by VolumeName, AUC as the
    # fraction of (positive, negative) pairs ranked right, ties counting half
    merged = probs.merge(labels, left_on="file_name", right_on="VolumeName")
    col = "esophagus_Hiatal hernia_Not Hiatal hernia._Hiatal hernia."
    assert probs[col].isna().any()
    score, positive = merged[col].fillna(0).to_numpy(), merged["Hiatal hernia"].to_numpy() == 1
    pos, neg = score[positive][:, None], score[~positive][None, :]
    want = (pos > neg).mean() + 0.5 * (pos == neg).mean()
    assert report.loc["Hiatal hernia", "auc"] == pytest.approx(want, abs=1e-12)
