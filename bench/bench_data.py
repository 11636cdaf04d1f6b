"""Data pipeline benchmark: seconds per volume for fix, resize, preprocess, and the training-crop read.

Generates ``--n`` realistic synthetic volumes (512x512x~240, ~0.7x0.7x1.5 mm) in a
temporary folder, runs the steps with one worker on one thread (SimpleITK, OpenMP
and MKL limited to 1; ``--pin`` also pins the process to one CPU), and times one
random training crop (image + mask, flips with p = 0.2 per axis, ``scale_hu``)
read from the memory-mapped cache against decoding the same volume from its
``.nii.gz`` (the raw CT-RATE-style file and the gzip mask). Prints one JSON line
with wall seconds and, since the host may be shared, CPU seconds per step, plus
the total scaled linearly to a 512x512x240 volume. Targets: fix + resize +
preprocess <= 3.6 s per 512x512x240 volume; one crop <= 33 ms and >= 20x faster. Masks come from the generator's ground truth
(``generate_mask --masks-from``; TotalSegmentator itself is not timed).

    python bench/bench_data.py [--n 1] [--crops 20] [--config configs/pipeline.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ[_var] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from data import fix_data, generate_mask, preprocess, resize  # noqa: E402
from data.io import image_to_mask_path, list_volumes, open_volume, scale_hu  # noqa: E402
from data.common import load_pipeline_config, volume_relpath  # noqa: E402
from data.synthetic import generate_dataset  # noqa: E402


def random_crop(image: np.ndarray, mask: np.ndarray, size: Sequence[int], rng: np.random.Generator,
                hu_window: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The training read: random crop of both, random flips (p = 0.2 per axis), HU scaling."""
    starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(image.shape, size)]
    window = tuple(slice(a, a + s) for a, s in zip(starts, size))
    image, mask = image[window], mask[window]
    flips = tuple(axis for axis in range(3) if rng.random() < 0.2)
    if flips:
        image, mask = np.flip(image, flips), np.flip(mask, flips)
    return scale_hu(image, hu_window), np.ascontiguousarray(mask)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_cpu(fn, cpu: dict[str, float], key: str) -> float:
    """Wall seconds of ``fn()``; its CPU seconds go to ``cpu[key]`` (the host is shared: CPU time is steadier)."""
    start = time.process_time()
    wall = timed(fn)
    cpu[key] = time.process_time() - start
    return wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1, help="realistic training patients to generate (1-2 volumes each)")
    parser.add_argument("--crops", type=int, default=20, help="random crops to time")
    parser.add_argument("--config", type=Path, default=Path("configs/pipeline.yaml"))
    parser.add_argument("--pin", action="store_true", help="pin the process to one CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the generated data here and reuse it on the next run (default: a temp dir)")
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if args.pin:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cfg = load_pipeline_config(args.config)
    crop_size = cfg.min_size_dhw
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = args.work_dir or Path(tmp)
        if not (root / "metadata").is_dir():
            generate_dataset(root, n_train=args.n, n_valid=1, seed=args.seed, realistic=True)  # valid unused
        common = dict(split="train", workers=1, pbar=False, overwrite=True)
        cpu: dict[str, float] = {}
        seconds = {"fix": timed_cpu(lambda: fix_data.run(root, **common), cpu, "fix")}
        generate_mask.run(root, masks_from=root / "totalseg_gt", **common)
        seconds["resize"] = timed_cpu(lambda: resize.run(root, config=args.config, **common), cpu, "resize")
        seconds["preprocess"] = timed_cpu(lambda: preprocess.run(root, config=args.config, **common), cpu,
                                          "preprocess")
        volumes = list_volumes(root, "train")
        shapes = [sitk.ReadImage(str(p)).GetSize()[::-1] for p in sorted((root / "train").glob("*/*/*.nii.gz"))]

        rng = np.random.default_rng(args.seed)
        cache_times, cache_cpu = [], []
        for i in range(args.crops):
            path = volumes[i % len(volumes)]
            start = time.process_time()
            cache_times.append(timed(lambda: random_crop(open_volume(path), open_volume(image_to_mask_path(path)),
                                                         crop_size, rng, cfg.hu_window)))
            cache_cpu.append(time.process_time() - start)
        name = volumes[0].name[: -len(".nii")] + ".nii.gz"
        image_gz = root / "train" / volume_relpath(name)  # the CT-RATE-style compressed volume
        mask_gz = root / "train_mask" / volume_relpath(name)

        def decode_and_crop() -> None:
            image_sitk, mask_sitk = sitk.ReadImage(str(image_gz)), sitk.ReadImage(str(mask_gz))
            image, mask = sitk.GetArrayViewFromImage(image_sitk), sitk.GetArrayViewFromImage(mask_sitk)
            random_crop(image, mask, [min(s, n) for s, n in zip(crop_size, image.shape)], rng, cfg.hu_window)

        decode_times = [timed(decode_and_crop) for _ in range(3)]
    per_volume = {k: v / len(volumes) for k, v in seconds.items()}
    to_target = 512 * 512 * 240 / float(np.mean([np.prod(shape) for shape in shapes]))  # linear in voxels
    cpu_per_volume = {k: v / len(volumes) for k, v in cpu.items()}
    crop_ms = float(np.median(cache_times) * 1e3)
    decode_ms = float(np.median(decode_times) * 1e3)
    print(json.dumps({
        "bench": "data_pipeline", "volumes": len(volumes), "raw_shapes_dhw": shapes, "threads": 1,
        "fix_s": round(per_volume["fix"], 3), "resize_s": round(per_volume["resize"], 3),
        "preprocess_s": round(per_volume["preprocess"], 3),
        "fix_resize_preprocess_s": round(sum(per_volume.values()), 3),
        "cpu_s": {k: round(v, 3) for k, v in cpu_per_volume.items()},
        "fix_resize_preprocess_cpu_s": round(sum(cpu_per_volume.values()), 3),
        "fix_resize_preprocess_s_at_512x512x240": round(sum(per_volume.values()) * to_target, 3),
        "fix_resize_preprocess_cpu_s_at_512x512x240": round(sum(cpu_per_volume.values()) * to_target, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "crop_read_ms_median": round(crop_ms, 2),
        "crop_read_cpu_ms_median": round(float(np.median(cache_cpu)) * 1e3, 2), "crop_read_ms_max": round(max(cache_times) * 1e3, 2),
        "nii_gz_decode_crop_ms": round(decode_ms, 1), "crop_speedup": round(decode_ms / crop_ms, 1),
        "crop_size_dhw": list(crop_size), "cpu": platform.processor() or platform.machine(),
        "pinned": args.pin,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
