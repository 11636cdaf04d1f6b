"""Zero-shot evaluation of one checkpoint on the processed validation volumes (spec §7).

    torchrun --nproc_per_node=4 eval.py [--config configs/ctrate.yaml] [--checkpoint CKPT]
    python eval.py --checkpoint output/fvlm_ctrate/checkpoint_19.pth --data-root data
    python calc_metrics.py --csv_file res/checkpoint_19.csv     # eval.py's default --csv_file

Writes ONE CSV (rank 0, atomically) in the release's format: ``file_name`` (the VolumeName,
e.g. ``valid_1_a_1.nii.gz``) + one column ``{anatomy}_{abnormality}_{negative}_{positive}``
per item of ``--items``, empty cell when the anatomy is absent, rows sorted by file name;
and ``<output stem>_failures.csv`` (``volume,reason``; header only when nothing failed).
Volumes are sharded over ranks (``volumes[rank::world_size]``).

Exactly the given checkpoint is evaluated (default: the latest ``checkpoint_*.pth`` of the
preset's output directory); no epoch is chosen on the validation set (spec §9).
Exit status: 0 = every volume scored, 1 = some volume could not be read (see the failures
CSV), 2 = the run could not start (message names the flag to set).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.cache import VolumeReadError, image_to_mask_path, list_volumes, open_volume, scale_hu
from data.common import PipelineError
from utils.checkpoint import latest_checkpoint
from utils.config import ConfigError
from utils.distributed import destroy, gather_to_main, init_distributed, is_main_process, setup_logging
from utils.preset import given_flags, load_preset
from zeroshot import (ZeroShotScorer, ZeroShotSetupError, load_eval_model, load_items, prompt_features,
                      write_failures_csv, write_prediction_csv)

logger = logging.getLogger("eval")
# command-line flag -> preset key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"data_root": "paths.data_root", "text_encoder": "paths.text_encoder", "output_dir": "paths.output_dir",
             "items": "zeroshot_items"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM zero-shot evaluation", add_help=False)
    p.add_argument("--config", default="configs/ctrate.yaml", help="training preset (model size, pipeline config)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint to evaluate: ours or the released fVLM weights "
                        "(default: latest checkpoint_*.pth in --output-dir)")
    p.add_argument("--output-dir", dest="output_dir",
                   help="training output directory searched for the default checkpoint (default: the preset's)")
    p.add_argument("--data-root", dest="data_root",
                   help="root holding processed_{split}_images/ and _masks/ (default: the preset's, 'data')")
    p.add_argument("--items", help="test items, prompts and roi (default: the preset's zeroshot_items)")
    p.add_argument("--text-encoder", dest="text_encoder",
                   help="text encoder directory for config + vocabulary (default: the preset's)")
    p.add_argument("--split", default="valid", help="processed split to score (default: valid)")
    p.add_argument("--csv_file", type=Path, help="prediction CSV, calc_metrics.py's input (default: res/<name>.csv)")
    p.add_argument("--name", help="name of the default output (default: the checkpoint's file stem)")
    p.add_argument("--no-pbar", dest="pbar", action="store_false", help="no progress bar (cluster logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. model.depth=4")
    return p


def read_case(image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, mask ids), both (D, H, W) memory-mapped; VolumeReadError when unusable."""
    image = open_volume(image_path)
    mask = open_volume(image_to_mask_path(image_path))
    if image.shape != mask.shape:
        raise VolumeReadError(f"image {image.shape} and mask {mask.shape} differ in shape")
    return image, mask


def volume_name(image_path: Path) -> str:
    """Processed ``.../valid_1_a_1.nii`` -> the VolumeName ``valid_1_a_1.nii.gz``."""
    return image_path.name[: -len(".nii")] + ".nii.gz"


def evaluate(args: argparse.Namespace) -> int:
    rank, world_size, device = init_distributed()
    setup_logging()
    cfg = load_preset(args.config, args.overrides, flags=given_flags(args, FLAG_KEYS))
    pipe = cfg.pipeline
    roi, items = load_items(cfg.zeroshot_items)
    data_root = Path(cfg.paths.data_root)
    checkpoint = args.checkpoint
    if checkpoint is None:
        out_dir = Path(cfg.paths.output_dir)
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise ZeroShotSetupError(f"no checkpoint_*.pth in {out_dir}: set --checkpoint or --output-dir")
    output = args.csv_file or Path("res") / f"{args.name or checkpoint.stem}.csv"
    volumes = list_volumes(data_root, args.split)
    if not volumes:
        raise ZeroShotSetupError(
            f"no processed volumes in {data_root / f'processed_{args.split}_images'}: set --data-root / --split")

    model, tokenizer = load_eval_model(cfg, checkpoint, device)
    text_feats = prompt_features(model, tokenizer, items, cfg.model.text_max_length, device)
    scorer = ZeroShotScorer(model, items, pipe.anatomy_names, text_feats, roi, device,
                            transform=lambda hu: scale_hu(hu, pipe.hu_window))
    logger.info("checkpoint %s: %d volumes of %s on %d process(es), %d items, roi %s",
                checkpoint, len(volumes), args.split, world_size, len(items), roi)

    rows: dict[str, dict[str, float]] = {}
    failures: list[tuple[str, str]] = []
    mine = volumes[rank::world_size]
    for path in tqdm(mine, desc=f"eval {args.split}", disable=not (args.pbar and is_main_process())):
        name = volume_name(path)
        try:
            image, mask = read_case(path)
        except (VolumeReadError, OSError, ValueError) as e:
            logger.warning("%s: %s", name, e)
            failures.append((name, str(e).replace("\n", " ")))
            continue
        rows[name] = scorer(image, mask)

    gathered = gather_to_main((rows, failures))
    if not is_main_process():
        return 0
    all_rows: dict[str, dict[str, float]] = {}
    all_failures: list[tuple[str, str]] = []
    for part_rows, part_failures in gathered:
        all_rows.update(part_rows)
        all_failures.extend(part_failures)
    write_prediction_csv(output, all_rows, items)
    failures_csv = output.with_name(output.stem + "_failures.csv")
    write_failures_csv(failures_csv, all_failures)
    logger.info("wrote %s (%d volumes); %d failed (%s)", output, len(all_rows), len(all_failures), failures_csv)
    if all_failures:
        logger.error("%d volume(s) could not be read, listed in %s", len(all_failures), failures_csv)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("fVLM zero-shot evaluation", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            status = evaluate(args)
    except (ZeroShotSetupError, ConfigError, PipelineError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        status = 2
    destroy()
    return status  # rank 0 carries the status; torchrun fails when any rank does


if __name__ == "__main__":
    sys.exit(main())
