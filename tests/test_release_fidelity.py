"""The training cache is the release's (spec §2, issue 18): resize grid, legacy-nearest mask, crop rule, v1/v2.

Each rule is pinned on small arrays with values worked out by hand; then the
default pipeline, run as a user runs it, is compared with a small "release
reference" written here from ``F.interpolate`` (the release's own call) and the
release's crop rule, on realistic synthetic volumes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from data import preprocess, resize
from data.cache import image_to_mask_path, list_volumes, open_volume, scale_hu, write_volume
from data.common import PipelineConfig, load_pipeline_config, volume_relpath
from data.synthetic import Grid, render, scan_phantom


def sitk_volume(array: np.ndarray, spacing_xyz, origin_xyz=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    return image


def resample_1d(values, labels, spacing: float, target: float, **kwargs) -> tuple[sitk.Image, sitk.Image]:
    """Resample a (1, 1, n) volume along x only (y, z keep their single voxel)."""
    image = sitk_volume(np.asarray(values, np.int16).reshape(1, 1, -1), (spacing, 1.0, 1.0), (10.0, 0.0, 0.0))
    mask = sitk_volume(np.asarray(labels, np.uint8).reshape(1, 1, -1), (spacing, 1.0, 1.0), (10.0, 0.0, 0.0))
    return resize.resample_case(image, mask, (target, 1.0, 1.0), **kwargs)


# ---------------------------------------------------------------------------- the three rules, by hand

def test_ramp_through_the_resize_samples_at_half_voxel_centres():
    # n = 5 voxels of 1 mm -> m = int(5 * 1 / 2) = 2; voxel i samples (i + 0.5) * 5 / 2 - 0.5 = 0.75, 3.25
    image, _ = resample_1d([0, 100, 200, 300, 400], [0] * 5, 1.0, 2.0)
    assert sitk.GetArrayFromImage(image).ravel().tolist() == [75, 325]
    assert image.GetPixelID() == sitk.sitkInt16
    # field of view kept: spacing 5 * 1 / 2 = 2.5 mm (not 2), voxel 0 at x = 10 + 0.75
    assert image.GetSpacing()[0] == pytest.approx(2.5) and image.GetOrigin()[0] == pytest.approx(10.75)
    # upsampling, n = 3 of 2 mm -> m = 6: samples -0.25 (clamped to 0), 0.25, ..., 2.25 (edge voxel repeated)
    image, _ = resample_1d([0, 100, 200], [0] * 3, 2.0, 1.0)
    assert sitk.GetArrayFromImage(image).ravel().tolist() == [0, 25, 75, 125, 175, 200]
    assert image.GetSpacing()[0] == pytest.approx(1.0) and image.GetOrigin()[0] == pytest.approx(9.5)
    # ties round half to even, as np.rint: 0.25 * 2 + 0.75 * 3 = 2.75 -> 3; 0.75 * 1 + 0.25 * 2 = 1.25 -> 1
    image, _ = resample_1d([1, 2, 3, 4, 5], [0] * 5, 1.0, 2.0)
    assert sitk.GetArrayFromImage(image).ravel().tolist() == [2, 4]  # 1.75, 4.25


def test_mask_edge_through_pytorch_legacy_nearest():
    # n = 5 -> m = int(5 / 1.6) = 3; legacy nearest takes floor(i * 5 / 3) = 0, 1, 3 (not the image's 0.33, 2, 3.67)
    _, mask = resample_1d([0] * 5, [1, 2, 3, 4, 5], 1.0, 1.6)
    assert sitk.GetArrayFromImage(mask).ravel().tolist() == [1, 2, 4]
    # an edge between voxels 2 and 3: the release's mask keeps it at output 2 -> index 3
    _, mask = resample_1d([0] * 5, [0, 0, 0, 7, 7], 1.0, 1.6)
    assert sitk.GetArrayFromImage(mask).ravel().tolist() == [0, 0, 7]
    # opt-in: the voxel nearest to the image's sample point, floor((i + 0.5) * 5 / 3) = 0, 2, 4
    _, mask = resample_1d([0] * 5, [1, 2, 3, 4, 5], 1.0, 1.6, mask_interpolation="nearest-exact")
    assert sitk.GetArrayFromImage(mask).ravel().tolist() == [1, 3, 5]


def test_box_through_the_crop_ends_exclusive_at_max_plus_margin():
    cfg = PipelineConfig(anatomy_names=["a", "b"], anatomy_classes=[["x"], ["y"]],
                         target_spacing_xyz=(1.0, 1.0, 1.0), hu_window=(-1150.0, 350.0),
                         crop_margin_dhw=(2, 3, 3), min_size_dhw=(12, 15, 20))
    mask = np.zeros((30, 40, 50), np.uint8)
    mask[10:15, 5:10, 0:45] = 1  # box: d 10..14, h 5..9, w 0..44
    image = np.arange(mask.size, dtype=np.int16).reshape(mask.shape) % 1000
    window = preprocess.crop_pad_window(mask, cfg)
    # d: [10 - 2, 14 + 2) = [8, 16), 8 voxels, pad 4 -> 2 / 2; h: [2, 12), 10, pad 5 -> 2 before / 3 after;
    # w: [0 (clamped), 44 + 3 = 47), 47 >= 20, no pad
    assert window.start == (8, 2, 0) and window.stop == (16, 12, 47)
    assert window.before == (2, 2, 0) and window.after == (2, 3, 0)
    out_image, out_mask = preprocess.crop_pad_case(image, mask, cfg)
    assert out_image.shape == (12, 15, 47)
    assert np.array_equal(out_image[2:10, 2:12], image[8:16, 2:12, 0:47])
    # margin 2 before the box and 2 - 1 = 1 after it, along d
    assert out_mask[:, 7, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert (out_image[:2] == cfg.pad_hu).all() and (out_image[10:] == cfg.pad_hu).all()


def test_resample_case_is_torch_interpolate_on_odd_sizes():
    rng = np.random.default_rng(0)
    for shape, spacing in (((7, 13, 11), (0.7, 0.9, 1.5)), ((9, 5, 17), (1.3, 0.6, 5.0))):
        hu = rng.integers(-1024, 2000, size=shape).astype(np.int16)
        labels = rng.integers(0, 6, size=shape).astype(np.uint8)
        target = (1.0, 1.0, 3.0)
        image_r, labels_r = resize.resample_case(sitk_volume(hu, spacing), sitk_volume(labels, spacing), target)
        size = [int(n * s / t) for n, s, t in zip(shape[::-1], spacing, target)][::-1]
        want = F.interpolate(torch.from_numpy(hu).float()[None, None], size=size, mode="trilinear",
                             align_corners=False)[0, 0].numpy()
        assert np.abs(sitk.GetArrayFromImage(image_r) - want).max() <= 0.5
        want_mask = F.interpolate(torch.from_numpy(labels).float()[None, None], size=size, mode="nearest")[0, 0]
        assert np.array_equal(sitk.GetArrayFromImage(labels_r), want_mask.numpy().astype(np.uint8))


# ---------------------------------------------------------------------------- the default pipeline vs the release

def release_cache(hu: np.ndarray, anatomy: np.ndarray, spacing_xyz, cfg: PipelineConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The release's resize + preprocess of a fixed volume and its merged mask: ([0, 1] image, ids)."""
    size = [int(n * s / t) for n, s, t in zip(hu.shape, spacing_xyz[::-1], cfg.target_spacing_xyz[::-1])]
    image = F.interpolate(torch.from_numpy(hu.astype(np.float32))[None, None], size=size, mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    mask = F.interpolate(torch.from_numpy(anatomy.astype(np.float32))[None, None], size=size,
                         mode="nearest")[0, 0].numpy().astype(np.uint8)
    lo_hu, hi_hu = cfg.hu_window
    image = (np.clip(image, lo_hu, hi_hu) - lo_hu) / (hi_hu - lo_hu)
    idx = np.nonzero(mask)
    crop = tuple(slice(max(i.min() - ext, 0), min(i.max() + ext, n))
                 for i, ext, n in zip(idx, cfg.crop_margin_dhw, mask.shape))
    image, mask = image[crop], mask[crop]
    pad = [((t - n) // 2, t - n - (t - n) // 2) if n < t else (0, 0) for n, t in zip(mask.shape, cfg.min_size_dhw)]
    return np.pad(image, pad, constant_values=0.0), np.pad(mask, pad, constant_values=0)


@pytest.fixture(scope="module")
def realistic_root(tmp_path_factory) -> tuple[Path, dict]:
    """Fixed volumes + TotalSegmentator-style labels of synthetic chests, 128 x 128 x 60 at CT-like spacings
    (labels kept only in a central box, so that every crop end is ``last + margin``, not the volume's end)."""
    root = tmp_path_factory.mktemp("fidelity")
    truth = {}
    grids = {"train_1_a_1.nii.gz": ((0.7, 0.7, 1.5), 0), "train_2_a_1.nii.gz": ((0.83, 0.83, 1.25), 1),
             "train_3_a_1.nii.gz": ((0.61, 0.61, 2.0), 2)}
    for name, (spacing, patient) in grids.items():
        p = scan_phantom(0, 0, patient, 0, [])
        origin = (p["cx"] - 64 * spacing[0], p["cy"] - 64 * spacing[1] + 20, p["cz"] - 30 * spacing[2])
        hu, labels = render(p, Grid((60, 128, 128), spacing, origin))
        hu += np.random.default_rng(patient).normal(0, 20, hu.shape).astype(np.float32)
        hu = np.rint(np.clip(hu, -1024, 3071)).astype(np.int16)
        inside = np.zeros(labels.shape, bool)  # anatomies end inside the volume, so the crop end is not clamped
        inside[10:45, 36:92, 36:92] = True
        labels[~inside] = 0
        rel = volume_relpath(name)
        write_volume(root / "train_fixed" / rel, hu, spacing, origin)
        write_volume(root / "train_mask" / rel, labels, spacing, origin)
        truth[name] = (hu, labels, spacing)
    return root, truth


def run_resize_preprocess(root: Path, config: str | None = None) -> None:
    options = ["--data-root", str(root), "--split", "train", "--no-pbar"] + (["--config", config] if config else [])
    assert resize.main(options) == 0 and preprocess.main(options) == 0


def test_default_pipeline_cache_equals_the_release_reference(realistic_root):
    root, truth = realistic_root
    run_resize_preprocess(root)
    cfg = load_pipeline_config()
    lut = resize.build_label_lut(cfg)
    caches = {p.name.replace(".nii", ".nii.gz"): p for p in list_volumes(root, "train")}
    assert sorted(caches) == sorted(truth)
    for name, (hu, labels, spacing) in truth.items():
        want_image, want_mask = release_cache(hu, lut[labels], spacing, cfg)
        image, mask = open_volume(caches[name]), open_volume(image_to_mask_path(caches[name]))
        assert image.shape == want_image.shape == mask.shape
        assert np.array_equal(mask, want_mask)
        assert np.abs(scale_hu(image, cfg.hu_window) - want_image).max() <= 4e-4  # int16 HU rounding only
        assert len(np.unique(mask)) >= 3  # background and at least two anatomies
        window = preprocess.crop_pad_window(open_volume(root / "resized_train_masks" / volume_relpath(
            name.replace(".nii.gz", ".nii"))), cfg)
        assert all(stop < size for stop, size in zip(window.stop, mask.shape))  # the exclusive end is exercised


def test_nearest_exact_mask_option_reaches_the_resize_step(realistic_root, tmp_path):
    root, truth = realistic_root
    config = tmp_path / "pipeline.yaml"
    config.write_text(Path("configs/pipeline.yaml").read_text() + "mask_interpolation: nearest-exact\n")
    work = tmp_path / "root"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("resized_*", "processed_*"))
    run_resize_preprocess(work, str(config))
    lut = resize.build_label_lut(load_pipeline_config())
    for name, (hu, labels, spacing) in truth.items():
        image, anatomy = sitk_volume(hu, spacing), sitk_volume(lut[labels], spacing)
        release = sitk.GetArrayFromImage(resize.resample_case(image, anatomy, (1.0, 1.0, 3.0))[1])
        exact = sitk.GetArrayFromImage(resize.resample_case(image, anatomy, (1.0, 1.0, 3.0),
                                                            mask_interpolation="nearest-exact")[1])
        written = open_volume(work / "resized_train_masks" / volume_relpath(name.replace(".nii.gz", ".nii")))
        assert np.array_equal(written, exact) and not np.array_equal(written, release)
    assert len(list_volumes(work, "train")) == len(truth)
