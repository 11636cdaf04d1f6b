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

from data import fix_data, generate_mask, import_ct
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
    assert not any(_running(pid) for pid in workers)
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
