"""Data steps under faults (issue 30 #1 #5 #6 #9 #10 #11 #12, issue 26 §3): each input fed as a user would,
its message, exit status and what is on disk afterwards checked."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from data import fix_data, generate_mask, import_ct, resize
from data.common import volume_relpath
from data.io import atomic_output, keep_locale
from data.synthetic_external import write_dicom_series, write_nifti_ras
from tests.test_bad_input import errors, read_csv
from tests.test_data_pipeline import (all_files, dataset, failures, processed, raw_names, run_step,  # noqa: F401
                                      tmp_files, work)
from tests.test_eval import _phantom_ct, _write_sitk, eval_setup  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.7, 5.0)
ORIGIN = (-150.0, -120.5, -300.25)


def _chest_like(depth: int = 24) -> np.ndarray:
    """(D, H, W) int16 that passes as chest CT in HU: air around a soft-tissue body with a denser core."""
    z, y, x = np.mgrid[0:depth, 0:20, 0:24]
    hu = np.full(z.shape, -1000, np.int16)
    body = (abs(y - 10) < 7) & (abs(x - 12) < 9)
    hu[body] = (20 + 3 * z + y + x)[body]
    hu[:, 8:12, 8:16] = 400 + z[:, 8:12, 8:16]  # bone-like, so the sample holds a value >= 100 HU
    return hu


def _import(src: Path, root: Path, *extra: str) -> int:
    return import_ct.main(["--input", str(src), "--data-root", str(root), "--split", "valid", "--no-pbar", *extra])


# ---------------------------------------------------------------------------- 30#12: one temporary per writer

def test_simultaneous_writers_of_one_output_never_share_a_temporary(tmp_path):
    """Overlapping shard specs (0/2 beside 0/4) write the same outputs at once: every write succeeds."""
    with atomic_output(tmp_path / "x.nii.gz") as first, atomic_output(tmp_path / "x.nii.gz") as second:
        assert first != second and first.name.endswith("x.nii.gz") and first.name.startswith(".tmp-")
        first.write_text("a"), second.write_text("b")
    out = tmp_path / "same.csv"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data.io import atomic_output\n"
            "for i in range(300):\n"
            "    with atomic_output(sys.argv[2]) as tmp:\n"
            "        tmp.write_text(f'{sys.argv[3]} {i}\\n' * 2000)\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(out), tag], stderr=subprocess.PIPE,
                                text=True) for tag in ("a", "b")]
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    text = out.read_text().splitlines()
    assert len(text) == 2000 and len(set(text)) == 1  # one writer's whole file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.csv", "x.nii.gz"]


def test_a_stale_temporary_of_a_dead_writer_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{socket.gethostname()}~{int(dead.stdout)}~0000~out.nii"
    other_host = tmp_path / f".tmp-otherhost~{int(dead.stdout)}~0000~out.nii"
    stale.write_bytes(b"half"), other_host.write_bytes(b"another host's writer")
    with atomic_output(tmp_path / "out.nii") as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_host.name, "out.nii"]


# ---------------------------------------------------------------------------- 30#11: killed run with workers

# the fix step of a data root run with two workers whose cases sleep: what the test kills
HOLD_STEP_WITH_SLEEPING_WORKERS = """
import os, sys, time
from functools import partial
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from data.common import Task, run_tasks

def record_pid_and_sleep(folder):
    Path(folder, f"{os.getpid()}.pid").write_text("")
    time.sleep(120)

root, pids = sys.argv[2:]
run_tasks("fix", "train", root, [Task(f"case{i}", (Path(pids) / f"case{i}",), partial(record_pid_and_sleep, pids))
                                 for i in range(4)], workers=2, pbar=False)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_leaves_no_worker_holding_its_lock_and_the_message_names_the_holder(work, tmp_path, capsys):
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", HOLD_STEP_WITH_SLEEPING_WORKERS, str(REPO), str(work), str(pids)])
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.glob("*.pid"))) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        workers = [int(p.stem) for p in pids.glob("*.pid")]
        assert len(workers) == 2
        assert run_step("fix", work) == 2
        message = errors(capsys)
        assert len(message) == 1 and f"pid {parent.pid} on host {socket.gethostname()} since " in message[0]
        assert "fix train in" in message[0] and "\n" not in message[0]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if _running(pid)]
    for pid in orphans:  # a failing run of this test leaves none behind
        os.kill(pid, signal.SIGKILL)
    assert not orphans
    assert run_step("fix", work) == 0  # the rerun starts at once


# ---------------------------------------------------------------------------- 30#1: partial --masks-from

def test_masks_from_a_folder_of_some_masks_updates_those_and_keeps_the_others(processed, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    names = raw_names(root)
    before = all_files(root)
    corrected = tmp_path / "corrected"
    rel = volume_relpath(names[1])
    (corrected / "train" / rel).parent.mkdir(parents=True)
    img = nib.load(root / "totalseg_gt" / "train" / rel)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    labels[labels == labels.max()] = 0  # one class removed by hand
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), corrected / "train" / rel)
    caplog.set_level("INFO")
    assert generate_mask.main(["--data-root", str(root), "--split", "train", "--no-pbar",
                               "--masks-from", str(corrected)]) == 0
    assert f"mask train: processed 1, skipped {len(names) - 1}, failed 0" in caplog.text
    assert f"kept the existing outputs of {len(names) - 1} case(s)" in caplog.text
    after = all_files(root)
    changed = {k for k in after if after[k] != before.get(k) and not k.startswith(".manifests")}
    assert changed == {str("train_mask" / rel)}
    np.testing.assert_array_equal(np.asarray(nib.load(root / "train_mask" / rel).dataobj), labels)
    assert read_csv(root / "mask_train_failures.csv") == []
    # a volume with no mask anywhere is still a failed case, and the others stay
    (root / "train_mask" / volume_relpath(names[0])).unlink()
    assert generate_mask.main(["--data-root", str(root), "--split", "train", "--no-pbar",
                               "--masks-from", str(corrected)]) == 1
    assert failures(root, "mask") == {names[0]: f"missing mask: {corrected / 'train' / volume_relpath(names[0])}"}
    assert {p.name for p in (root / "train_mask").rglob("*.nii.gz")} == set(names[1:])


# ---------------------------------------------------------------------------- 30#10: records after a kill

def test_versions_record_after_a_killed_fix_and_its_rerun_equals_an_uninterrupted_run(work, processed,
                                                                                       monkeypatch):
    calls = []
    real_fix_case = fix_data.fix_case

    def killed_on_second_case(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return real_fix_case(*args)

    monkeypatch.setattr(fix_data, "fix_case", killed_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        run_step("fix", work)
    monkeypatch.setattr(fix_data, "fix_case", real_fix_case)
    assert run_step("fix", work) == 0
    expected = (processed / "fix_train_versions.csv").read_text()
    assert (work / "fix_train_versions.csv").read_text() == expected
    assert len(expected.splitlines()) == 1 + len(raw_names(work))


# ---------------------------------------------------------------------------- 30#9: duplicate metadata rows

def _duplicate_first_row(work: Path, **change: str) -> str:
    meta = work / "metadata" / "train_metadata.csv"
    rows = read_csv(meta)
    rows.append({**rows[0], **change})
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows[0]["VolumeName"]


def test_two_disagreeing_metadata_rows_of_one_volume_are_an_error_naming_them(work, capsys):
    name = _duplicate_first_row(work, RescaleIntercept="-1000")
    n_rows = len(read_csv(work / "metadata" / "train_metadata.csv"))
    assert run_step("fix", work) == 2
    assert errors(capsys) == [f"{work / 'metadata' / 'train_metadata.csv'}: rows 2 and {n_rows + 1} both describe "
                              f"{name} and disagree on RescaleIntercept: keep the right one and delete the other"]
    assert not (work / "train_fixed").exists() and not (work / "fix_train_failures.csv").exists()


def test_an_identical_repeated_metadata_row_is_used_once(work, caplog):
    _duplicate_first_row(work)
    caplog.set_level("INFO")
    assert run_step("fix", work) == 0
    assert "1 repeated row(s) identical to an earlier row" in caplog.text
    assert f"processed {len(raw_names(work))}, skipped 0, failed 0" in caplog.text


# ---------------------------------------------------------------------------- 30#5: DICOM slices, implausible CT

def _move_slice(folder: Path, index: int, dz: float) -> None:
    """Shift one slice file's ImagePositionPatient along z by ``dz`` mm."""
    path = sorted(folder.glob("*.dcm"))[index]
    with keep_locale():  # GDCM sets the process locale to "C"
        img = sitk.ReadImage(str(path))
        x, y, z = (float(v) for v in img.GetMetaData("0020|0032").split("\\"))
        img.SetMetaData("0020|0032", f"{x:.4f}\\{y:.4f}\\{z + dz:.4f}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        writer.Execute(img)


def test_dicom_series_with_a_missing_slice_or_uneven_spacing_is_a_failed_case(tmp_path):
    src = tmp_path / "src"
    for vid in ("even", "gap", "uneven"):
        write_dicom_series(src / vid, _chest_like(), SPACING, ORIGIN)
    sorted((src / "gap").glob("*.dcm"))[10].unlink()
    _move_slice(src / "uneven", 12, 1.5)
    root = tmp_path / "root"
    assert _import(src, root) == 1
    failed = pd.read_csv(root / "import_valid_failures.csv").set_index("volume")["reason"].to_dict()
    assert set(failed) == {"valid_gap_a_1.nii.gz", "valid_uneven_a_1.nii.gz"}
    assert failed["valid_gap_a_1.nii.gz"].startswith("DICOM series gap: uneven slice spacing (gaps 5 to 10 mm, "
                                                     "median 5; a missing or repeated slice?)")
    assert failed["valid_uneven_a_1.nii.gz"].startswith("DICOM series uneven: uneven slice spacing (gaps 3.5 to "
                                                        "6.5 mm")
    assert [p.name for p in root.glob("valid_fixed/*/*/*.nii.gz")] == ["valid_even_a_1.nii.gz"]
    assert read_csv(root / "import_valid_warnings.csv") == []


def test_volumes_that_cannot_be_chest_ct_in_hu_are_imported_with_a_named_warning(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    write_nifti_ras(src / "good.nii.gz", _chest_like(), SPACING, ORIGIN)
    write_nifti_ras(src / "mrlike.nii.gz", np.linspace(0, 2500, 24 * 20 * 24).astype(np.int16).reshape(24, 20, 24),
                    SPACING, ORIGIN)
    write_nifti_ras(src / "thin.nii.gz", _chest_like(8), SPACING, ORIGIN)
    caplog.set_level("INFO")
    root = tmp_path / "root"
    assert _import(src, root) == 0
    assert "processed 3, skipped 0, failed 0, warnings 2" in caplog.text
    warned = {r["volume"]: r["warning"] for r in read_csv(root / "import_valid_warnings.csv")}
    assert set(warned) == {"valid_mrlike_a_1.nii.gz", "valid_thin_a_1.nii.gz"}
    assert warned["valid_mrlike_a_1.nii.gz"].startswith("values are not CT in HU (range 0..")
    assert warned["valid_mrlike_a_1.nii.gz"].endswith(", 0.0 % air voxels): check the modality and the rescale")
    assert warned["valid_thin_a_1.nii.gz"] == "covers only 40 mm along z (8 slices): a chest CT covers ~250-400 mm"
    assert len(list(root.glob("valid_fixed/*/*/*.nii.gz"))) == 3


def test_predict_says_when_the_volume_cannot_be_a_chest_ct(eval_setup, tmp_path, capsys, caplog):  # noqa: F811
    import predict as predict_cli

    hu, labels = _phantom_ct()  # 14 slices of 8 mm; values -850..99 HU: no air, nothing dense
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    common = ["--checkpoint", str(eval_setup / "run" / "checkpoint_3.pth"), "--config", str(eval_setup / "preset.yaml"),
              "--items", str(eval_setup / "items.yaml"), "--device", "cpu", "--json"]
    plausible = hu.copy()
    plausible[:, :4] = -1000
    plausible[:, 20, 20] = 300
    cases = (("ok", plausible, labels), ("mrlike", hu, labels), ("thin", plausible[3:11], labels[3:11]))
    for case, array, seg in cases:
        _write_sitk(tmp_path / f"{case}.nii.gz", array, lps, (0.0, 0.0, 0.0))
        _write_sitk(tmp_path / f"{case}_seg.nii.gz", seg, lps, (0.0, 0.0, 0.0))
    got = {}
    for case in ("ok", "mrlike", "thin"):
        caplog.clear()
        assert predict_cli.main(["--image", str(tmp_path / f"{case}.nii.gz"), "--mask",
                                 str(tmp_path / f"{case}_seg.nii.gz"), *common]) == 0
        got[case] = json.loads(capsys.readouterr().out)["warnings"]
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
            f"{w} (the probabilities below are not meaningful for such a volume)" for w in got[case]]
    assert got["ok"] == []
    assert got["mrlike"] == [f"{tmp_path / 'mrlike.nii.gz'}: values are not CT in HU (range -850..99, 0.0 % air "
                             "voxels): check the modality and the rescale"]
    assert got["thin"] == [f"{tmp_path / 'thin.nii.gz'}: covers only 64 mm along z (8 slices): a chest CT covers "
                           "~250-400 mm"]


# ---------------------------------------------------------------------------- 30#6: content-aware import

def test_import_redoes_a_replaced_source_or_a_changed_npz_spacing_order(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    hu = _chest_like()
    write_nifti_ras(src / "scan.nii.gz", hu, SPACING, ORIGIN)
    np.savez(src / "rc.npz", ct=hu, spacing=np.array(SPACING[::-1]))
    root = tmp_path / "root"
    caplog.set_level("INFO")
    assert _import(src, root) == 0
    out = {vid: root / "valid_fixed" / volume_relpath(import_ct.volume_name("valid", vid)) for vid in ("scan", "rc")}
    assert _import(src, root) == 0
    assert "import valid: processed 0, skipped 2" in caplog.text
    replaced = hu.copy()
    replaced[5] = 77
    time.sleep(0.01)
    write_nifti_ras(src / "scan.nii.gz", replaced, SPACING, ORIGIN)  # a replaced source file
    caplog.clear()
    assert _import(src, root) == 0
    assert "import valid: processed 1, skipped 1" in caplog.text
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out["scan"]))), replaced)
    caplog.clear()
    assert _import(src, root, "--npz-spacing-order", "xyz") == 0  # decides the NPZ's spacing only
    assert "import valid: processed 1, skipped 1" in caplog.text
    np.testing.assert_allclose(sitk.ReadImage(str(out["rc"])).GetSpacing(), SPACING[::-1])


# ---------------------------------------------------------------------------- 26§3: own scans with own masks

def _total_labels(shape) -> np.ndarray:
    from totalsegmentator.map_to_binary import class_map

    ids = {name: idx for idx, name in class_map["total"].items()}
    labels = np.zeros(shape, np.uint8)
    labels[2:20, 4:16, 2:11] = ids["lung_upper_lobe_right"]
    labels[2:20, 4:16, 13:22] = ids["lung_upper_lobe_left"]
    labels[8:14, 8:12, 10:14] = ids["heart"]
    return labels


def test_own_ras_scans_with_their_own_ras_masks_go_through_import_ct_masks(tmp_path, capsys):
    hu = _chest_like()
    labels = _total_labels(hu.shape)
    src, masks = tmp_path / "scans", tmp_path / "masks"
    src.mkdir(), masks.mkdir()
    write_nifti_ras(src / "scan1.nii.gz", hu, SPACING, ORIGIN)
    write_nifti_ras(masks / "scan1.nii.gz", labels, SPACING, ORIGIN)  # TotalSegmentator's output on the RAS scan
    root = tmp_path / "root"
    name = import_ct.volume_name("valid", "scan1")
    # the RAS mask renamed by hand into --masks-from's layout: named as an orientation mismatch
    assert _import(src, root) == 0
    by_hand = tmp_path / "by_hand" / "valid" / volume_relpath(name)
    by_hand.parent.mkdir(parents=True)
    shutil.copy(masks / "scan1.nii.gz", by_hand)
    mask_step = ["--data-root", str(root), "--split", "valid", "--no-pbar"]
    assert generate_mask.main([*mask_step, "--masks-from", str(tmp_path / "by_hand")]) == 1
    reason = failures(root, "mask", "valid")[name]
    assert reason.startswith("mask/image geometry mismatch: origin ") and "; direction [-1.0, 0.0, 0.0" in reason
    assert reason.endswith("must go through `import_ct --masks`; docs/evaluations.md)")
    assert not (root / "valid_mask").exists()
    # the way that works: the masks go with their scans
    assert _import(src, root, "--masks", str(masks)) == 0
    imported = root / "imported_masks" / "valid" / volume_relpath(name)
    assert imported.is_file()
    assert generate_mask.main([*mask_step, "--masks-from", str(root / "imported_masks")]) == 0
    mask = sitk.ReadImage(str(root / "valid_mask" / volume_relpath(name)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), labels)  # LPS again, as the fixed image
    fixed = sitk.ReadImage(str(root / "valid_fixed" / volume_relpath(name)))
    np.testing.assert_allclose(mask.GetOrigin(), fixed.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed), hu)
    # a mask missing, or not on its scan's grid: failed cases, nothing written for them
    write_nifti_ras(src / "scan2.nii.gz", hu, SPACING, ORIGIN)
    write_nifti_ras(src / "scan3.nii.gz", hu, SPACING, ORIGIN)
    write_nifti_ras(masks / "scan3.nii.gz", labels, SPACING, (ORIGIN[0] + 4.0, ORIGIN[1], ORIGIN[2]))
    assert _import(src, root, "--masks", str(masks)) == 1
    failed = pd.read_csv(root / "import_valid_failures.csv").set_index("volume")["reason"].to_dict()
    assert failed["valid_scan2_a_1.nii.gz"] == f"missing mask: {masks / 'scan2.nii.gz'}"
    assert failed["valid_scan3_a_1.nii.gz"].startswith("mask/image geometry mismatch: origin [")
    assert "direction" not in failed["valid_scan3_a_1.nii.gz"]
    assert sorted(p.name for p in (root / "imported_masks").rglob("*.nii.gz")) == [name]
    assert not (root / "valid_fixed" / "valid_scan2").exists() and not tmp_files(root)
    assert _import(src, root, "--masks", str(tmp_path / "nowhere")) == 2
    assert errors(capsys)[-1] == f"--masks: folder not found: {tmp_path / 'nowhere'}"


# ---------------------------------------------------------------------------- a failure between an image and its mask

def test_a_disk_full_while_writing_masks_leaves_each_image_and_mask_pair_as_it_was(processed, tmp_path,
                                                                                    monkeypatch):
    import data.io

    root = tmp_path / "root"
    shutil.copytree(processed, root)
    names = raw_names(root)
    config = yaml.safe_load((REPO / "configs" / "pipeline.yaml").read_text())
    config["anatomy_map"] = str(REPO / config["anatomy_map"])
    config["target_spacing_xyz"] = [1.5, 1.5, 4.0]  # a new grid: resize redoes every image and mask
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    pairs = [resize.resized_paths(root, "train", name) for name in names]
    before = [[p.read_bytes() for p in pair] for pair in pairs]
    real_save = data.io._save_nifti

    def disk_full_on_masks(img, path, compresslevel):
        if "masks" in str(path):
            raise OSError(28, "No space left on device")
        real_save(img, path, compresslevel)

    monkeypatch.setattr(data.io, "_save_nifti", disk_full_on_masks)
    assert run_step("resize", root, "train", "--config", str(tmp_path / "pipeline.yaml")) == 1
    assert failures(root, "resize") == {name: "OSError: [Errno 28] No space left on device" for name in names}
    assert [[p.read_bytes() for p in pair] for pair in pairs] == before  # never a new image beside an old mask
    assert not tmp_files(root)
    monkeypatch.setattr(data.io, "_save_nifti", real_save)
    assert run_step("resize", root, "train", "--config", str(tmp_path / "pipeline.yaml")) == 0
    assert all(p.read_bytes() != b for pair, old in zip(pairs, before) for p, b in zip(pair, old))
