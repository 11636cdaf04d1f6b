"""Zero-shot evaluation of one checkpoint on the processed validation volumes (spec §7).

    torchrun --nproc_per_node=4 eval.py [--config configs/ctrate.yaml] [--checkpoint CKPT]
    python eval.py --checkpoint output/fvlm_ctrate/checkpoint_19.pth --data-root data
    python calc_metrics.py --csv_file res/fvlm_ctrate_checkpoint_19.csv   # eval.py's default --csv_file

Writes ONE CSV (rank 0, atomically) in the release's format: ``file_name`` (the VolumeName,
e.g. ``valid_1_a_1.nii.gz``) + one column ``{anatomy}_{abnormality}_{negative}_{positive}``
per item of ``--items``, empty cell when the anatomy is absent, rows sorted by file name;
``<output stem>_failures.csv`` (``volume,reason``; header only when nothing failed) and
``<output stem>_inputs.json`` (what it was made from: checkpoint path, size and mtime, text encoder, data root,
split, items). The default output is ``res/<run directory>_<checkpoint stem>.csv``; an existing CSV made from
other inputs is replaced only with ``--overwrite`` (its calc_metrics outputs are then removed).
Volumes are sharded over ranks (``volumes[rank::world_size]``).

Relative paths (flags and the preset's defaults) are found from the current directory, else from
the repository root, as in train.py. Rank 0 locks the output CSV for the run (a second eval
writing the same CSV exits 2). The log says, per item, how many volumes got an empty cell.

Exactly the given checkpoint is evaluated (default: the latest ``checkpoint_*.pth`` of the
preset's output directory); no epoch is chosen on the validation set (spec §9).
Exit status: 0 = every volume scored, 1 = some volume could not be read (see the failures
CSV), 2 = the run could not start or the model gives NaN/inf (message names the flag to set; nothing written).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import CHECKPOINT_FLAG_KEYS, checkpoint_args_parser, preset_defaults, run_main

logger = logging.getLogger("eval")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM zero-shot evaluation", parents=[checkpoint_args_parser()], add_help=False)
    p.add_argument("--csv_file", type=Path, help="prediction CSV, calc_metrics.py's input (default: res/<name>.csv)")
    p.add_argument("--name", help="name of the default output (default: <run directory>_<checkpoint stem>, "
                   "e.g. fvlm_ctrate_checkpoint_19)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --csv_file made from other inputs (checkpoint, data, items; recorded beside it)")
    return p


def log_empty_cells(rows: dict[str, dict[str, float]], items) -> None:
    """One line: per item, the volumes whose cell is empty (its anatomy absent from the mask; scored as 0)."""
    empty = {item.column: sum(item.column not in row for row in rows.values()) for item in items}
    if any(empty.values()):
        logger.warning("empty cells (anatomy absent from the mask; calc_metrics scores them 0), per item: %s",
                       ", ".join(f"{column} {n}" for column, n in empty.items() if n))


def evaluate(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    """Score every volume; ``held`` keeps the output's lock until the caller's block ends."""
    from tqdm import tqdm

    from data.io import VolumeReadError, scale_hu, write_case_csv, write_json
    from utils.distributed import gather_to_main, init_distributed, is_main_process, main_process_lock, setup_logging
    from utils.metrics import metrics_paths
    from zeroshot import (ZeroShotScorer, check_replaceable, inputs_record_path, load_eval_model, prediction_inputs,
                          prompt_features, read_case, resolve_eval_inputs, volume_name, write_prediction_csv)

    rank, world_size, device = init_distributed()
    setup_logging()
    inputs = resolve_eval_inputs(args)
    cfg, pipe, roi, items, checkpoint, volumes = (inputs.preset, inputs.preset.pipeline, inputs.roi, inputs.items,
                                                  inputs.checkpoint, inputs.volumes)
    output = args.csv_file or Path("res") / f"{args.name or checkpoint.parent.name + '_' + checkpoint.stem}.csv"
    held.enter_context(main_process_lock(output.with_name(f".{output.name}.lock"), f"prediction CSV {output}"))
    record = prediction_inputs(inputs, args.split)
    replacing = check_replaceable(output, record, args.overwrite)

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
        rows[name] = scorer(image, mask, name=name)

    gathered = gather_to_main((rows, failures))
    if not is_main_process():
        return 0
    all_rows: dict[str, dict[str, float]] = {}
    all_failures: list[tuple[str, str]] = []
    for part_rows, part_failures in gathered:
        all_rows.update(part_rows)
        all_failures.extend(part_failures)
    write_prediction_csv(output, all_rows, items)
    write_json(inputs_record_path(output), record)
    if replacing:  # the scores of the CSV just replaced
        for stale in (p for p in metrics_paths(output).values() if p.exists()):
            stale.unlink()
            logger.info("removed %s (metrics of the replaced %s)", stale, output.name)
    failures_csv = output.with_name(output.stem + "_failures.csv")
    write_case_csv(failures_csv, all_failures)
    logger.info("wrote %s (%d volumes); %d failed (%s)", output, len(all_rows), len(all_failures), failures_csv)
    log_empty_cells(all_rows, items)
    if all_failures:
        logger.error("%d volume(s) could not be read, listed in %s", len(all_failures), failures_csv)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("fVLM zero-shot evaluation", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0], epilog=preset_defaults(CHECKPOINT_FLAG_KEYS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    import torch

    from utils.distributed import destroy

    with torch.no_grad(), contextlib.ExitStack() as held:
        status = run_main("eval", lambda: evaluate(args, held))
    destroy()
    return status  # rank 0 carries the status; torchrun fails when any rank does


if __name__ == "__main__":
    sys.exit(main())
