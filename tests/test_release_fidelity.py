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
from data.io import image_to_mask_path, list_volumes, open_volume, read_volume, scale_hu, write_volume
from data.common import PipelineConfig, load_pipeline_config, volume_relpath
from data.synthetic import Grid, render, scan_phantom
from tests.test_data_pipeline import run_pipeline


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
        origin = (p.cx - 64 * spacing[0], p.cy - 64 * spacing[1] + 20, p.cz - 30 * spacing[2])
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
        window = preprocess.crop_pad_window(read_volume(resize.resized_paths(root, "train", name)[1]), cfg)
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
        written = read_volume(resize.resized_paths(work, "train", name)[1])
        assert np.array_equal(written, exact) and not np.array_equal(written, release)
    assert len(list_volumes(work, "train")) == len(truth)


# ---------------------------------------------------------------------------- CT-RATE v1 (raw) and v2 (fixed)

def chest_hu(shape=(16, 32, 32), seed: int = 0) -> np.ndarray:
    """A crude chest in HU: outside air, subcutaneous fat, lungs, soft tissue, bone, with noise."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, 40.0)
    hu[:, :8] = -1000.0   # air in front of the body
    hu[:, 8:11] = -100.0  # fat
    hu[:, 11:20, :14] = hu[:, 11:20, 18:] = -850.0  # lungs
    hu[:, 26:, 12:20] = 700.0  # spine
    return np.rint(np.clip(hu + rng.normal(0, 15, shape), -1024, 3071)).astype(np.int16)


ROW = {"XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5", "ImagePositionPatient": "[-190.5, -170.25, -320.0]",
       "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]"}


@pytest.mark.parametrize("slope, intercept", [(1, -1024), (1, -8192), (2, -1024), (1, 0)])
def test_ctrate_version_from_values_then_header(slope, intercept, tmp_path):
    from data.fix_data import ctrate_version, fix_case, fix_geometry, read_fixed

    row = {**ROW, "RescaleSlope": str(slope), "RescaleIntercept": str(intercept)}
    geometry = fix_geometry(row)
    hu = chest_hu()
    raw = ((hu.astype(np.int32) - intercept) // slope).astype(np.int16)  # v1: stored integers, default header
    v1 = sitk.GetImageFromArray(raw)
    v2 = sitk.GetImageFromArray(hu)  # v2: HU with the true geometry
    v2.SetSpacing(geometry.spacing_xyz), v2.SetOrigin(geometry.origin_xyz)
    identity = slope == 1 and intercept == 0
    version, evidence = ctrate_version(v1, raw, geometry)
    assert version == 1 and ("header differs" in evidence if identity else "values are HU after" in evidence)
    version, evidence = ctrate_version(v2, hu, geometry)
    assert version == 2 and ("header equals" in evidence if identity else "values are HU as stored" in evidence)
    # the same v2 volume under a default header is still v2 (the values decide) unless they cannot tell
    plain = sitk.GetImageFromArray(hu)
    assert ctrate_version(plain, hu, geometry)[0] == (1 if identity else 2)
    # both end as the same fixed volume
    for name, image in (("v1", v1), ("v2", v2)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        fix_case(tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.fix.json", row)
    fixed = [read_fixed((tmp_path / f"{name}.fix.json", tmp_path / f"{name}.nii.gz")) for name in ("v1", "v2")]
    expected = hu if slope == 1 else (raw.astype(np.int32) * slope + intercept)  # v1 keeps the stored rounding
    assert np.array_equal(sitk.GetArrayFromImage(fixed[0]), expected)
    assert np.array_equal(sitk.GetArrayFromImage(fixed[1]), hu)
    assert fixed[0].GetOrigin() == pytest.approx(fixed[1].GetOrigin(), abs=1e-3)


def test_a_volume_that_is_neither_v1_nor_v2_is_a_failed_case():
    from data.common import CaseError
    from data.fix_data import ctrate_version, fix_geometry

    geometry = fix_geometry({**ROW, "RescaleSlope": "1", "RescaleIntercept": "-1024"})
    flat = np.full((8, 16, 16), 3000, np.int16)  # no air as stored nor after the rescale
    with pytest.raises(CaseError, match="neither CT-RATE v1 nor v2"):
        ctrate_version(sitk.GetImageFromArray(flat), flat, geometry)


@pytest.fixture(scope="module")
def v1_v2_roots(tmp_path_factory) -> tuple[Path, Path]:
    from data.synthetic import generate_dataset

    roots = []
    for version in (1, 2):  # seed 5: rescales (1, -1024), (2, -1024) and (1, -8192) among the train volumes
        root = tmp_path_factory.mktemp(f"ctrate_v{version}")
        generate_dataset(root, n_train=4, n_valid=1, seed=5, ctrate_version=version)
        roots.append(root)
    return roots[0], roots[1]


def test_v1_and_v2_downloads_give_identical_caches(v1_v2_roots, caplog):
    v1, v2 = v1_v2_roots
    assert not (v2 / "train").exists() and (v2 / "train_fixed").is_dir()
    metadata = "metadata/train_metadata.csv"
    assert (v1 / metadata).read_bytes() == (v2 / metadata).read_bytes()
    caplog.set_level("INFO")
    assert run_pipeline(v1) == [0, 0, 0, 0]
    assert run_pipeline(v2) == [0, 0, 0, 0]
    assert "fix train: nothing to fix" in caplog.text
    caches = list_volumes(v1, "train")
    assert len(caches) >= 5
    assert [p.relative_to(v1) for p in caches] == [p.relative_to(v2) for p in list_volumes(v2, "train")]
    for path in caches + [image_to_mask_path(p) for p in caches]:
        other = v2 / path.relative_to(v1)
        assert np.array_equal(open_volume(path), open_volume(other))
        a, b = sitk.ReadImage(str(path)), sitk.ReadImage(str(other))
        assert a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-6)
        assert a.GetOrigin() == pytest.approx(b.GetOrigin(), abs=1e-3)
    versions = (v1 / "fix_train_versions.csv").read_text().splitlines()
    assert versions[0] == "volume,version,evidence" and all(",1," in line for line in versions[1:])


def test_v2_files_under_the_raw_folder_are_not_rescaled_twice(v1_v2_roots, tmp_path):
    from data import fix_data
    from data.synthetic import load_truth

    _, v2 = v1_v2_roots
    root = tmp_path / "root"
    shutil.copytree(v2 / "train_fixed", root / "train")  # as the release's instructions place them
    shutil.copytree(v2 / "metadata", root / "metadata")
    shutil.copy(v2 / "synthetic_manifest.json", root)
    assert fix_data.main(["--data-root", str(root), "--split", "train", "--no-pbar"]) == 0
    names = sorted(p.name for p in (root / "train").glob("*/*/*.nii.gz"))
    for name in names:
        fixed = sitk.GetArrayFromImage(fix_data.read_fixed(fix_data.fixed_sources(root, "train")[name]))
        assert np.array_equal(fixed, load_truth(root, name)["hu"])
    rows = (root / "fix_train_versions.csv").read_text().splitlines()[1:]
    assert len(rows) == len(names) and all(",2," in row for row in rows)


def test_synthetic_cli_writes_the_v2_layout(tmp_path):
    from data import synthetic

    assert synthetic.main(["--data-root", str(tmp_path), "--n-train", "1", "--n-valid", "1", "--ctrate-version", "2"]) == 0
    assert not (tmp_path / "train").exists() and not (tmp_path / "valid").exists()
    fixed = sorted(p.name for p in (tmp_path / "valid_fixed").glob("*/*/*.nii.gz"))
    assert fixed and all(sitk.ReadImage(str(p)).GetPixelID() == sitk.sitkInt16
                         for p in (tmp_path / "train_fixed").glob("*/*/*.nii.gz"))
