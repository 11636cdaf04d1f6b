"""Training dataset (spec §3): one item per scan, crops, flips, usable rule, clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.io import scale_hu
from data.dataset import CTRateTrainDataset, SampleReadError, collate, scan_id_of, usable_anatomies
from data.texts import text_hash
from tests.conftest import write_cache_case

NAMES = ["lung", "heart", "esophagus", "aorta"]
SHAPE = (12, 20, 24)  # (D, H, W)


def _volume(seed: int):
    """Image whose HU encodes the label (so image/mask consistency is checkable) plus noise."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:9, 4:12, 5:15] = 1          # lung: interior
    mask[0:4, 14:18, 16:20] = 2        # heart: touches the D=0 face
    mask[5:7, 14:16, 3:5] = 4          # aorta: interior, small; esophagus absent
    image = (-1000 + 200 * mask.astype(np.int16) + rng.integers(0, 50, SHAPE)).astype(np.int16)
    return image, mask


def _write(root: Path, split: str, name: str, seed: int):
    image, mask = _volume(seed)
    write_cache_case(root, split, name, image, mask, (1.0, 1.0, 3.0))
    return image, mask


@pytest.fixture()
def cache(tmp_path):
    vols = {}
    for i, name in enumerate(["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz"]):
        vols[name] = _write(tmp_path, "train", name, i)
    conc = {"train_1_a": {"lung": "Emphysema (mild)", "heart": "Cardiomegaly."}, "train_2_a": {}}
    desc = {"train_1_a": {"lung": "Emphysematous changes"}, "train_2_a": {"aorta": "Aorta is normal."}}
    (tmp_path / "conc_info.json").write_text(json.dumps(conc))
    (tmp_path / "desc_info.json").write_text(json.dumps(desc))
    return tmp_path, vols


def _ds(root, **kw):
    kw.setdefault("crop_size", (8, 16, 16))
    return CTRateTrainDataset(root, anatomy_names=NAMES, hu_window=(-1150, 350), **kw)


def test_one_item_per_scan_and_texts(cache):
    root, _ = cache
    ds = _ds(root)
    assert len(ds) == 2 and ds.scan_ids == ["train_1_a", "train_2_a"]
    assert len(ds.reconstructions[0]) == 2
    assert ds.texts[0][0] == "Emphysema mild.Emphysematous changes."
    assert ds.texts[1][3] == "aorta shows no significant abnormalities.Aorta is normal."
    assert ds.abnormal.tolist() == [[True, True, False, False], [False, False, False, False]]
    item = ds[1]  # spec §5: a normal text is encoded without its template; hashes are of the raw texts
    assert item["texts"][3] == "Aorta is normal."
    assert item["text_hash"][3].item() == text_hash(ds.texts[1][3]) != text_hash("Aorta is normal.")
    assert scan_id_of("x/train_12_b_3.nii") == "train_12_b" == scan_id_of("train_12_b_3.nii.gz")


def test_crop_shapes_and_types(cache):
    root, _ = cache
    item = _ds(root)[0]
    assert item["image"].shape == (1, 8, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (8, 16, 16) and item["mask"].dtype == torch.uint8
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["abnormal"].dtype == torch.bool and item["usable"].shape == (4,)
    batch = collate([item, _ds(root)[1]])
    assert batch["image"].shape == (2, 1, 8, 16, 16) and batch["usable"].shape == (2, 4)
    assert len(batch["texts"]) == 2 and len(batch["texts"][0]) == 4


def test_image_and_mask_cropped_and_flipped_together(cache):
    root, vols = cache
    ds = _ds(root, crop_size=SHAPE, flip_prob=1.0)
    item = ds[1]  # train_2_a has one reconstruction: the full volume, flipped on all 3 axes
    image, mask = vols["train_2_a_1.nii.gz"]
    np.testing.assert_array_equal(item["mask"].numpy(), mask[::-1, ::-1, ::-1])
    np.testing.assert_allclose(item["image"][0].numpy(), scale_hu(np.ascontiguousarray(image[::-1, ::-1, ::-1])))
    item = _ds(root, crop_size=SHAPE, flip_prob=0.0)[1]
    np.testing.assert_array_equal(item["mask"].numpy(), mask)
    # random crops + random flips: the image is always consistent with its mask voxel by voxel
    ds = _ds(root, flip_prob=0.5)
    for epoch in range(6):
        ds.set_epoch(epoch)
        it = ds[0]
        hu = it["image"][0].numpy() * 1500 - 1150
        label = np.clip(np.round((hu + 1000) / 200 - 0.12), 0, 4)
        np.testing.assert_array_equal(label.astype(np.uint8), it["mask"].numpy())


def test_usable_rule():
    m = np.zeros((6, 6, 6), np.uint8)
    m[2:4, 2:4, 2:4] = 1      # interior -> usable
    m[0, 2:4, 2:4] = 2        # touches a face -> not usable
    m[2:4, 2:4, 5] = 4        # touches the last W face -> not usable
    assert usable_anatomies(m, 4).tolist() == [True, False, False, False]  # 3 absent


def test_usable_in_dataset_and_cut_by_crop(cache):
    root, _ = cache
    item = _ds(root, crop_size=SHAPE, flip_prob=0.0)[1]
    assert item["usable"].tolist() == [True, False, False, True]
    # lung spans D 3..8 (6 slices): a 4-slice crop always cuts it or misses it
    ds = _ds(root, crop_size=(4, 20, 24), flip_prob=0.0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        assert not ds[1]["usable"][0]


def test_reproducible_per_epoch_and_random_reconstruction(cache):
    root, _ = cache
    a, b = _ds(root, seed=3), _ds(root, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.testing.assert_close(a[0]["image"], b[0]["image"])
    picked = set()
    for epoch in range(12):
        a.set_epoch(epoch)
        picked.add(Path(a[0]["path"]).name)
    assert picked == {"train_1_a_1.nii", "train_1_a_2.nii"}


def test_unreadable_volume_raises_naming_file(cache):
    root, _ = cache
    bad = root / "processed_train_images" / "train_2" / "train_2_a" / "train_2_a_1.nii"
    bad.write_bytes(b"not a nifti file")
    ds = _ds(root)
    with pytest.raises(SampleReadError, match="train_2_a_1.nii"):
        ds[1]


def test_too_small_volume_raises(cache):
    root, _ = cache
    with pytest.raises(SampleReadError, match="smaller than the crop"):
        _ds(root, crop_size=(16, 16, 16))[0]


def test_missing_texts_named(cache):
    root, _ = cache
    (root / "desc_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="desc_info.json"):
        _ds(root)
