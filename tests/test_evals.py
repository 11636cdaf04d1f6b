"""Evaluations beyond zero-shot: external import, labels maps, retrieval, embeddings, probes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from data import import_ct
from data.common import PipelineError, volume_relpath
from data.labels_map import LabelsMapError, map_external_labels
from data.synthetic_external import write_dicom_series, write_nifti_ras, write_npz
from tests.test_eval import eval_setup  # noqa: F401  (tiny preset, random checkpoint, fake cache of 3 volumes)
from utils.retrieval import NO_COMMON, anatomy_similarity, chance_mean_rank, chance_recall, ranks

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-150.0, -120.5, -300.25)


# ----------------------------------------------------------------------------- importer

def _phantom() -> np.ndarray:
    """(D, H, W) int16 HU, asymmetric along every axis so that any flip shows."""
    z, y, x = np.mgrid[0:9, 0:12, 0:14]
    return (-1000 + 37 * z + 11 * y + 3 * x + (x * y * z) % 7).astype(np.int16)


def _write_lps_nifti(path: Path, hu: np.ndarray) -> None:
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def four_formats(tmp_path) -> tuple[Path, np.ndarray]:
    hu = _phantom()
    src = tmp_path / "src"
    src.mkdir()
    _write_lps_nifti(src / "lps.nii.gz", hu)
    write_nifti_ras(src / "ras.nii.gz", hu, SPACING, ORIGIN)
    write_dicom_series(src / "dicom", hu, SPACING, ORIGIN)
    write_npz(src / "npz.npz", hu, SPACING, ORIGIN)
    return src, hu


def test_lps_nifti_ras_nifti_dicom_and_npz_give_the_same_fixed_volume(four_formats, tmp_path):
    src, hu = four_formats
    summary = import_ct.run(src, tmp_path / "root", "valid", pbar=False)
    assert (summary.processed, summary.failed) == (4, [])
    for vid in ("lps", "ras", "dicom", "npz"):
        name = import_ct.volume_name("valid", vid)
        assert import_ct.volume_id(name) == vid
        out = tmp_path / "root" / "valid_fixed" / f"valid_{vid}" / f"valid_{vid}_a" / name
        img = sitk.ReadImage(str(out))
        assert img.GetPixelID() == sitk.sitkInt16
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu, err_msg=vid)
        np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-4, err_msg=vid)
        np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-3, err_msg=vid)
        np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6, err_msg=vid)


def test_npz_spacing_order_and_csv_listing_with_ids(tmp_path):
    hu = _phantom()
    np.savez(tmp_path / "scan_one.npz", volume=hu, spacing=np.array(SPACING))  # only array: any key; xyz order
    (tmp_path / "list.csv").write_text("path,id\nscan_one.npz,rc-001\n")
    root = tmp_path / "root"
    assert import_ct.main(["--input", str(tmp_path / "list.csv"), "--data-root", str(root), "--split", "valid",
                           "--npz-spacing-order", "xyz", "--no-pbar"]) == 0
    img = sitk.ReadImage(str(root / "valid_fixed/valid_rc-001/valid_rc-001_a/valid_rc-001_a_1.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu)
    np.testing.assert_allclose(img.GetSpacing(), SPACING)
    # spacing from the listing when the NPZ has none
    np.savez(tmp_path / "bare.npz", ct=hu)
    (tmp_path / "list2.csv").write_text("path,spacing_x,spacing_y,spacing_z\nbare.npz,0.8,0.7,2.5\n")
    assert import_ct.run(tmp_path / "list2.csv", root, "valid", pbar=False).processed == 1
    img = sitk.ReadImage(str(root / "valid_fixed/valid_bare/valid_bare_a/valid_bare_a_1.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), SPACING)
    (tmp_path / "list3.csv").write_text("path,spacing_x,spacing_y,spacing_z\nbare.npz,0.8,,2.5\n")
    with pytest.raises(PipelineError, match="needs numbers in spacing_x"):
        import_ct.list_sources(tmp_path / "list3.csv")
    (tmp_path / "list4.csv").write_text("path\ngone.nii.gz\n")
    summary = import_ct.run(tmp_path / "list4.csv", root, "valid", pbar=False)
    assert summary.failed == [("valid_gone_a_1.nii.gz", f"missing input: {tmp_path / 'gone.nii.gz'}")]


def test_importer_bad_inputs_are_failed_cases_or_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "nospacing.npz", ct=_phantom())
    (src / "empty_dicom").mkdir()
    _write_lps_nifti(src / "good.nii.gz", _phantom())
    root = tmp_path / "root"
    # ids with '_' cannot follow the CT-RATE layout: refused before anything is written
    assert import_ct.main(["--input", str(src), "--data-root", str(root), "--split", "valid", "--no-pbar"]) == 2
    assert "must hold only letters" in capsys.readouterr().err and not root.exists()
    (src / "empty_dicom").rename(src / "emptydicom")
    (src / "nospacing.npz").rename(src / "nospacing2.npz")
    assert import_ct.main(["--input", str(src), "--data-root", str(root), "--split", "valid", "--no-pbar"]) == 1
    failures = pd.read_csv(root / "import_valid_failures.csv").set_index("volume")["reason"]
    assert "no 3-number 'spacing'" in failures["valid_nospacing2_a_1.nii.gz"]
    assert "no DICOM series" in failures["valid_emptydicom_a_1.nii.gz"]
    assert list(root.glob("valid_fixed/*/*/*.nii.gz")) == [root / "valid_fixed/valid_good/valid_good_a/valid_good_a_1.nii.gz"]
    summary = import_ct.run(src, root, "valid", pbar=False)  # rerun: the good one is skipped
    assert summary.skipped == 1 and len(summary.failed) == 2
    nan = _phantom().astype(np.float32)
    nan[0, 0, :2] = np.nan
    nan[1, 1, 1] = np.inf
    np.savez(src / "nannpz.npz", ct=nan, spacing=np.asarray(SPACING[::-1]))
    _write_lps_nifti(src / "naninii.nii.gz", nan)  # float NIfTI: SimpleITK would read NaN as a number
    import_ct.run(src, root, "valid", pbar=False)
    failures = pd.read_csv(root / "import_valid_failures.csv").set_index("volume")["reason"]
    for name, file in (("valid_nannpz_a_1.nii.gz", "nannpz.npz"), ("valid_naninii_a_1.nii.gz", "naninii.nii.gz")):
        assert failures[name] == f"3 non-finite voxels (NaN or inf) in {file}: replace or drop the volume"
        assert not (root / "valid_fixed" / volume_relpath(name)).exists()
    assert import_ct.main(["--input", str(tmp_path / "nowhere"), "--data-root", str(root), "--split", "valid"]) == 2


# ----------------------------------------------------------------------------- labels map

def _write_map(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"id_column": "NoteAcc_DEID",
                                    "columns": {"Emphysema": "emph", "Cardiomegaly": None}}))
    return path


def test_labels_map_leaves_unlabelled_items_out_with_a_note(tmp_path):
    preds = pd.DataFrame({"file_name": ["valid_a1_a_1.nii.gz", "valid_b2_a_1.nii.gz"],
                          "lung_Emphysema_No._Yes.": [0.9, 0.1], "heart_Cardiomegaly_No._Yes.": [0.2, 0.3],
                          "esophagus_Hiatal hernia_No._Yes.": [0.5, 0.5]})
    (tmp_path / "labels.csv").write_text("NoteAcc_DEID,emph,other\nb2,0,1\na1,1,0\n")
    kept, labels, notes = map_external_labels(preds, tmp_path / "labels.csv", _write_map(tmp_path / "map.yaml"))
    assert list(kept.columns) == ["file_name", "lung_Emphysema_No._Yes."]
    assert labels.to_dict("list") == {"VolumeName": list(preds["file_name"]), "Emphysema": [1, 0]}
    assert len(notes) == 2 and "Cardiomegaly" in notes[0] and "mapped to null" in notes[0]
    assert "Hiatal hernia" in notes[1] and "not in the labels map" in notes[1]
    (tmp_path / "short.csv").write_text("NoteAcc_DEID,emph\na1,1\n")
    with pytest.raises(LabelsMapError, match="1 volume.*valid_b2_a_1"):
        map_external_labels(preds, tmp_path / "short.csv", tmp_path / "map.yaml")


def test_calc_metrics_with_labels_map(tmp_path, capsys):
    import calc_metrics

    n = 8
    ids = [f"v{i}" for i in range(n)]
    y = np.array([0, 1] * (n // 2))
    pd.DataFrame({"file_name": [import_ct.volume_name("valid", i) for i in ids],
                  "lung_Emphysema_No._Yes.": 0.2 + 0.6 * y, "heart_Cardiomegaly_No._Yes.": 0.5}
                 ).to_csv(tmp_path / "pred.csv", index=False)
    pd.DataFrame({"NoteAcc_DEID": ids, "emph": y}).to_csv(tmp_path / "labels.csv", index=False)
    assert calc_metrics.main(["--csv_file", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv"),
                              "--labels-map", str(_write_map(tmp_path / "map.yaml"))]) == 0
    report = pd.read_csv(tmp_path / "pred_metrics.csv")
    assert report["abnormality"].tolist() == ["Emphysema", "mean"] and report["auc"].tolist() == [1.0, 1.0]
    assert calc_metrics.main(["--csv_file", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv"),
                              "--labels-map", str(tmp_path / "nomap.yaml")]) == 2
    assert "labels map not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- retrieval metrics

def test_ranks_recall_and_chance_on_a_hand_made_matrix():
    sim = np.array([[0.9, 0.1, 0.2, 0.0],    # query 0: its report first -> rank 1
                    [0.8, 0.5, 0.6, 0.7],    # query 1: three negatives above 0.5 -> rank 4
                    [0.1, 0.3, 0.3, 0.2],    # query 2: tie with a negative counts for it -> rank 1
                    [0.5, 0.4, 0.6, 0.55]])  # query 3: one above 0.55 -> rank 2
    rank, pos = ranks(sim, ["a", "b", "c", "d"], ["a", "b", "c", "d"], block_rows=3)
    assert rank.tolist() == [1, 4, 1, 2] and pos.tolist() == [1, 1, 1, 1]
    # a group of two (two reconstructions of one scan): the best positive counts
    rank, pos = ranks(sim, ["a", "a", "c", "d"], ["a", "a", "c", "d"])
    assert rank.tolist() == [1, 1, 1, 2] and pos.tolist() == [2, 2, 1, 1]
    # a query whose positive has no shared anatomy is left out
    sim[3, 3] = NO_COMMON
    assert math.isnan(ranks(sim, list("abcd"), list("abcd"))[0][3])
    assert chance_recall(4, np.array([1]), 1) == pytest.approx(0.25)
    assert chance_recall(4, np.array([1]), 2) == pytest.approx(0.5)
    assert chance_recall(4, np.array([2]), 1) == pytest.approx(0.5)
    assert chance_recall(4, np.array([2]), 3) == pytest.approx(1.0)
    assert chance_recall(100, np.array([1, 1]), 10) == pytest.approx(0.1)
    assert chance_mean_rank(4, np.array([1])) == pytest.approx(2.5)  # uniform over 1..4
    rng = np.random.default_rng(0)  # chance matches a random similarity
    noise = rng.random((400, 400))
    rk, p = ranks(noise, list(range(400)), list(range(400)))
    assert np.mean(rk <= 40) == pytest.approx(chance_recall(400, p, 40), abs=0.04)


def test_anatomy_similarity_is_the_mean_over_shared_anatomies_in_any_block():
    e = np.eye(3, dtype=np.float32)
    image = np.stack([np.stack([e[0], e[1]]), np.stack([e[1], e[2]])])  # (2 volumes, 2 anatomies, 3)
    text = np.stack([np.stack([e[0], e[2]]), np.stack([e[1], e[1]]), np.stack([e[0], e[1]])])
    img_present = np.array([[True, True], [True, False]])
    txt_present = np.array([[True, True], [True, True], [False, False]])
    expected = np.array([[(1 + 0) / 2, (0 + 1) / 2, NO_COMMON],
                         [0.0, 1.0, NO_COMMON]])  # volume 1 shares only anatomy 0
    for block in (1, 2, 512):
        np.testing.assert_allclose(anatomy_similarity(image, img_present, text, txt_present, block_rows=block),
                                   expected)


# ----------------------------------------------------------------------------- probe

def test_probe_separates_a_linearly_coded_finding_and_not_noise(tmp_path):
    from utils.probe import cross_validated_probs, design_matrix
    from utils.metrics import item_metrics

    rng = np.random.default_rng(0)
    n = 120
    y = (np.arange(n) % 2).astype(np.int64)
    feats = rng.normal(size=(n, 2, 8)).astype(np.float32)
    feats[:, 0, 3] += 3.0 * (2 * y - 1)  # anatomy 0 carries the finding
    present = np.ones((n, 2), bool)
    groups = [f"p{i // 2}" for i in range(n)]  # two volumes per patient
    p_in = cross_validated_probs(design_matrix(feats, present, [0]), y, groups, folds=5)
    p_out = cross_validated_probs(design_matrix(feats, present, [1]), y, groups, folds=5)
    assert item_metrics(y, p_in)["auc"] > 0.98
    assert abs(item_metrics(y, p_out)["auc"] - 0.5) < 0.15
    x = design_matrix(feats, np.array([[True, False]] * n), [0, 1])
    assert x.shape == (n, 18) and not x[:, 9:].any()  # absent anatomy: zeros and a 0 flag


# ----------------------------------------------------------------------------- embed, retrieval, probe CLIs

def _model_args(tmp: Path) -> list[str]:
    return ["--config", str(tmp / "preset.yaml"), "--items", str(tmp / "items.yaml"), "--no-pbar"]


def test_embed_is_resumable_and_equals_a_full_run(eval_setup, tmp_path, monkeypatch):  # noqa: F811
    import embed
    from utils import embeddings

    full = tmp_path / "full.npz"
    assert embed.main(_model_args(eval_setup) + ["--output", str(full)]) == 0
    ref = embeddings.ImageEmbeddings.load(full)
    assert sorted(ref.names) == ["valid_10_a_1.nii.gz", "valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    assert ref.projected.shape == (3, 4, 256) and ref.pooled.shape == (3, 4, 32)
    no_heart = ref.names.index("valid_2_a_1.nii.gz")
    assert ref.present.sum() == 11 and not ref.present[no_heart, 1]
    assert np.isnan(ref.projected[no_heart, 1]).all() and np.isnan(ref.projected).sum() == 256
    np.testing.assert_allclose(np.linalg.norm(ref.projected[ref.present], axis=-1), 1.0, rtol=1e-5)

    calls = []
    real = embeddings.AnatomyFeatureExtractor.__call__

    def dying(self, image, mask):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two volumes
        calls.append(1)
        return real(self, image, mask)

    out = tmp_path / "resumed.npz"
    monkeypatch.setattr(embeddings.AnatomyFeatureExtractor, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        embed.main(_model_args(eval_setup) + ["--output", str(out), "--save-every", "1"])
    assert not out.exists() and len(embeddings.ImageEmbeddings.load(embeddings.partial_path(out)).names) == 2
    calls.clear()
    monkeypatch.setattr(embeddings.AnatomyFeatureExtractor, "__call__",
                        lambda self, image, mask: (calls.append(1), real(self, image, mask))[1])
    assert embed.main(_model_args(eval_setup) + ["--output", str(out)]) == 0
    assert len(calls) == 1 and not embeddings.partial_path(out).exists()
    got = embeddings.ImageEmbeddings.load(out)
    assert got.names == ref.names
    np.testing.assert_allclose(np.nan_to_num(got.projected), np.nan_to_num(ref.projected), atol=1e-6)
    np.testing.assert_allclose(np.nan_to_num(got.pooled), np.nan_to_num(ref.pooled), atol=1e-6)


def test_embed_pooled_features_project_to_the_eval_features(eval_setup, tmp_path):  # noqa: F811
    """pooled -> vision_projs[a] -> normalise gives the projected feature eval.py scores with."""
    import torch

    import embed
    from utils.checkpoint import load_checkpoint
    from utils.embeddings import ImageEmbeddings

    out = tmp_path / "e.npz"
    assert embed.main(_model_args(eval_setup) + ["--output", str(out)]) == 0
    emb = ImageEmbeddings.load(out)
    state = load_checkpoint(eval_setup / "run" / "checkpoint_3.pth")["model"]
    for a in range(4):
        w, b = state[f"vision_projs.{a}.weight"], state[f"vision_projs.{a}.bias"]
        rows = emb.present[:, a]
        proj = torch.nn.functional.normalize(torch.from_numpy(emb.pooled[rows, a]) @ w.T + b, dim=-1)
        np.testing.assert_allclose(proj.numpy(), emb.projected[rows, a], atol=1e-5)


def test_external_set_end_to_end_through_the_pipeline_and_every_evaluation(eval_setup, tmp_path, capsys):  # noqa: F811
    """synthetic external set -> import -> masks -> resize -> preprocess -> eval -> calc_metrics, embed,
    retrieval (both text kinds), probe."""
    import calc_metrics
    import embed
    import eval as eval_cli
    import probe
    import retrieval
    from data import generate_mask, preprocess, resize
    from data.synthetic_external import generate_external

    ext, root = tmp_path / "external", tmp_path / "root"
    formats = generate_external(ext, n=6, seed=0)
    assert sorted(set(formats.values())) == ["dicom", "nifti_ras", "npz"]
    pipe = ["--data-root", str(root), "--split", "valid", "--config", "configs/pipeline_demo.yaml", "--no-pbar"]
    assert import_ct.main(["--input", str(ext / "volumes")] + pipe) == 0
    assert generate_mask.main(pipe + ["--masks-from", str(ext / "masks")]) == 0
    assert resize.main(pipe) == 0
    assert preprocess.main(pipe) == 0
    for name in ("desc_info.json", "conc_info.json"):
        (root / name).write_bytes((ext / name).read_bytes())

    model = _model_args(eval_setup) + ["--data-root", str(root)]
    pred = tmp_path / "res" / "external.csv"
    assert eval_cli.main(model + ["--csv_file", str(pred)]) == 0
    assert len(pd.read_csv(pred)) == 6
    labels_map = REPO / "configs" / "labels" / "synthetic_external.yaml"
    assert calc_metrics.main(["--csv_file", str(pred), "--labels", str(ext / "labels.csv"),
                              "--labels-map", str(labels_map)]) == 0
    report = pd.read_csv(tmp_path / "res" / "external_metrics.csv")
    # the phantom simulates 11 findings, 2 have no column in the external labels: 9 scored + mean
    assert len(report) == 10 and "Hiatal hernia" not in set(report["abnormality"])

    emb = tmp_path / "res" / "emb.npz"
    assert embed.main(model + ["--output", str(emb)]) == 0
    for texts in ("anatomy", "report"):
        out = tmp_path / "res" / f"retrieval_{texts}.csv"
        extra = ["--reports", str(_reports_csv(ext, tmp_path))] if texts == "report" else []
        assert retrieval.main(model + ["--embeddings", str(emb), "--texts", texts, "--output", str(out)] + extra) == 0
        table = pd.read_csv(out)
        assert set(table["kind"]) == {"measured", "chance"} and (table["gallery"] == 6).all()
        measured = table[table["kind"] == "measured"]
        assert ((measured[[f"R@{k}" for k in (1, 5, 10, 50, 100)]] >= 0).all().all()
                and (measured["R@10"] == 1.0).all())  # gallery of 6: every positive is in the top 10
    assert "all anatomies volume->report" in capsys.readouterr().out
    assert probe.main(["--embeddings", str(emb), "--labels", str(ext / "labels.csv"), "--labels-map",
                       str(labels_map), "--folds", "2", "--features", "pooled", "--items",
                       str(REPO / "configs" / "zeroshot_items_demo.yaml")]) == 0
    probe_report = pd.read_csv(emb.with_name("emb_probe_pooled.csv"))
    assert list(probe_report.columns) == list(report.columns) and len(probe_report) == 10
    train = tmp_path / "train.txt"
    train.write_text("\n".join(import_ct.volume_name("valid", i) for i in sorted(formats)[:4]) + "\n")
    out = tmp_path / "given_split.csv"
    assert probe.main(["--embeddings", str(emb), "--labels", str(ext / "labels.csv"), "--labels-map",
                       str(labels_map), "--train-list", str(train), "--output", str(out)]) == 0
    assert pd.read_csv(out)["n"].tolist() == [2] * 10  # fitted on 4, the other 2 scored
    # bad input: one line naming the file, exit 2
    capsys.readouterr()
    probe_args = ["--embeddings", str(emb), "--labels", str(ext / "labels.csv"), "--labels-map", str(labels_map)]
    assert probe.main(probe_args + ["--items", str(tmp_path / "no_items.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe: error: ") and "no_items.yaml" in err and err.count("\n") == 1
    assert probe.main(probe_args + ["--train-list", str(tmp_path / "no_list.txt")]) == 2
    assert capsys.readouterr().err == f"probe: error: volume list not found: {tmp_path / 'no_list.txt'} (set --train-list)\n"
    # a finished embeddings file is reused as it is, not rewritten
    before = emb.stat().st_mtime_ns
    assert embed.main(model + ["--output", str(emb)]) == 0
    assert emb.stat().st_mtime_ns == before


def _reports_csv(ext: Path, tmp: Path) -> Path:
    """Free-text reports of the external set, joined from its anatomy-wise texts."""
    import json

    desc, conc = (json.loads((ext / f"{k}_info.json").read_text()) for k in ("desc", "conc"))
    rows = [{"VolumeName": f"{scan}_1.nii.gz", "Findings_EN": " ".join(desc.get(scan, {}).values()),
             "Impressions_EN": " ".join(conc.get(scan, {}).values()) or "Normal."} for scan in sorted(desc)]
    path = tmp / "reports.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_retrieval_pairs_each_volume_with_its_own_report(eval_setup, tmp_path, monkeypatch):  # noqa: F811
    """Texts whose features equal the volume's image features: every query finds its own item first,
    in both variants, so names, groups and directions are wired up right."""
    import retrieval

    def own_features(s, names, kind, reports, cache, progress):
        from utils.embeddings import ImageEmbeddings

        emb = ImageEmbeddings.load(tmp_path / "e.npz").select(names)
        if kind == "report":
            return retrieval.whole_volume(emb.projected, emb.present)[0], np.ones((len(names), 1), bool)
        return emb.projected, np.ones_like(emb.present)

    monkeypatch.setattr(retrieval, "text_features", own_features)
    for texts in ("anatomy", "report"):
        out = tmp_path / f"r_{texts}.csv"
        assert retrieval.main(_model_args(eval_setup) + ["--embeddings", str(tmp_path / "e.npz"), "--texts", texts,
                                                         "--output", str(out)]) == 0
        table = pd.read_csv(out)
        measured = table[table["kind"] == "measured"]
        assert (measured["R@1"] == 1.0).all() and (measured["mean_rank"] == 1.0).all(), table
        chance = table[table["kind"] == "chance"]
        assert np.allclose(chance["R@1"], 1 / 3) and np.allclose(chance["mean_rank"], 2.0)
