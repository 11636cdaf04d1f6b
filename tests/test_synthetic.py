"""Synthetic mini CT-RATE: layout, determinism, stored geometry/HU, labels, texts, vocabulary, visibility."""
import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from data import synthetic as syn
from data.io import IDENTITY_DIRECTION
from data.texts import compose_anatomy_text, is_abnormal, normal_template

N_TRAIN, N_VALID = 3, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn_a")
    return out, syn.generate_dataset(out, n_train=N_TRAIN, n_valid=N_VALID, seed=3)


@pytest.fixture(scope="module")
def anatomies() -> list[tuple[str, list[str]]]:
    return syn.load_anatomies()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_columns(dataset):
    root, manifest = dataset
    for v in manifest["volumes"]:
        assert v["name"].rsplit("_", 1)[0] == v["scan"] and v["name"].rsplit("_", 2)[0] == v["patient"]
        assert (root / v["split"] / v["patient"] / v["scan"] / v["name"]).is_file()
        assert (root / "totalseg_gt" / v["split"] / v["patient"] / v["scan"] / v["name"]).is_file()
    assert not list(root.rglob(".*tmp*"))
    assert {v["split"] for v in manifest["volumes"]} == {"train", "valid"}
    assert len({v["scan"] for v in manifest["volumes"]}) == N_TRAIN + N_VALID
    for split, meta, rep, lab in (("train", "train", "train", "train"), ("valid", "validation", "validation", "valid")):
        names = [v["name"] for v in manifest["volumes"] if v["split"] == split]
        m = pd.read_csv(root / f"metadata/{meta}_metadata.csv")
        r = pd.read_csv(root / f"radiology_text_reports/{rep}_reports.csv")
        y = pd.read_csv(root / f"multi_abnormality_labels/{lab}_predicted_labels.csv")
        assert tuple(m.columns) == syn.METADATA_COLUMNS and len(syn.METADATA_COLUMNS) == 44
        assert tuple(r.columns) == syn.REPORT_COLUMNS
        assert tuple(y.columns) == ("VolumeName",) + syn.LABEL_COLUMNS and len(syn.LABEL_COLUMNS) == 18
        for table in (m, r, y):
            assert list(table["VolumeName"]) == names and all(n.endswith(".nii.gz") for n in names)
        assert not r.isna().any().any()
    scans = {v["scan"] for v in manifest["volumes"]}
    for name in ("desc_info.json", "conc_info.json"):
        info = json.loads((root / name).read_text())
        assert set(info) == scans
        assert all(set(d) <= {"lung", "heart", "esophagus", "aorta"} for d in info.values())


def test_deterministic_and_workers_independent(dataset, tmp_path):
    root, _ = dataset
    assert syn.main(["--data-root", str(tmp_path), "--n-train", str(N_TRAIN), "--n-valid", str(N_VALID),
                     "--seed", "3", "--workers", "2"]) == 0
    assert _files(root) == _files(tmp_path)


def test_raw_header_is_not_truth_but_metadata_is(dataset):
    root, manifest = dataset
    meta = pd.concat([pd.read_csv(root / "metadata/train_metadata.csv"),
                      pd.read_csv(root / "metadata/validation_metadata.csv")]).set_index("VolumeName")
    for v in manifest["volumes"][:4]:
        rel = Path(v["split"]) / v["patient"] / v["scan"] / v["name"]
        raw = sitk.ReadImage(str(root / rel))
        assert raw.GetSpacing() == (1.0, 1.0, 1.0) and raw.GetOrigin() == (0.0, 0.0, 0.0)
        assert raw.GetDirection() == IDENTITY_DIRECTION
        row = meta.loc[v["name"]]
        sx, sy = ast.literal_eval(row["XYSpacing"])
        truth = syn.load_truth(root, v["name"])
        assert np.allclose((sx, sy, row["ZSpacing"]), truth["spacing_xyz"])
        assert np.allclose(ast.literal_eval(row["ImagePositionPatient"]), truth["origin_xyz"])
        assert ast.literal_eval(row["ImageOrientationPatient"]) == [1, 0, 0, 0, 1, 0]
        d, h, w = truth["hu"].shape
        assert (row["Rows"], row["Columns"], row["NumberofSlices"]) == (h, w, d)
        stored = sitk.GetArrayFromImage(raw).astype(np.int32)
        assert np.array_equal(stored * int(row["RescaleSlope"]) + int(row["RescaleIntercept"]), truth["hu"])
        gt = sitk.ReadImage(str(root / "totalseg_gt" / rel))
        assert gt.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(gt.GetSpacing(), truth["spacing_xyz"]) and np.allclose(gt.GetOrigin(), truth["origin_xyz"])
        assert gt.GetDirection() == IDENTITY_DIRECTION
        assert np.array_equal(sitk.GetArrayFromImage(gt), truth["labels"])


def test_rescales_vary(dataset):
    root, _ = dataset
    meta = pd.read_csv(root / "metadata/train_metadata.csv")
    assert meta["RescaleIntercept"].astype(int).isin([r[1] for r in syn.RESCALES]).all()


def test_labels_use_package_ids_and_cover_anatomies(dataset, anatomies):
    from totalsegmentator.map_to_binary import class_map

    root, manifest = dataset
    ids = {n: i for i, n in class_map["total"].items()}
    needed = {ids[c] for _, classes in anatomies for c in classes}
    for v in manifest["volumes"]:
        present = set(v["labels_present"])
        assert present <= set(class_map["total"])
        assert needed <= present, f"{v['name']} misses {needed - present}"


def test_texts_consistent_with_labels(dataset, anatomies):
    root, manifest = dataset
    desc = json.loads((root / "desc_info.json").read_text())
    conc = json.loads((root / "conc_info.json").read_text())
    items = yaml.safe_load((syn.ZEROSHOT_ITEMS).read_text())["items"]
    prompt = {abn: pos.rstrip(".").lower() for _, abn, _, pos in items}
    labels = pd.concat([pd.read_csv(root / "multi_abnormality_labels/train_predicted_labels.csv"),
                        pd.read_csv(root / "multi_abnormality_labels/valid_predicted_labels.csv")])
    for v in manifest["volumes"]:
        row = labels[labels["VolumeName"] == v["name"]].iloc[0]
        positives = {c for c in syn.LABEL_COLUMNS if row[c] == 1}
        assert positives == set(v["abnormalities"])
        for anatomy, _ in anatomies:
            text = compose_anatomy_text(v["scan"], anatomy, desc, conc)
            own = {a for a in positives if syn.SIMULATED[a][0] == anatomy}
            assert is_abnormal(text, anatomy) == bool(own), (v["scan"], anatomy, text)
            impression = conc.get(v["scan"], {}).get(anatomy, "").lower()
            for abn, (owner, _) in syn.SIMULATED.items():
                if owner == anatomy:  # the impression names exactly the present abnormalities
                    assert (prompt[abn] in impression) == (abn in own), (v["scan"], abn, impression)


def test_prevalence_balanced(dataset):
    _, manifest = dataset
    for split, n in (("train", N_TRAIN), ("valid", N_VALID)):
        scans = {v["scan"]: v["abnormalities"] for v in manifest["volumes"] if v["split"] == split}
        for abn in syn.SIMULATED:
            assert 0 < sum(abn in a for a in scans.values()) < n


def test_vocab_committed_and_no_unk(dataset):
    from transformers import BertTokenizerFast

    vocab = (syn.DEMO_BERT_DIR / "vocab.txt").read_text().splitlines()
    assert vocab == syn.build_demo_vocab()
    config = json.loads((syn.DEMO_BERT_DIR / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) and config["model_type"] == "bert"
    tok = BertTokenizerFast.from_pretrained(str(syn.DEMO_BERT_DIR))
    assert len(tok) == len(vocab)
    root, _ = dataset
    texts = [t for f in ("desc_info.json", "conc_info.json")
             for d in json.loads((root / f).read_text()).values() for t in d.values()]
    for f in ("train_reports.csv", "validation_reports.csv"):
        r = pd.read_csv(root / "radiology_text_reports" / f)
        texts += [t for c in syn.REPORT_COLUMNS[1:] for t in r[c]]
    items = yaml.safe_load(syn.ZEROSHOT_ITEMS.read_text())["items"]
    texts += [p for item in items for p in item[2:]] + [normal_template(a) for a, _ in syn.load_anatomies()]
    texts += [s for group in (syn.CONC, syn.DESC, syn.ABSENT_DESC, syn.NORMAL_DESC) for opts in group.values() for s in opts]
    for t in texts:
        assert tok.unk_token_id not in tok(t)["input_ids"], t


def test_fixed_seed_gives_the_pinned_bytes(dataset):
    """Seed 3 writes what the single-module generator (before the split into data/synthetic/) wrote:
    a changed value means every dataset generated before differs."""
    root, _ = dataset
    pinned = {"desc_info.json": "ab4003e0bf222dcb8cd9600cb6caa216",
              "conc_info.json": "805e5c484b0b35d913ce11ac095a5c27",
              "synthetic_manifest.json": "b8451ff67fcfcba91cee96cc7a1d78ce",  # holds each volume's HU md5
              "metadata/train_metadata.csv": "95467578dc613f4794013614d5c52ab8",
              "radiology_text_reports/validation_reports.csv": "abb92201864de5f1dac73621d19d42fe",
              "multi_abnormality_labels/train_predicted_labels.csv": "fb8e18cab9bf18404123557f56067f95"}
    assert {rel: hashlib.md5((root / rel).read_bytes()).hexdigest() for rel in pinned} == pinned
    truth = syn.load_truth(root, "valid_1_a_1.nii.gz")
    assert truth["hu"].shape == (38, 120, 120)
    assert int(truth["hu"].sum(dtype=np.int64)) == -371339386
    assert int(truth["labels"].sum(dtype=np.int64)) == 2197541


def test_load_truth_unknown_volume(dataset):
    with pytest.raises(KeyError):
        syn.load_truth(dataset[0], "train_999_a_1.nii.gz")


def _phantom(abn: list[str]) -> tuple[np.ndarray, np.ndarray, syn.Grid]:
    """Noise-free render of one patient with exactly the abnormalities `abn`, on a fixed small grid."""
    p = syn.scan_phantom(7, 0, 1, 0, abn)
    grid, _ = syn.recon_grid(p, np.random.default_rng(0), 1, False)
    return (*syn.render(p, grid), grid)


@pytest.fixture(scope="module")
def normal_phantom() -> tuple[np.ndarray, np.ndarray, syn.Grid]:
    return _phantom([])


@pytest.mark.parametrize("abn", list(syn.SIMULATED))
def test_abnormality_visible(abn, normal_phantom):
    hu0, lab0, grid = normal_phantom
    hu1, lab1, _ = _phantom([abn])
    voxel = float(np.prod(grid.spacing_xyz))
    changed = np.abs(hu1 - hu0) > 100
    # At least ~8 voxels of the demo's 4x4x8 mm grid change by > 100 HU.
    assert changed.sum() * voxel >= 8 * 128, abn
    ids = syn.total_ids_by_name()
    lobes = np.isin(lab0, [ids[n] for n in syn.LUNG_LOBES])
    if abn == "Emphysema":
        assert hu1[np.isin(lab1, [ids[n] for n in syn.LUNG_LOBES])].mean() < hu0[lobes].mean() - 25
    if abn == "Cardiomegaly":
        assert (lab1 == ids["heart"]).sum() > 1.6 * (lab0 == ids["heart"]).sum()
    if abn == "Hiatal hernia":
        assert (lab1 == ids["esophagus"]).sum() > 1.5 * (lab0 == ids["esophagus"]).sum()
    if abn == "Coronary artery wall calcification":
        assert ((lab1 == ids["heart"]) & (hu1 > 400)).sum() * voxel >= 4 * 128
    if abn == "Arterial wall calcification":
        assert ((lab1 == ids["aorta"]) & (hu1 > 400)).sum() * voxel >= 4 * 128
    if abn in ("Pleural effusion", "Pericardial effusion"):
        fluid = (hu1 > -20) & (hu1 < 25) & (hu0 != hu1)
        assert fluid.sum() * voxel >= 20 * 128
