"""The four data steps on a tiny synthetic CT-RATE: truth, invariants, resumability, failures, shards."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data import fix_data, generate_mask, preprocess, resize
from data.io import (geometry_from_affine, image_to_mask_path, list_volumes, open_volume, read_geometry,
                        read_spacing_xyz, read_volume, scale_hu, write_volume)
from data.common import (CaseError, Task, load_pipeline_config, parse_shard, run_tasks, select_shard,
                         volume_relpath)
from data.synthetic import generate_dataset, load_truth

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = ("fix", "mask", "resize", "preprocess")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ctrate")
    generate_dataset(root, n_train=3, n_valid=1, seed=0)
    return root


@pytest.fixture(scope="module")
def processed(dataset, tmp_path_factory) -> Path:
    """The dataset after all four steps (train split); tests must not modify it."""
    root = tmp_path_factory.mktemp("processed") / "root"
    shutil.copytree(dataset, root)
    for rc in run_pipeline(root):
        assert rc == 0
    return root


@pytest.fixture
def work(dataset, tmp_path) -> Path:
    """A private copy of the raw dataset, to break."""
    root = tmp_path / "root"
    shutil.copytree(dataset, root)
    return root


def run_step(step: str, root: Path, split: str = "train", *extra: str) -> int:
    common = ["--data-root", str(root), "--split", split, "--no-pbar", *extra]
    if step == "fix":
        return fix_data.main(common)
    if step == "mask":
        return generate_mask.main(common + ["--masks-from", str(root / "totalseg_gt")])
    return {"resize": resize.main, "preprocess": preprocess.main}[step](common)


def run_pipeline(root: Path, split: str = "train", *extra: str) -> list[int]:
    return [run_step(step, root, split, *extra) for step in STEPS]


def failures(root: Path, step: str, split: str = "train") -> dict[str, str]:
    with open(root / f"{step}_{split}_failures.csv", newline="") as f:
        return {row["volume"]: row["reason"] for row in csv.DictReader(f)}


def raw_names(root: Path, split: str = "train") -> list[str]:
    return sorted(p.name for p in (root / split).glob("*/*/*.nii.gz"))


def all_files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, less the failure reports and the lock files (which record their last holder)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith(("_failures.csv", ".lock"))}


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


# ---------------------------------------------------------------------------- cache format

def test_write_volume_round_trip_with_simpleitk(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 2000, size=(5, 6, 7), dtype=np.int16)
    angle = 0.3
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    for name in ("x.nii", "x.nii.gz"):
        path = tmp_path / name
        write_volume(path, array, (0.7, 0.8, 1.5), (-100.0, 20.5, -300.25), direction)
        image = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayFromImage(image), array)
        assert np.allclose(image.GetSpacing(), (0.7, 0.8, 1.5), atol=1e-5)
        assert np.allclose(image.GetOrigin(), (-100.0, 20.5, -300.25), atol=1e-4)
        assert np.allclose(image.GetDirection(), direction, atol=1e-5)
        spacing, origin, direction_read = read_geometry(path)
        assert np.allclose(direction_read, direction, atol=1e-5) and np.allclose(origin, image.GetOrigin())
    memmapped = open_volume(tmp_path / "x.nii")
    assert isinstance(memmapped.base, np.memmap) or isinstance(memmapped, np.memmap)
    assert np.array_equal(memmapped, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "x.nii"))))
    assert read_spacing_xyz(tmp_path / "x.nii") == pytest.approx((0.7, 0.8, 1.5), abs=1e-5)
    assert not list(tmp_path.glob(".tmp-*"))


def test_affine_is_ras_like_simpleitk(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "ref.nii"))
    import nibabel as nib
    assert np.allclose(nib.load(str(tmp_path / "ref.nii")).affine[:3, 3], (-10.0, -20.0, 30.0))
    assert np.allclose(geometry_from_affine(nib.load(str(tmp_path / "ref.nii")).affine)[1], (10, 20, 30))


def test_scale_hu_window():
    hu = np.array([-3000, -1150, -400, 350, 3000], dtype=np.int16)
    expected = np.array([0.0, 0.0, 0.5, 1.0, 1.0], dtype=np.float32)
    assert scale_hu(hu).dtype == np.float32
    assert np.allclose(scale_hu(hu), expected) and np.allclose(scale_hu(hu.astype(np.float32)), expected)
    assert np.allclose(scale_hu(hu[::-1]), expected[::-1])


def test_open_volume_rejects_truncated_and_compressed(tmp_path):
    write_volume(tmp_path / "a.nii", np.ones((4, 5, 6), np.int16), (1, 1, 1))
    data = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "b.nii").write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="truncated"):
        open_volume(tmp_path / "b.nii")
    write_volume(tmp_path / "c.nii.gz", np.ones((4, 5, 6), np.int16), (1, 1, 1))
    with pytest.raises(ValueError, match="compressed"):
        open_volume(tmp_path / "c.nii.gz")


def test_image_to_mask_path():
    path = Path("/d/processed_train_images/train_1/train_1_a/train_1_a_1.nii")
    assert image_to_mask_path(path) == Path("/d/processed_train_masks/train_1/train_1_a/train_1_a_1.nii")


# ---------------------------------------------------------------------------- config and helpers

def test_pipeline_config():
    cfg = load_pipeline_config()
    assert cfg.anatomy_names == ["lung", "heart", "esophagus", "aorta"]
    assert cfg.anatomy_classes[1] == ["heart", "atrial_appendage_left"]
    assert cfg.target_spacing_xyz == (1.0, 1.0, 3.0) and cfg.min_size_dhw == (112, 256, 352)
    assert cfg.crop_margin_dhw == (5, 20, 20) and cfg.pad_hu == -1150
    demo = load_pipeline_config("configs/pipeline_demo.yaml")
    assert demo.target_spacing_xyz == (4.0, 4.0, 8.0)


def test_volume_relpath():
    assert volume_relpath("train_12_b_3.nii.gz") == Path("train_12/train_12_b/train_12_b_3.nii.gz")
    assert volume_relpath("valid_1_a_1.nii") == Path("valid_1/valid_1_a/valid_1_a_1.nii")


def test_fix_geometry_oblique_direction():
    row = {"XYSpacing": "[0.5, 0.6]", "ZSpacing": "2.0", "ImagePositionPatient": "[1, 2, 3]",
           "ImageOrientationPatient": "[0, 1, 0, 0, 0, -1]", "RescaleSlope": "1", "RescaleIntercept": "-1024"}
    geometry = fix_data.fix_geometry(row)
    assert geometry.spacing_xyz == (0.5, 0.6, 2.0) and geometry.origin_xyz == (1.0, 2.0, 3.0)
    direction = np.asarray(geometry.direction).reshape(3, 3)
    assert np.allclose(direction[:, 0], (0, 1, 0)) and np.allclose(direction[:, 1], (0, 0, -1))
    assert np.allclose(direction[:, 2], np.cross((0, 1, 0), (0, 0, -1)))
    for key, value in (("XYSpacing", "[0.5]"), ("ZSpacing", "n/a"), ("XYSpacing", "abc"), ("ZSpacing", "-1")):
        with pytest.raises(CaseError, match="unparsable spacing"):
            fix_data.fix_geometry({**row, key: value})


def test_to_hu_rounding_and_saturation():
    raw = np.array([0, 1000, 40000], dtype=np.int32).reshape(1, 1, 3)
    assert fix_data.to_hu(raw, 1.0, -1024.0).tolist() == [[[-1024, -24, 32767]]]
    assert fix_data.to_hu(raw[..., :2].astype(np.int16), 0.5, -1024.0).tolist() == [[[-1024, -524]]]
    assert fix_data.to_hu(raw[..., :2].astype(np.int16), 1.0, -1024.0).dtype == np.int16


# ---------------------------------------------------------------------------- the steps on synthetic data

def test_fix_matches_generator_truth(processed):
    names = raw_names(processed)
    assert len(names) >= 3
    for name in names:
        truth = load_truth(processed, name)
        image = fix_data.read_fixed(fix_data.fixed_sources(processed, "train")[name])
        assert image.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(image), truth["hu"])
        assert np.allclose(image.GetSpacing(), truth["spacing_xyz"], atol=1e-5)
        assert np.allclose(image.GetOrigin(), truth["origin_xyz"], atol=1e-3)
        assert np.allclose(image.GetDirection(), truth["direction"], atol=1e-6)
    # what fix writes is a record per volume, not a copy of it
    records = sorted((processed / "train_fixed").rglob("*.fix.json"))
    assert [p.name for p in records] == [n.replace(".nii.gz", ".fix.json") for n in names]
    assert not list((processed / "train_fixed").rglob("*.nii*")) and max(p.stat().st_size for p in records) < 1000


def test_a_raw_volume_changed_after_fix_fails_its_case_until_fix_reruns(work):
    assert run_step("fix", work) == 0
    name = raw_names(work)[0]
    raw = work / "train" / volume_relpath(name)
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    assert run_step("mask", work) == 1
    assert failures(work, "mask") == {name: f"{raw} is missing or changed since fix_data ran: rerun fix_data"}
    assert run_step("fix", work) == 0 and run_step("mask", work) == 0


def test_merge_maps_every_class_as_the_anatomy_map_says():
    from totalsegmentator.map_to_binary import class_map
    cfg = load_pipeline_config()
    lut = resize.build_label_lut(cfg)
    labels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    merged = resize.merge_labels(labels, lut)
    for value, anatomy_id in zip(labels.ravel(), merged.ravel()):
        name = class_map["total"].get(int(value))
        expected = next((k for k, classes in enumerate(cfg.anatomy_classes, 1) if name in classes), 0)
        assert anatomy_id == expected, name
    assert set(np.unique(merged)) == {0, 1, 2, 3, 4}


def test_resize_sizes_spacing_and_labels(processed):
    cfg = load_pipeline_config()
    lut = resize.build_label_lut(cfg)
    for name in raw_names(processed):
        fixed = fix_data.read_fixed(fix_data.fixed_sources(processed, "train")[name])
        image, mask = (sitk.ReadImage(str(p)) for p in resize.resized_paths(processed, "train", name))
        n = np.asarray(fixed.GetSize())
        expected = [int(k * s / t) for k, s, t in zip(n, fixed.GetSpacing(), cfg.target_spacing_xyz)]
        assert list(image.GetSize()) == expected == list(mask.GetSize())
        # field of view kept (spec §2.3b): spacing n * s / m, voxel 0 at input coordinate (n / m - 1) / 2
        ratio = n / np.asarray(expected)
        assert np.allclose(image.GetSpacing(), ratio * np.asarray(fixed.GetSpacing()), atol=1e-5)
        assert np.allclose(image.GetOrigin(), fixed.TransformContinuousIndexToPhysicalPoint((ratio - 1) / 2),
                           atol=1e-3)
        assert np.allclose(mask.GetOrigin(), image.GetOrigin()) and mask.GetSpacing() == image.GetSpacing()
        assert image.GetPixelID() == sitk.sitkInt16 and mask.GetPixelID() == sitk.sitkUInt8
        # PyTorch's legacy nearest: output voxel k takes input voxel floor(k * n / m) of the merged truth
        truth = resize.merge_labels(load_truth(processed, name)["labels"], lut)
        m = sitk.GetArrayFromImage(mask)
        for idx in np.random.default_rng(0).integers(0, m.shape, size=(200, 3)):
            src = np.floor(idx * ratio[::-1]).astype(int)
            assert m[tuple(idx)] == truth[tuple(src)]


def test_preprocess_invariants(processed):
    cfg = load_pipeline_config()
    volumes = list_volumes(processed, "train")
    assert len(volumes) == len(raw_names(processed))
    for path in volumes:
        image, mask = open_volume(path), open_volume(image_to_mask_path(path))
        assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.shape == mask.shape
        assert all(s >= m for s, m in zip(image.shape, cfg.min_size_dhw))
        resized_mask = read_volume(resize.resized_paths(processed, "train", path.name)[1])
        assert set(np.unique(resized_mask)) == set(np.unique(mask))
        assert scale_hu(image[:1, :1, :1], cfg.hu_window)[0, 0, 0] == 0.0  # corner = padding (tiny volumes)
        assert read_spacing_xyz(path) == pytest.approx(read_spacing_xyz(processed / "resized_train_images" /
                                                                         path.relative_to(processed / "processed_train_images")))


def test_crop_pad_case_margins_clamp_and_symmetric_pad():
    cfg = load_pipeline_config("configs/pipeline_demo.yaml")  # margin (2, 5, 5), min (40, 48, 72)
    mask = np.zeros((60, 100, 120), np.uint8)
    mask[10:20, 0:30, 50:60] = 1
    mask[15, 40, 100] = 3
    image = np.full(mask.shape, 100, np.int16)
    out_image, out_mask = preprocess.crop_pad_case(image, mask, cfg)
    # exclusive end at last + margin (spec §2.4): D: [8, 21) -> 13 voxels, pad 27 -> 13/14;
    # H: [0, 45) (clamped at 0) -> pad 3 -> 1/2; W: [45, 105) -> 60, pad 12 -> 6/6
    assert out_image.shape == (40, 48, 72)
    assert out_mask[13:26, 1:46, 6:66].sum() == mask.sum() and out_mask.sum() == mask.sum()
    assert (out_image[13:26, 1:46, 6:66] == 100).all() and (out_image == 100).sum() == 13 * 45 * 60
    assert (out_image[:13] == cfg.pad_hu).all() and (out_image[:, :, 66:] == cfg.pad_hu).all()
    assert (out_image[:, :1] == cfg.pad_hu).all() and (out_image[:, :, :6] == cfg.pad_hu).all()
    assert scale_hu(np.int16(cfg.pad_hu), cfg.hu_window) == 0.0
    big = np.zeros((80, 100, 120), np.uint8)
    big[1:79, 3:97, 2:118] = 2
    assert preprocess.crop_pad_case(np.zeros(big.shape, np.int16), big, cfg)[0].shape == (80, 100, 120)
    with pytest.raises(CaseError, match="no anatomy found"):
        preprocess.crop_pad_case(image, np.zeros_like(mask), cfg)


def test_scripts_run_from_inside_data_folder(dataset, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("train", "totalseg_gt"))
    result = subprocess.run([sys.executable, "fix_data.py", "--data-root", str(root), "--split", "valid",
                             "--no-pbar"], cwd=REPO_ROOT / "data", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fix valid: processed 1, skipped 0, failed 0" in result.stderr
    assert len(list((root / "valid_fixed").glob("*/*/*.fix.json"))) == 1


# ---------------------------------------------------------------------------- resumability

def test_second_run_skips_and_changes_nothing(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    before = all_files(root)
    caplog.set_level("INFO")
    assert run_pipeline(root) == [0, 0, 0, 0]
    n = len(raw_names(root))
    for step in STEPS:
        assert f"{step} train: processed 0, skipped {n}, failed 0" in caplog.text
    assert all_files(root) == before


@pytest.mark.slow  # 5.8 s
def test_killed_write_leaves_no_final_file_and_rerun_is_correct(processed, work, monkeypatch):
    for step in ("fix", "mask", "resize"):
        assert run_step(step, work) == 0
    import data.io
    real_save = data.io._save_nifti

    def dying_save(img, filename, compresslevel):  # writes half of the file, then the process "dies"
        real_save(img, filename, compresslevel)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(data.io, "_save_nifti", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_step("preprocess", work)
    monkeypatch.setattr(data.io, "_save_nifti", real_save)
    assert not list((work / "processed_train_images").glob("*/*/*.nii"))
    stale = next((work / "processed_train_images").glob("*/*/.tmp-*"), None)
    if stale is None:  # the dying save may have been cleaned up; leave a stale temporary by hand
        stale = work / "processed_train_images" / volume_relpath(raw_names(work)[0]).parent / ".tmp-x.nii"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"garbage")
    # a truncated file under a temporary name and another stale tmp from an earlier fix run
    (work / "train_fixed" / ".tmp-junk.nii.gz").write_bytes(b"\x1f\x8b")
    assert run_step("preprocess", work) == 0
    for path in list_volumes(processed, "train"):
        rel = path.relative_to(processed)
        assert (work / rel).read_bytes() == path.read_bytes()
        assert (work / image_to_mask_path(rel)).read_bytes() == image_to_mask_path(path).read_bytes()


def test_truncated_output_from_killed_run_is_redone_with_overwrite(processed, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    target = fix_data.fix_record_path(root / "train_fixed" / volume_relpath(raw_names(root)[0]))
    good = target.read_bytes()
    target.write_bytes(good[:100])
    assert run_step("fix", root, "train", "--overwrite") == 0
    assert target.read_bytes() == good


# ---------------------------------------------------------------------------- failures

def test_bad_raw_inputs_are_failed_cases(work):
    names = raw_names(work)
    truncated, corrupt, unparsable = names[0], names[1], names[2]
    path = work / "train" / volume_relpath(truncated)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (work / "train" / volume_relpath(corrupt)).write_bytes(b"this is not a nifti file" * 20)
    orphan = work / "train" / volume_relpath("train_99_a_1.nii.gz")
    orphan.parent.mkdir(parents=True)
    shutil.copy(work / "train" / volume_relpath(unparsable), orphan)
    meta = work / "metadata" / "train_metadata.csv"
    rows = list(csv.DictReader(open(meta, newline="")))
    for row in rows:
        if row["VolumeName"] == unparsable:
            row["XYSpacing"] = "[0.7, oops]"
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    assert run_step("fix", work) == 1
    failed = failures(work, "fix")
    assert set(failed) == {truncated, corrupt, unparsable, "train_99_a_1.nii.gz"}
    assert "corrupt or truncated" in failed[truncated] and "corrupt or truncated" in failed[corrupt]
    assert failed["train_99_a_1.nii.gz"] == "no metadata row"
    assert failed[unparsable].startswith("unparsable spacing")
    written = {p.name for p in (work / "train_fixed").rglob("*") if p.is_file()}
    assert written == {n.replace(".nii.gz", ".fix.json") for n in names[3:]}  # nothing half-written
    assert not tmp_files(work)


def test_bad_masks_are_failed_cases(work):
    assert run_step("fix", work) == 0
    names = raw_names(work)
    gt = work / "totalseg_gt" / "train"
    (gt / volume_relpath(names[0])).unlink()
    moved = sitk.ReadImage(str(gt / volume_relpath(names[1])))
    moved.SetOrigin(tuple(o + 5.0 for o in moved.GetOrigin()))
    sitk.WriteImage(moved, str(gt / volume_relpath(names[1])))
    bad = sitk.ReadImage(str(gt / volume_relpath(names[2])))
    array = sitk.GetArrayFromImage(bad)
    array[0, 0, 0] = 250
    unknown = sitk.GetImageFromArray(array)
    unknown.CopyInformation(bad)
    sitk.WriteImage(unknown, str(gt / volume_relpath(names[2])))

    assert run_step("mask", work) == 1
    failed = failures(work, "mask")
    assert failed[names[0]].startswith("missing mask")
    assert failed[names[1]].startswith("mask/image geometry mismatch")
    assert "outside the TotalSegmentator total class map: [250]" in failed[names[2]]
    assert {p.name for p in (work / "train_mask").rglob("*") if p.is_file()} == set(names[3:])

    # resize: the missing masks, and a mask whose geometry differs from the image
    masks = work / "train_mask"
    (masks / volume_relpath(names[1])).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gt / volume_relpath(names[1]), masks / volume_relpath(names[1]))
    assert run_step("resize", work) == 1
    failed = failures(work, "resize")
    assert failed[names[0]].startswith("missing mask") and failed[names[2]].startswith("missing mask")
    assert failed[names[1]].startswith("mask/image geometry mismatch")
    assert len(list((work / "resized_train_images").glob("*/*/*.nii"))) == len(names) - 3
    assert not tmp_files(work)


def test_no_anatomy_and_missing_resized_mask_fail_in_preprocess(processed, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(processed, root, ignore=shutil.ignore_patterns("processed_*"))
    names = sorted(p.name for p in (root / "resized_train_images").glob("*/*/*.nii"))
    empty = resize.resized_paths(root, "train", names[0])[1]
    spacing, origin, direction = read_geometry(empty)
    write_volume(empty, np.zeros(read_volume(empty).shape, np.uint8), spacing, origin, direction)
    resize.resized_paths(root, "train", names[1])[1].unlink()
    assert run_step("preprocess", root) == 1
    failed = failures(root, "preprocess")
    assert failed == {names[0]: "no anatomy found", names[1]: failed[names[1]]}
    assert failed[names[1]].startswith("missing mask")
    assert len(list_volumes(root, "train")) == len(names) - 2
    assert not list((root / "processed_train_masks").glob("*/*/" + names[0]))


def test_missing_input_folder_or_metadata_exit_2(work):
    assert run_step("resize", work) == 2  # nothing fixed yet
    (work / "metadata" / "train_metadata.csv").unlink()
    assert run_step("fix", work) == 2


def test_crashed_worker_is_a_failed_case_not_a_hang(tmp_path):
    tasks = [Task("ok", (tmp_path / "ok",), partial(Path.write_text, tmp_path / "ok", "x")),
             Task("dies", (tmp_path / "dies",), partial(os._exit, 3))]
    summary = run_tasks("demo", "train", tmp_path, tasks, workers=2, pbar=False)
    assert "crashed" in dict(summary.failed)["dies"]
    assert summary.processed + len(summary.failed) == 2


def test_workers_run_in_parallel_processes(work):
    assert run_step("fix", work, "train", "--workers", "2") == 0
    assert len(list((work / "train_fixed").glob("*/*/*.fix.json"))) == len(raw_names(work))


# ---------------------------------------------------------------------------- shards

def test_shards_cover_every_volume_exactly_once(work):
    names = raw_names(work)
    for k in range(3):
        assert run_step("fix", work, "train", "--shard", f"{k}/3") == 0
        with open(work / f"fix_train_shard{k}of3_failures.csv") as f:
            assert f.read().strip() == "volume,reason"
    assert sorted(p.name.replace(".fix.json", ".nii.gz") for p in (work / "train_fixed").glob("*/*/*")) == names
    parts = [select_shard(names, (k, 3)) for k in range(3)]
    assert sorted(sum(parts, [])) == names and sum(len(p) for p in parts) == len(names)


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_is_rejected(text, work):
    with pytest.raises(ValueError):
        parse_shard(text)
    with pytest.raises(SystemExit):
        run_step("fix", work, "train", "--shard", text)
    assert not (work / "train_fixed").exists()


# ---------------------------------------------------------------------------- TotalSegmentator

@pytest.mark.parametrize("options, download, models", [
    ([], "-t total`", "Dataset291"), (["--fast"], "-t total_fast`", "Dataset297"),
    (["--roi-subset"], "-t total`", "Dataset298")])
def test_missing_totalsegmentator_weights_fail_fast_and_write_nothing(options, download, models, processed,
                                                                      tmp_path, monkeypatch, capsys):
    import totalsegmentator.python_api as api
    root = tmp_path / "root"
    shutil.copytree(processed, root, ignore=shutil.ignore_patterns("*_mask", "resized_*", "processed_*"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setattr(api, "totalsegmentator", lambda *a, **k: pytest.fail("TotalSegmentator was started"))
    before = all_files(root)
    assert generate_mask.main(["--data-root", str(root), "--split", "train", "--no-pbar", *options]) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate_mask: error: ")]
    assert len(message) == 1
    assert f"totalseg_download_weights {download}" in message[0] and models in message[0]
    assert all_files(root) == before and not (root / "train_mask").exists()
    assert not (tmp_path / "tshome").exists()


def test_weights_needed_by_the_full_task_and_the_opt_in_subset():
    def names(**options):
        return {d.name.split("_")[0] for d in generate_mask.required_weight_dirs(**options)}
    full = {f"Dataset{k}" for k in (291, 292, 293, 294, 295)}
    assert names(fast=False, roi_subset=False) == full
    assert names(fast=False, roi_subset=True) == full | {"Dataset298"}
    assert names(fast=True, roi_subset=False) == {"Dataset297"}
    assert names(fast=True, roi_subset=True) == {"Dataset297", "Dataset298"}


@pytest.mark.parametrize("roi_subset", [False, True])
def test_usage_stats_turned_off_before_totalsegmentator_runs(roi_subset, processed, tmp_path, monkeypatch):
    import json

    import nibabel as nib
    import totalsegmentator.python_api as api
    root = tmp_path / "root"
    shutil.copytree(processed, root, ignore=shutil.ignore_patterns("*_mask", "resized_*", "processed_*"))
    home = tmp_path / "tshome"
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    for folder in generate_mask.required_weight_dirs(fast=True, roi_subset=roi_subset):
        folder.mkdir(parents=True)
    calls = []

    def fake_totalsegmentator(image, output, **kwargs):  # returns the truth labels
        config = json.loads((home / "config.json").read_text())
        calls.append((config["send_usage_stats"], kwargs))
        hu = np.asarray(image.dataobj).T  # handed over in memory, as the release does
        name = next(n for n in raw_names(root) if np.array_equal(load_truth(root, n)["hu"], hu))
        return nib.Nifti1Image(load_truth(root, name)["labels"].T.copy(), image.affine)

    monkeypatch.setattr(api, "totalsegmentator", fake_totalsegmentator)
    assert generate_mask.main(["--data-root", str(root), "--split", "train", "--no-pbar", "--fast",
                               "--device", "cpu"] + (["--roi-subset"] if roi_subset else [])) == 0
    assert calls and all(sent is False for sent, _ in calls)
    kwargs = calls[0][1]
    assert kwargs["task"] == "total" and kwargs["fast"] and kwargs["device"] == "cpu" and kwargs["ml"]
    if roi_subset:  # opt-in speed flag
        assert set(kwargs["roi_subset"]) == {c for cs in load_pipeline_config().anatomy_classes for c in cs}
    else:  # the release's call: the full `total` task
        assert kwargs["roi_subset"] is None
    for name in raw_names(root):
        out = sitk.ReadImage(str(root / "train_mask" / volume_relpath(name)))
        assert np.array_equal(sitk.GetArrayFromImage(out), load_truth(root, name)["labels"])
        assert out.GetPixelID() == sitk.sitkUInt8
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False
