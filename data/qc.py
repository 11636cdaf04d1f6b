"""Look at what the model will see: PNG mosaics and a flagged table of a sample of processed crops.

    python -m data.qc --data-root ROOT --split valid --n 16 [--config configs/pipeline.yaml] [--out DIR]

Reads ``processed_{split}_{images,masks}/`` (the training cache ``preprocess`` writes) and writes to
``--out`` (default ``{data_root}/qc_{split}/``):

- ``{volume}.png``: for each anatomy, the axial, coronal and sagittal slice where it is largest, its
  outline over the CT (HU window of the config);
- ``qc_{split}.csv``: per volume each anatomy's voxel count and share of the crop, the crop's padding
  share, HU percentiles (1, 50, 99) of the non-padding voxels and the flags:

  - ``missing:{anatomy}`` / ``tiny:{anatomy}`` (fewer voxels than ``TINY_FRACTION`` of the sample's median);
  - ``mirrored``: the heart lies on the other side of the body's midline (x) than in most sampled volumes
    (judged when at least 3 sampled volumes have a heart);
  - ``rescaled_twice``: the 1st HU percentile is below ``TWICE_RESCALED_HU`` (air at ~-2048 instead of
    ~-1000: a v1 volume whose rescale was applied again);
  - ``mostly_padding``: more than ``MAX_PADDING`` of the crop is padding.

The sample is ``--n`` volumes evenly spread over the sorted list. Flags are warnings: the summary line
counts them and the command exits 0; it exits 2 (nothing written) when the cache is missing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data.common import DEFAULT_CONFIG, SPLITS, PipelineConfig, PipelineError, load_pipeline_config
from data.io import atomic_output, image_to_mask_path, list_volumes, open_volume, write_csv

logger = logging.getLogger(__name__)

TINY_FRACTION = 0.2
TWICE_RESCALED_HU = -1500.0
MAX_PADDING = 0.5
PERCENTILES = (1, 50, 99)
VIEWS = ("axial", "coronal", "sagittal")


def sample(paths: Sequence[Path], n: int) -> list[Path]:
    """``n`` paths evenly spread over ``paths`` (all when there are fewer)."""
    if len(paths) <= n:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, n).round()]


def volume_stats(image: np.ndarray, mask: np.ndarray, pipe: PipelineConfig) -> dict:
    """Voxel counts, padding share, HU percentiles and the heart's side of the body midline (+1: larger x)."""
    padding = image == pipe.pad_hu
    tissue = image[~padding]
    stats = {"counts": [int((mask == k).sum()) for k in range(1, pipe.n_anatomies + 1)],
             "padding": float(padding.mean()),
             "hu": np.percentile(tissue, PERCENTILES).tolist() if tissue.size else [float("nan")] * 3,
             "heart_side": 0, "size": int(mask.size)}
    if "heart" in pipe.anatomy_names:
        heart = np.flatnonzero((mask == pipe.anatomy_names.index("heart") + 1).any(axis=(0, 1)))
        body = np.flatnonzero((image > -500).any(axis=(0, 1)))
        if heart.size and body.size:
            stats["heart_side"] = int(np.sign(heart.mean() - (body[0] + body[-1]) / 2))
    return stats


def flags(stats: list[dict], pipe: PipelineConfig) -> list[list[str]]:
    """The QC flags of each volume, judged against the sample (see the module doc)."""
    counts = np.array([s["counts"] for s in stats])
    medians = np.median(counts, axis=0)
    sides = [s["heart_side"] for s in stats if s["heart_side"]]
    majority = int(np.sign(sum(sides))) if len(sides) >= 3 else 0
    out = []
    for s, c in zip(stats, counts):
        f = [f"missing:{a}" for a, n in zip(pipe.anatomy_names, c) if n == 0]
        f += [f"tiny:{a}" for a, n, m in zip(pipe.anatomy_names, c, medians) if 0 < n < TINY_FRACTION * m]
        if majority and s["heart_side"] == -majority:
            f.append("mirrored")
        if s["hu"][0] < TWICE_RESCALED_HU:
            f.append("rescaled_twice")
        if s["padding"] > MAX_PADDING:
            f.append("mostly_padding")
        out.append(f)
    return out


def mosaic(path: Path, image: np.ndarray, mask: np.ndarray, pipe: PipelineConfig, title: str) -> None:
    """One row per anatomy: the axial / coronal / sagittal slices where it is largest, outline over the CT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = pipe.n_anatomies
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), dpi=60, squeeze=False)
    lo, hi = pipe.hu_window
    for k, name in enumerate(pipe.anatomy_names, start=1):
        present = mask == k
        for ax, view in zip(axes[k - 1], VIEWS):
            axis = VIEWS.index(view)  # (D, H, W): axial cuts D, coronal H, sagittal W
            area = present.sum(axis=tuple(a for a in range(3) if a != axis))
            index = int(area.argmax()) if area.any() else mask.shape[axis] // 2
            ct, m = np.take(image, index, axis=axis), np.take(present, index, axis=axis)
            origin = "upper" if view == "axial" else "lower"  # superior up in coronal / sagittal
            ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, origin=origin, interpolation="nearest", aspect="auto")
            if m.any():
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.8, origin=origin)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {view}" + ("" if area.any() else " (absent)"), fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run(data_root: str | Path, split: str, *, n: int = 16, config: str | Path | None = None,
        out: str | Path | None = None) -> dict[str, list[str]]:
    """Write the mosaics and the table; returns ``{volume: flags}``."""
    root = Path(data_root)
    pipe = load_pipeline_config(config)
    paths = list_volumes(root, split)
    if not paths:
        raise PipelineError(f"no processed volumes in {root / f'processed_{split}_images'} "
                            "(check --data-root and that preprocess ran)")
    missing = [image_to_mask_path(p) for p in paths if not image_to_mask_path(p).is_file()]
    if missing:
        raise PipelineError(f"mask missing for a processed volume: {missing[0]} (rerun preprocess)")
    out = Path(out) if out is not None else root / f"qc_{split}"
    chosen = sample(paths, n)
    stats = []
    for path in chosen:
        image, mask = open_volume(path), open_volume(image_to_mask_path(path))
        stats.append(volume_stats(image, mask, pipe))
        mosaic(out / f"{path.stem}.png", image, mask, pipe, path.stem)
    found = flags(stats, pipe)
    header = ["volume", *(f"{a}_{what}" for a in pipe.anatomy_names for what in ("voxels", "share")),
              "padding_share", *(f"hu_p{p}" for p in PERCENTILES), "flags"]
    rows = []
    for path, s, f in zip(chosen, stats, found):
        cells = [v for c in s["counts"] for v in (c, round(c / s["size"], 4))]
        rows.append([path.stem, *cells, round(s["padding"], 4), *(round(v, 1) for v in s["hu"]), " ".join(f)])
    write_csv(out / f"qc_{split}.csv", header, rows)
    flagged = {p.stem: f for p, f in zip(chosen, found) if f}
    for name, f in flagged.items():
        logger.warning("qc %s: %s", name, ", ".join(f))
    logger.info("qc %s: %d volumes, %d flagged (table: %s, mosaics: %s)", split, len(chosen), len(flagged),
                out / f"qc_{split}.csv", out)
    return {p.stem: f for p, f in zip(chosen, found)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("."), help="root holding processed_{split}_*/")
    parser.add_argument("--split", choices=SPLITS, default="valid")
    parser.add_argument("--n", type=int, default=16, help="volumes to look at (evenly spread)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pipeline config (anatomies, HU window)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default {data_root}/qc_{split})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 1:
        parser.error("--n must be >= 1")
    try:
        run(args.data_root, args.split, n=args.n, config=args.config, out=args.out)
    except PipelineError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
