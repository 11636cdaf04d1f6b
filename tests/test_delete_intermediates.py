"""preprocess --delete-intermediates: a case's resized pair goes only once its cache pair is complete."""
import os
from pathlib import Path

import numpy as np

from data import preprocess
from data.anatomy_boxes import boxes_path
from data.common import volume_relpath
from data.io import write_volume
from data.resize import resized_paths

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"


def _inputs(root: Path, stem: str, *, with_anatomy: bool = True) -> dict[str, Path]:
    """Resized pair, fixed volume, TotalSegmentator mask and raw volume of one case."""
    rel_gz = volume_relpath(stem + ".nii.gz")
    mask = np.zeros((12, 20, 24), np.uint8)
    if with_anatomy:
        mask[3:9, 4:12, 5:15] = 1
    image, resized_mask = resized_paths(root, "train", stem + ".nii.gz")
    paths = {"image": image, "mask": resized_mask, "fixed": root / "train_fixed" / rel_gz,
             "totalseg": root / "train_mask" / rel_gz, "raw": root / "train" / rel_gz}
    for key, path in paths.items():
        write_volume(path, mask if key in ("mask", "totalseg") else np.full(mask.shape, -1000, np.int16),
                     (4.0, 4.0, 8.0))
    return paths


def _cache(root: Path, stem: str) -> tuple[Path, Path]:
    rel = volume_relpath(stem + ".nii")
    return root / "processed_train_images" / rel, root / "processed_train_masks" / rel


def test_deletes_the_resized_pair_of_complete_cases_only(tmp_path):
    done = _inputs(tmp_path, "train_1_a_1")
    failed = _inputs(tmp_path, "train_2_a_1", with_anatomy=False)  # "no anatomy found": no cache
    summary = preprocess.run(tmp_path, "train", pbar=False, config=CONFIG, delete_intermediates_after=True)
    assert [name for name, _ in summary.failed] == ["train_2_a_1.nii"]
    assert all(p.is_file() for p in _cache(tmp_path, "train_1_a_1"))
    assert boxes_path(_cache(tmp_path, "train_1_a_1")[1]).is_file()
    assert [k for k, p in done.items() if p.exists()] == ["fixed", "totalseg", "raw"]
    assert all(p.is_file() for p in failed.values())


def test_without_the_flag_nothing_is_deleted(tmp_path):
    paths = _inputs(tmp_path, "train_1_a_1")
    preprocess.run(tmp_path, "train", pbar=False, config=CONFIG)
    assert all(p.is_file() for p in paths.values())


def test_leftover_of_a_killed_deletion_goes_next_run(tmp_path):
    killed = _inputs(tmp_path, "train_1_a_1")
    preprocess.run(tmp_path, "train", pbar=False, config=CONFIG)
    killed["image"].unlink()  # killed during the deletion: the resized image, which lists the case, went first
    summary = preprocess.run(tmp_path, "train", pbar=False, config=CONFIG, delete_intermediates_after=True)
    assert summary.processed == summary.skipped == 0 and not summary.failed  # not listed: nothing to redo
    assert not killed["mask"].exists()
    assert all(p.is_file() for p in _cache(tmp_path, "train_1_a_1"))


def test_a_pair_rewritten_after_its_cache_stays(tmp_path):
    """resize --overwrite running beside preprocess (another step, another lock) may rewrite a pair after its
    cache was built: that pair is not what the cache was made from."""
    rewritten = _inputs(tmp_path, "train_2_a_1")
    preprocess.run(tmp_path, "train", pbar=False, config=CONFIG)
    later = _cache(tmp_path, "train_2_a_1")[1].stat().st_mtime + 10
    os.utime(rewritten["mask"], (later, later))
    assert preprocess.delete_intermediates(tmp_path, "train", ["train_2_a_1.nii"]) == 0
    assert all(p.is_file() for p in rewritten.values())
