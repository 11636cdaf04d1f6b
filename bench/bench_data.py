"""Data benchmark: pipeline seconds and bytes per volume per stage, the training read.

Generates ``--n`` realistic synthetic patients (512x512x~240 volumes, ~0.7x0.7x1.5 mm)
in a temporary folder and prints one JSON line per part (``--only`` picks parts):

- ``pipeline``: fix + resize + preprocess with one worker on one thread (SimpleITK,
  OpenMP and MKL limited to 1), wall and CPU seconds per volume, also scaled
  linearly to 512x512x240, and MB written per volume per stage (then what
  ``preprocess --delete-intermediates`` keeps). Masks come from the generator's ground
  truth (``generate_mask --masks-from``; TotalSegmentator itself is not timed). The
  baseline, in the same run: the release's files for the same volumes made with our
  computations (``release_format_pipeline``), so its time is a lower bound of the release's;
  ``--repeats`` comparisons in alternating order (the host is shared). ``--checkout DIR``
  also times another checkout's steps (e.g. the previous commit) the same way.
- ``read``: ``CTRateTrainDataset.__getitem__`` itself (the code train.py runs; crop
  (112, 256, 352), flips p = 0.2) on caches of several shapes cut or padded from
  the pipeline's cache (``--shapes``; the first is exactly the crop), one process
  pinned to one CPU; ``model_inputs`` (flips + HU scaling, on the training device
  in train.py) timed on this CPU too; the baseline, in the same run, decoding the
  same cache stored as the release stores it (float32 ``.nii.gz`` image + uint8
  ``.nii.gz`` mask, SimpleITK); then DataLoader items/s with 1, 2, 4 and 8
  workers (``--workers``; not pinned: above the host's core count they share cores).

    python bench/bench_data.py [--n 2] [--repeats 3] [--items 60] [--only read] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ[_var] = "1"
# --checkout runs this file again with another checkout's data steps (FVLM_CHECKOUT) first on the path
sys.path.insert(0, os.environ.get("FVLM_CHECKOUT") or str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from data import fix_data, generate_mask, preprocess, resize  # noqa: E402
from data.anatomy_boxes import write_boxes  # noqa: E402
from data.common import PipelineConfig, load_pipeline_config  # noqa: E402
from data.dataset import CTRateTrainDataset, collate, model_inputs  # noqa: E402
from data.io import image_to_mask_path, list_volumes, open_volume, scale_hu, write_volume  # noqa: E402
from data.synthetic import generate_dataset  # noqa: E402

PARTS = ("pipeline", "read")
STAGES = ("train", "train_fixed", "train_mask", "resized_train_images", "resized_train_masks",
          "processed_train_images", "processed_train_masks")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``; CPU time is steadier on a shared host."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"min": round(float(ms.min()), 2), "median": round(float(np.median(ms)), 2),
            "max": round(float(ms.max()), 2)}


def machine() -> dict[str, object]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads()}


def time_steps(root: Path, config: Path) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of fix, resize and preprocess over all volumes, as the user runs them (one worker)."""
    common = dict(split="train", workers=1, pbar=False, overwrite=True)
    times = {"fix": timed(lambda: fix_data.run(root, **common))}
    generate_mask.run(root, masks_from=root / "totalseg_gt", **common)
    times["resize"] = timed(lambda: resize.run(root, config=config, **common))
    times["preprocess"] = timed(lambda: preprocess.run(root, config=config, **common))
    return times


def checkout_time_steps(checkout: Path, root: Path, copy: Path) -> dict[str, tuple[float, float]]:
    """``time_steps`` of another checkout of this repository (e.g. the previous commit), on a copy of the raw
    volumes, in a fresh process."""
    if not copy.is_dir():
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(*STAGES[1:], ".manifests"))
    env = os.environ | {"FVLM_CHECKOUT": str(checkout.resolve())}
    out = subprocess.run([sys.executable, __file__, "--time-steps", str(copy)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    return {step: tuple(t) for step, t in json.loads(out.stdout.splitlines()[-1]).items()}


def run_pipeline(root: Path, work: Path, cfg: PipelineConfig, config: Path, repeats: int,
                 checkout: Path | None) -> dict[str, object]:
    """Ours (the steps as the user runs them, one worker) against the release's file formats, same volumes, same run,
    ``repeats`` times in alternating order: seconds and bytes written per volume and stage, and what
    ``preprocess --delete-intermediates`` keeps; and against another checkout's steps if ``checkout``."""
    contenders = {"ours": lambda: time_steps(root, config),
                  "release_format": lambda: release_format_pipeline(root, work / "release_files", cfg)}
    if checkout is not None:
        contenders["checkout"] = lambda: checkout_time_steps(checkout, root, work / "checkout_root")
    runs: dict[str, list] = {who: [] for who in contenders}
    for r in range(repeats):
        for who in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            runs[who].append(contenders[who]())
    n = len(list_volumes(root, "train"))
    written = {stage: folder_bytes(root / stage) / n / 1e6 for stage in STAGES}
    preprocess.run(root, "train", workers=1, pbar=False, config=config, delete_intermediates_after=True)
    kept = {stage: folder_bytes(root / stage) / n / 1e6 for stage in STAGES}
    release_mb = runs["release_format"][0][1]
    shapes = [nib.load(p).shape[::-1] for p in sorted((root / "train").glob("*/*/*.nii.gz"))]  # headers only
    to_target = 512 * 512 * 240 / float(np.mean([np.prod(s) for s in shapes]))  # linear in voxels

    def per_volume(times: dict[str, tuple[float, float]], k: int) -> dict[str, float]:
        steps = {step: round(t[k] / n, 3) for step, t in times.items()}
        return steps | {"total_at_512x512x240": round(sum(t[k] for t in times.values()) / n * to_target, 3)}
    line: dict[str, object] = {"part": "pipeline", "volumes": n, "raw_shapes_dhw": shapes, "repeats": repeats}
    for who, results in runs.items():
        times = [r[0] if who == "release_format" else r for r in results]
        line[f"{who}_seconds_per_volume"] = [per_volume(t, 0) for t in times]
        line[f"{who}_cpu_seconds_per_volume"] = [per_volume(t, 1) for t in times]
    totals = {who: [t["total_at_512x512x240"] for t in line[f"{who}_cpu_seconds_per_volume"]] for who in runs}
    line["median_cpu_s_at_512x512x240"] = {who: round(float(np.median(v)), 3) for who, v in totals.items()}
    if checkout is not None:
        line["checkout"] = str(checkout)
    line["speedup_vs_release_format_cpu_median"] = round(float(np.median(totals["release_format"])
                                                               / np.median(totals["ours"])), 2)
    return line | {
        "mb_written_per_volume": {k: round(v, 1) for k, v in written.items()} | {
            "total_written": round(sum(v for k, v in written.items() if k != "train"), 1)},
        "mb_kept_with_delete_intermediates": round(sum(v for k, v in kept.items() if k != "train"), 1),
        "release_format_mb_written_per_volume": {k: round(v / n, 1) for k, v in release_mb.items()} | {
            "total_written": round(sum(release_mb.values()) / n, 1)}}


def release_format_pipeline(root: Path, out: Path, cfg: PipelineConfig
                            ) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """The baseline: the release's files for the same volumes, made with our computations so that only the files
    differ: a fixed int16 copy, the resized image + mask and the cache as float32 [0, 1] image + uint8 mask, each a
    ``.nii.gz`` written by SimpleITK with compression, as the release writes them (its TotalSegmentator mask is
    ours, not timed). Returns (wall, CPU) seconds per step and MB per stage, summed over the volumes."""
    lut = resize.build_label_lut(cfg)
    metadata = fix_data.read_metadata(root, "train")
    times = {step: (0.0, 0.0) for step in ("fix", "resize", "preprocess")}
    mb = {"fixed": 0.0, "mask": 0.0, "resized": 0.0, "processed": 0.0}
    for raw in sorted((root / "train").glob("*/*/*.nii.gz")):
        folder = out / raw.name
        folder.mkdir(parents=True)
        labels_path = root / "train_mask" / raw.relative_to(root / "train")

        def write(image: sitk.Image, name: str) -> None:
            sitk.WriteImage(image, str(folder / name), useCompression=True)

        def fix() -> None:
            image = sitk.ReadImage(str(raw))
            write(fix_data.fixed_image(sitk.GetArrayViewFromImage(image), fix_data.fix_geometry(metadata[raw.name])),
                  "fixed.nii.gz")

        def resize_() -> None:
            image, labels = sitk.ReadImage(str(folder / "fixed.nii.gz")), sitk.ReadImage(str(labels_path))
            image_r, labels_r = resize.resample_case(image, labels, cfg.target_spacing_xyz,
                                                     mask_interpolation=cfg.mask_interpolation)
            write(image_r, "resized_image.nii.gz")
            anatomy = sitk.GetImageFromArray(resize.merge_labels(sitk.GetArrayViewFromImage(labels_r), lut))
            anatomy.CopyInformation(labels_r)
            write(anatomy, "resized_mask.nii.gz")

        def preprocess_() -> None:
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "resized_image.nii.gz")))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "resized_mask.nii.gz")))
            image, mask = preprocess.crop_pad_case(image, mask, cfg)
            write(sitk.GetImageFromArray(scale_hu(image, cfg.hu_window)), "image.nii.gz")
            write(sitk.GetImageFromArray(np.ascontiguousarray(mask)), "mask.nii.gz")

        for step, fn in (("fix", fix), ("resize", resize_), ("preprocess", preprocess_)):
            wall, cpu = timed(fn)
            times[step] = (times[step][0] + wall, times[step][1] + cpu)
        size = {f.name: f.stat().st_size / 1e6 for f in folder.iterdir()}
        mb["fixed"] += size["fixed.nii.gz"]
        mb["mask"] += labels_path.stat().st_size / 1e6
        mb["resized"] += size["resized_image.nii.gz"] + size["resized_mask.nii.gz"]
        mb["processed"] += size["image.nii.gz"] + size["mask.nii.gz"]
        shutil.rmtree(folder)
    return times, mb


def reshaped_cache(src: Path, dst: Path, shape: Sequence[int], cfg: PipelineConfig) -> Path:
    """Copy of the cache under ``src`` cut or padded (centred, as preprocess pads) to ``shape``, written as
    preprocess writes it, plus the release's format of the same arrays in ``dst/release``."""
    for image_path in list_volumes(src, "train"):
        rel = image_path.relative_to(src / "processed_train_images")
        image, mask = open_volume(image_path), open_volume(image_to_mask_path(image_path))
        start = [max((n - s) // 2, 0) for n, s in zip(image.shape, shape)]
        window = preprocess.CropPad(
            tuple(start), tuple(min(a + s, n) for a, s, n in zip(start, shape, image.shape)),
            tuple(max(s - n, 0) // 2 for s, n in zip(shape, image.shape)),
            tuple(max(s - n, 0) - max(s - n, 0) // 2 for s, n in zip(shape, image.shape)))
        image = preprocess.apply_crop_pad(image, window, cfg.pad_hu)
        mask = preprocess.apply_crop_pad(mask, window, 0)
        mask_path = dst / "processed_train_masks" / rel
        write_volume(dst / "processed_train_images" / rel, image, (1.0, 1.0, 3.0))
        write_boxes(mask, mask_path)
        write_volume(mask_path, mask, (1.0, 1.0, 3.0))
        release = dst / "release" / rel.with_suffix(".nii.gz")
        release.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(scale_hu(image, cfg.hu_window)), str(release), useCompression=True)
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(release.with_name("mask_" + release.name)),
                        useCompression=True)
    for name in ("desc_info.json", "conc_info.json"):
        shutil.copy(src / name, dst / name)
    return dst


def time_items(ds: CTRateTrainDataset, n_items: int, decode: Callable[[int], None], n_decodes: int
               ) -> tuple[list[tuple[float, float]], list[float], list[tuple[float, float]]]:
    """(wall, CPU) seconds of ``ds[i]``, seconds of ``model_inputs`` on its item, and (wall, CPU) of
    ``decode(k)`` interleaved with the items (the host's load then weighs on both alike); first pass untimed."""
    for i in range(len(ds)):
        ds[i]
    items, device_side, decodes = [], [], []
    every = max(n_items // n_decodes, 1)
    for k in range(n_items):
        ds.set_epoch(1 + k // len(ds))
        item: dict = {}
        items.append(timed(lambda: item.update(ds[k % len(ds)])))
        batch = collate([item])
        device_side.append(timed(lambda: model_inputs(batch["hu"], batch["mask"], batch["flip"], ds.hu_window))[0])
        if k % every == 0 and len(decodes) < n_decodes:
            decodes.append(timed(lambda: decode(len(decodes))))
    return items, device_side, decodes


def loader_rate(ds: CTRateTrainDataset, workers: int, n_items: int, batch: int) -> tuple[float, float]:
    """(items/s, CPU ms per item of workers + main process) through ``DataLoader`` with ``collate``.

    Timed after the first batch; the workers' CPU time is theirs once they exit (end of iteration).
    """
    order = [i % len(ds) for i in range(n_items + batch)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=order, num_workers=workers,
                                         collate_fn=collate)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time()
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = sum(len(b["scan_id"]) for b in it)
    rate = count / (time.perf_counter() - start)
    del it
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = time.process_time() - cpu + (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return rate, cpu_s / (count + batch) * 1e3


def run_read(root: Path, work: Path, cfg: PipelineConfig, args: argparse.Namespace) -> list[dict[str, object]]:
    all_cpus = os.sched_getaffinity(0)
    lines = []
    for shape in args.shapes:
        cache = reshaped_cache(root, work / ("x".join(map(str, shape))), shape, cfg)
        ds = CTRateTrainDataset(cache, anatomy_names=cfg.anatomy_names, crop_size=cfg.min_size_dhw,
                                hu_window=cfg.hu_window, flip_prob=0.2, seed=args.seed)
        os.sched_setaffinity(0, {min(all_cpus)})
        torch.set_num_threads(1)
        releases = sorted((cache / "release").glob("*/*/train_*.nii.gz"))

        def decode(k: int) -> None:  # the release's loader: decode the whole image and mask
            path = releases[k % len(releases)]
            sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            sitk.GetArrayFromImage(sitk.ReadImage(str(path.with_name("mask_" + path.name))))
        try:
            items, device_side, decodes = time_items(ds, args.items, decode, args.decodes)
        finally:
            os.sched_setaffinity(0, all_cpus)
        wall, cpu = [w for w, _ in items], [c for _, c in items]
        decode_wall, decode_cpu = [w for w, _ in decodes], [c for _, c in decodes]
        line = {"part": "read", "cache_shape_dhw": list(shape), "crop_dhw": list(cfg.min_size_dhw),
                "scans": len(ds), "volumes": sum(map(len, ds.reconstructions)), "items": args.items,
                "getitem_ms": stats_ms(wall), "getitem_cpu_ms": stats_ms(cpu),
                "model_inputs_ms_on_this_cpu": stats_ms(device_side),
                "release_decode_ms": stats_ms(decode_wall), "release_decode_cpu_ms": stats_ms(decode_cpu),
                "speedup_vs_release_decode": {"wall_median": round(float(np.median(decode_wall) / np.median(wall)), 1),
                                              "cpu_median": round(float(np.median(decode_cpu) / np.median(cpu)), 1)},
                "pinned_one_cpu": True}
        if shape == tuple(args.shapes[0]):
            rates = {w: loader_rate(ds, w, args.loader_items, args.batch) for w in args.workers}
            line["loader_items_per_s"] = {str(w): round(r, 1) for w, (r, _) in rates.items()}
            line["loader_cpu_ms_per_item"] = {str(w): round(c, 1) for w, (_, c) in rates.items()}
            line["loader_batch"] = args.batch
            # cores a node needs per 100 items/s: from the bare item (CPU time) and through the DataLoader
            line["cores_per_100_items_per_s"] = {
                "getitem": round(100 * float(np.median(cpu)), 2),
                "loader_1_worker": round(100 * rates[min(args.workers)][1] / 1e3, 2)}
        lines.append(line)
    return lines


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2, help="realistic training patients to generate (1-2 volumes each)")
    parser.add_argument("--only", choices=PARTS, nargs="+", default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3, help="pipeline comparisons, in alternating order")
    parser.add_argument("--checkout", type=Path, default=None,
                        help="also time the data steps of this other checkout of fvlm (e.g. a git worktree of the "
                             "previous commit) on the same volumes, in the same alternation")
    parser.add_argument("--time-steps", type=Path, default=None, help=argparse.SUPPRESS)  # --checkout's child
    parser.add_argument("--items", type=int, default=60, help="__getitem__ calls timed per cache shape")
    parser.add_argument("--decodes", type=int, default=5, help="release-format decodes timed per cache shape")
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                        default=[(112, 256, 352), (144, 320, 416), (176, 384, 480)],
                        help="cache shapes DxHxW; the first gets the DataLoader figures")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--loader-items", type=int, default=96, help="items per DataLoader setting")
    parser.add_argument("--batch", type=int, default=4, help="DataLoader batch size")
    parser.add_argument("--config", type=Path, default=Path("configs/pipeline.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the generated data here and reuse it on the next run (default: a temp dir)")
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if args.time_steps is not None:  # --checkout's child: this checkout's steps and its own default config
        config = Path(fix_data.__file__).resolve().parents[1] / "configs" / "pipeline.yaml"
        print(json.dumps(time_steps(args.time_steps, config)))
        return 0
    cfg = load_pipeline_config(args.config)
    if tuple(args.shapes[0]) != tuple(cfg.min_size_dhw):
        parser.error(f"the first --shapes must be the crop {cfg.min_size_dhw}")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = args.work_dir or Path(tmp) / "data"
        if not (root / "metadata").is_dir():
            generate_dataset(root, n_train=args.n, n_valid=1, seed=args.seed, realistic=True)  # valid unused
        work = Path(tmp) / "work"
        work.mkdir()
        if "pipeline" in args.only or not list_volumes(root, "train"):
            print(json.dumps(run_pipeline(root, work, cfg, args.config, args.repeats, args.checkout) | machine()),
                  flush=True)
        if "read" in args.only:
            for line in run_read(root, work, cfg, args):
                print(json.dumps(line | machine()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
