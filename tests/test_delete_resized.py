"""preprocess --delete-resized: a case's resized pair goes only once its cache pair is complete."""
import os
from pathlib import Path

import numpy as np

from data import preprocess
from data.anatomy_boxes import boxes_path
from data.cache import write_volume
from data.common import volume_relpath

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"


def _resized(root: Path, name: str, with_anatomy: bool = True) -> tuple[Path, Path]:
    rel = volume_relpath(name)
    mask = np.zeros((12, 20, 24), np.uint8)
    if with_anatomy:
        mask[3:9, 4:12, 5:15] = 1
    pair = root / "resized_train_images" / rel, root / "resized_train_masks" / rel
    write_volume(pair[0], np.full(mask.shape, -1000, np.int16), (4.0, 4.0, 8.0))
    write_volume(pair[1], mask, (4.0, 4.0, 8.0))
    return pair


def _cache(root: Path, name: str) -> tuple[Path, Path]:
    rel = volume_relpath(name)
    return root / "processed_train_images" / rel, root / "processed_train_masks" / rel


def test_deletes_only_complete_cases(tmp_path):
    done = _resized(tmp_path, "train_1_a_1.nii")
    failed = _resized(tmp_path, "train_2_a_1.nii", with_anatomy=False)  # "no anatomy found": no cache
    summary = preprocess.run(tmp_path, "train", pbar=False, config=CONFIG, delete_resized_inputs=True)
    assert [name for name, _ in summary.failed] == ["train_2_a_1.nii"]
    assert all(p.is_file() for p in _cache(tmp_path, "train_1_a_1.nii"))
    assert boxes_path(_cache(tmp_path, "train_1_a_1.nii")[1]).is_file()
    assert not any(p.exists() for p in done)
    assert all(p.is_file() for p in failed)


def test_without_the_flag_nothing_is_deleted(tmp_path):
    pair = _resized(tmp_path, "train_1_a_1.nii")
    preprocess.run(tmp_path, "train", pbar=False, config=CONFIG)
    assert all(p.is_file() for p in pair)


def test_leftover_of_a_killed_deletion_goes_next_run_and_newer_resized_pair_stays(tmp_path):
    killed = _resized(tmp_path, "train_1_a_1.nii")
    rewritten = _resized(tmp_path, "train_2_a_1.nii")
    preprocess.run(tmp_path, "train", pbar=False, config=CONFIG)
    killed[1].unlink()  # killed between the two unlinks: the image is left, the case is still listed
    later = _cache(tmp_path, "train_2_a_1.nii")[1].stat().st_mtime + 10
    os.utime(rewritten[0], (later, later))  # resize --overwrite after the cache was built
    summary = preprocess.run(tmp_path, "train", pbar=False, config=CONFIG, delete_resized_inputs=True)
    assert summary.skipped == 2
    assert not killed[0].exists()
    assert all(p.is_file() for p in rewritten)
