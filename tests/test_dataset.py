"""Training dataset (spec §3): one item per scan, crops, flips, usable rule, clear errors."""
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data import preprocess
from data.anatomy_boxes import anatomy_boxes, boxes_path, write_boxes
from data.io import open_volume, scale_hu, write_volume
from data.common import load_pipeline_config, volume_relpath
from data.dataset import CTRateTrainDataset, SampleReadError, collate, model_inputs, scan_id_of, usable_anatomies
from data.resize import resized_paths
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


def _write(root: Path, split: str, name: str, seed: int, volume=_volume):
    """Write a cache pair and its box record, as preprocess does."""
    image, mask = volume(seed)
    write_cache_case(root, split, name, image, mask, (1.0, 1.0, 3.0))
    write_boxes(mask, root / f"processed_{split}_masks" / volume_relpath(name).with_suffix(""))
    return image, mask


def _model_input(item):
    """(image (D,H,W) float32, mask (D,H,W)) of one item, as the training step sees it."""
    batch = collate([item])
    image, mask = model_inputs(batch["hu"], batch["mask"], batch["flip"], (-1150, 350))
    return image[0, 0].numpy(), mask[0].numpy()


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
    assert item["hu"].shape == (1, 8, 16, 16) and item["hu"].dtype == torch.int16
    assert item["mask"].shape == (8, 16, 16) and item["mask"].dtype == torch.uint8
    assert item["flip"].shape == (3,) and item["flip"].dtype == torch.bool
    assert item["abnormal"].dtype == torch.bool and item["usable"].shape == (4,)
    batch = collate([item, _ds(root)[1]])
    assert batch["hu"].shape == (2, 1, 8, 16, 16) and batch["usable"].shape == (2, 4)
    assert batch["flip"].shape == (2, 3)
    assert len(batch["texts"]) == 2 and len(batch["texts"][0]) == 4
    image, mask = model_inputs(batch["hu"], batch["mask"], batch["flip"], (-1150, 350))
    assert image.shape == (2, 1, 8, 16, 16) and image.dtype == torch.float32 and mask.shape == (2, 8, 16, 16)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_image_and_mask_cropped_and_flipped_together(cache):
    root, vols = cache
    ds = _ds(root, crop_size=SHAPE, flip_prob=1.0)
    # train_2_a has one reconstruction: the full volume, flipped on all 3 axes
    got_image, got_mask = _model_input(ds[1])
    image, mask = vols["train_2_a_1.nii.gz"]
    np.testing.assert_array_equal(got_mask, mask[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(got_image, scale_hu(np.ascontiguousarray(image[::-1, ::-1, ::-1])))
    item = _ds(root, crop_size=SHAPE, flip_prob=0.0)[1]
    np.testing.assert_array_equal(item["mask"].numpy(), mask)
    np.testing.assert_array_equal(item["hu"][0].numpy(), image)
    # random crops + random flips: the image is always consistent with its mask voxel by voxel
    ds = _ds(root, flip_prob=0.5)
    for epoch in range(6):
        ds.set_epoch(epoch)
        image, mask = _model_input(ds[0])
        hu = image * 1500 - 1150
        label = np.clip(np.round((hu + 1000) / 200 - 0.12), 0, 4)
        np.testing.assert_array_equal(label.astype(np.uint8), mask)


def test_usable_rule():
    m = np.zeros((6, 6, 6), np.uint8)
    m[2:4, 2:4, 2:4] = 1      # interior -> usable
    m[0, 2:4, 2:4] = 2        # touches a face -> not usable
    m[2:4, 2:4, 5] = 4        # touches the last W face -> not usable
    assert usable_anatomies(m, 4, anatomy_boxes(m)).tolist() == [True, False, False, False]  # 3 absent


def test_usable_rule_with_boxes_beyond_the_crop():
    """Boxes straddling the crop's edge: the crop's voxels decide (split and curved anatomies)."""
    volume = np.zeros((10, 10, 10), np.uint8)
    volume[1, 1, 1] = volume[6, 6, 4] = 1     # split: one part outside the crop, one inside, none on a face
    volume[0, 8, 2] = volume[8, 1, 6] = 2     # both parts outside the crop: absent from it, box spans it
    volume[4:6, 4:6, 4:6] = 3                 # inside the crop: usable
    volume[9, 9, 9] = 4                       # box misses the crop
    boxes = anatomy_boxes(volume)
    start, stop = (3, 3, 3), (8, 8, 8)
    crop = volume[tuple(slice(a, b) for a, b in zip(start, stop))]
    in_crop = {k: tuple(b - start[i % 3] for i, b in enumerate(box)) for k, box in boxes.items()}
    assert usable_anatomies(crop, 4, in_crop).tolist() == [True, False, True, False]
    crop = volume[1:7, 1:7, 1:7]              # anatomy 1 now on the crop's first face
    in_crop = {k: tuple(b - 1 for b in box) for k, box in boxes.items()}
    assert usable_anatomies(crop, 4, in_crop).tolist() == [False, False, True, False]


def test_anatomy_boxes_match_voxels():
    rng = np.random.default_rng(0)
    mask = (rng.random((9, 11, 13)) < 0.02).astype(np.uint8) * rng.integers(1, 5, (9, 11, 13)).astype(np.uint8)
    for k, box in anatomy_boxes(mask).items():
        idx = np.argwhere(mask == k)
        assert box == (*idx.min(axis=0).tolist(), *idx.max(axis=0).tolist())
    assert set(anatomy_boxes(mask)) == set(np.unique(mask[mask > 0]).tolist())


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
    torch.testing.assert_close(a[0]["hu"], b[0]["hu"])
    torch.testing.assert_close(a[0]["flip"], b[0]["flip"])
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


def _reference_item(ds, index):
    """The dataset's read before the int16/boxes rewrite (commit 17f0466), kept to pin the samples."""
    rng = np.random.default_rng([ds.seed, ds.epoch, index])
    recs = ds.reconstructions[index]
    path = recs[int(rng.integers(len(recs)))]
    image, mask = open_volume(path), open_volume(Path(str(path).replace("_images", "_masks")))
    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(image.shape, ds.crop_size)]
    sl = tuple(slice(st, st + c) for st, c in zip(starts, ds.crop_size))
    image, mask = np.array(image[sl]), np.array(mask[sl], dtype=np.uint8)
    for axis in range(3):
        if rng.random() < ds.flip_prob:
            image, mask = np.flip(image, axis), np.flip(mask, axis)
    image, mask = scale_hu(np.ascontiguousarray(image), ds.hu_window), np.ascontiguousarray(mask)
    n = len(ds.anatomy_names)
    present = np.bincount(mask.ravel(), minlength=n + 1)[1: n + 1] > 0
    faces = np.concatenate([mask[0].ravel(), mask[-1].ravel(), mask[:, 0].ravel(), mask[:, -1].ravel(),
                            mask[:, :, 0].ravel(), mask[:, :, -1].ravel()])
    on_face = np.bincount(faces, minlength=n + 1)[1: n + 1] > 0
    return image, mask, present & ~on_face, str(path)


def _blobs(seed: int):
    """(20, 28, 32) volume with split and curved anatomies, so crops cut, miss and straddle them."""
    rng = np.random.default_rng(seed)
    shape = (20, 28, 32)
    mask = np.zeros(shape, np.uint8)
    for k in (1, 2, 3, 4):
        for _ in range(int(rng.integers(1, 4))):  # 1-3 parts
            lo = [int(rng.integers(0, n - 4)) for n in shape]
            mask[tuple(slice(a, a + int(rng.integers(1, 5))) for a in lo)] = k
    image = rng.integers(-1400, 800, shape).astype(np.int16)
    return image, mask


@pytest.mark.parametrize("with_boxes", [True, False])
def test_same_samples_as_reference(tmp_path, with_boxes):
    """Same reconstruction, crop, flips, image values, mask and usable as before the rewrite, per seed."""
    for i, name in enumerate(["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz",
                              "train_3_a_1.nii.gz"]):
        _write(tmp_path, "train", name, i, volume=_blobs)
    (tmp_path / "conc_info.json").write_text("{}")
    (tmp_path / "desc_info.json").write_text("{}")
    if not with_boxes:
        for record in tmp_path.glob("processed_train_masks/*/*/*.boxes.json"):
            record.unlink()
    ds = _ds(tmp_path, crop_size=(12, 16, 20), flip_prob=0.5, seed=7)
    n_usable = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(8):
            ds.set_epoch(epoch)
            for index in range(len(ds)):
                item = ds[index]
                ref_image, ref_mask, ref_usable, ref_path = _reference_item(ds, index)
                image, mask = _model_input(item)
                assert item["path"] == ref_path
                np.testing.assert_array_equal(image, ref_image)
                np.testing.assert_array_equal(mask, ref_mask)
                assert item["usable"].tolist() == ref_usable.tolist()
                n_usable += int(ref_usable.sum())
    assert 0 < n_usable < 8 * len(ds) * 4  # the crops both keep and cut anatomies
    assert any("no anatomy box records" in str(w.message) for w in caught) == (not with_boxes)


@pytest.mark.parametrize("window", [(-1150, 350), (-1000.5, 400.25), (-40000, 40000)])
def test_model_inputs_scale_as_scale_hu(window):
    hu = torch.arange(-32768, 32768, dtype=torch.int16).reshape(1, 1, 4, 128, 128)
    image, _ = model_inputs(hu, torch.zeros(1, 4, 128, 128, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.bool),
                            window)
    np.testing.assert_array_equal(image.numpy(), scale_hu(hu.numpy(), window))


def test_stale_box_record_raises_naming_it(cache):
    root, _ = cache
    record = boxes_path(root / "processed_train_masks" / "train_2" / "train_2_a" / "train_2_a_1.nii")
    record.write_text(json.dumps({"shape_dhw": [1, 2, 3], "boxes": {}}))
    with pytest.raises(SampleReadError, match="train_2_a_1.boxes.json"):
        _ds(root)[1]


def test_preprocess_writes_box_record(tmp_path):
    image, mask = _volume(0)
    src = tmp_path / "resized"
    write_volume(src / "i.nii", image, (1.0, 1.0, 3.0))
    write_volume(src / "m.nii", mask, (1.0, 1.0, 3.0))
    cfg = dataclasses.replace(load_pipeline_config(), crop_margin_dhw=(1, 1, 1), min_size_dhw=(8, 16, 16))
    preprocess.preprocess_case(src / "i.nii", src / "m.nii", tmp_path / "i.nii", tmp_path / "m.nii", cfg)
    record = json.loads(boxes_path(tmp_path / "m.nii").read_text())
    cached = open_volume(tmp_path / "m.nii")
    assert record == {"shape_dhw": list(cached.shape),
                      "boxes": {str(k): list(b) for k, b in anatomy_boxes(cached).items()}}
    assert sorted(record["boxes"]) == ["1", "2", "4"]


def test_preprocess_redoes_a_case_without_its_box_record(tmp_path):
    """The record is written last: a run killed before it leaves a case the next run redoes."""
    image, mask = _volume(0)
    for path, array in zip(resized_paths(tmp_path, "train", "train_1_a_1.nii.gz"), (image, mask)):
        write_volume(path, array, (1.0, 1.0, 3.0))
    config = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"
    record = boxes_path(tmp_path / "processed_train_masks" / "train_1" / "train_1_a" / "train_1_a_1.nii")
    assert preprocess.run(tmp_path, "train", pbar=False, config=config).processed == 1
    record.unlink()
    assert preprocess.run(tmp_path, "train", pbar=False, config=config).processed == 1
    assert record.is_file()


def test_unreadable_box_record_raises_naming_it(cache):
    root, _ = cache
    record = boxes_path(root / "processed_train_masks" / "train_2" / "train_2_a" / "train_2_a_1.nii")
    record.write_text(json.dumps({"boxes": {}}))
    with pytest.raises(SampleReadError, match="train_2_a_1.boxes.json"):
        _ds(root)[1]


def test_loader_workers_give_the_batches_collate_gives(cache):
    """In a worker the crops are stacked into shared memory: same batch as in the main process."""
    root, _ = cache
    ds = _ds(root, flip_prob=0.5)
    inline = collate([ds[0], ds[1]])
    (batch,) = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate))
    for key in ("hu", "mask", "flip", "usable", "text_hash", "abnormal"):
        torch.testing.assert_close(batch[key], inline[key])
    assert batch["hu"].is_shared() and batch["texts"] == inline["texts"]
