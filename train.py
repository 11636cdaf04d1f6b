"""fVLM pre-training (spec §3-6).

    torchrun --nproc_per_node=4 train.py                      # release settings, configs/ctrate.yaml
    python train.py --config configs/demo.yaml                # tiny demo on CPU
    python train.py --resume optim.lr=5e-5 data.workers=4     # key=value overrides any preset value

Paths default to the preset's (``data/``, ``mae_pretrain_vit_base.pth`` and
``BiomedVLP-CXR-BERT-specialized/`` relative to the current directory).
Every input (processed image/mask folders, both report JSON files, the MAE
weights, the text-encoder directory) is checked before anything is written, and
all problems are reported in one message. Rank 0 holds a lock on the output
directory for the whole run: a second run on it exits 2 while the first (or any
of its workers) is alive. A run that fails to start leaves the output directory
as it was. A new run refuses an output directory holding a checkpoint or other files (one
left with only the records of a run that stopped before its first checkpoint is started
over); ``--resume`` continues from its latest ``checkpoint_{epoch}.pth`` (model, optimiser,
epoch; the LR is a pure function of (epoch, step) and every RNG is re-seeded from
(seed, rank, epoch) at the start of each epoch, so the resumed epochs are the
ones an uninterrupted run would have done). Rank 0 takes the resume decision for every
rank; it refuses another data root or global batch than the checkpoint's unless
``--resume-changed``, and a finished run has nothing to do. ``config.yaml`` is written
once, at the start; each checkpoint records its own config and number of processes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from data.dataset import CTRateTrainDataset, SampleReadError, collate
from data.io import InUseError, atomic_output, check_writable, image_to_mask_path, list_volumes, one_line
from engine import ChunkedTrainStep, TrainStep, train_one_epoch
from models.builder import build_model, text_weights_from_directory
from models.loss import AnatomyContrastiveLoss
from models.text_encoder import missing_parts
from utils.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_model_state,
                              save_checkpoint)
from utils.cli import UsageError, preset_defaults, run_main
from utils.config import REPO_ROOT, resolve_path, save_config
from utils.distributed import (barrier, broadcast_from_main, destroy, first_error_on_any_rank, get_rank,
                               init_distributed, is_main_process, main_process_lock, setup_logging)
from utils.preset import Preset, given_flags, load_preset

logger = logging.getLogger("train")
RUN_LOCK = ".train.lock"  # in the output directory; not a file of the run
RUN_RECORDS = ("config.yaml", "log_steps.jsonl", "log.txt")  # what a run writes before its first checkpoint
REPORT_FILES = ("desc_info.json", "conc_info.json")
# command-line flag -> config key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"data_root": "paths.data_root", "mae_weights": "paths.mae_weights",
             "text_encoder": "paths.text_encoder", "output_dir": "paths.output_dir",
             "amp": "optim.amp", "grad_checkpointing": "model.grad_checkpointing",
             "accum_steps": "optim.accum_steps", "chunk_size": "optim.chunk_size", "epochs": "optim.epochs",
             "batch_size": "optim.batch_size", "workers": "data.workers", "max_steps": "optim.max_steps"}


class SetupError(UsageError, RuntimeError):
    """A path or setting needed to start training is missing; the message names the flag."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM pre-training", add_help=False)
    p.add_argument("--config", default="configs/ctrate.yaml", help="YAML preset")
    p.add_argument("--data-root", dest="data_root", help="processed cache + desc/conc_info.json")
    p.add_argument("--mae-weights", dest="mae_weights", help="MAE ViT-B weights, or 'none'")
    p.add_argument("--text-encoder", dest="text_encoder", help="local CXR-BERT (or BERT) directory")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--resume-changed", dest="resume_changed", action="store_true",
                   help="with --resume: continue although the data root or the global batch (batch x accum x "
                        "processes) differs from the checkpoint's")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, metavar="N",
                   help="keep only the N newest checkpoints (default: all)")
    p.add_argument("--amp", choices=["none", "bf16"])
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True)
    p.add_argument("--accum-steps", dest="accum_steps", type=int,
                   help="micro-batches per step, each with its own contrastive loss (another objective than one batch)")
    p.add_argument("--chunk-size", dest="chunk_size", type=int,
                   help="encode each batch in chunks of this many scans: the same step, less memory, one more forward")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help="stop after N optimiser steps in all and save that epoch's checkpoint (smoke test)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=5e-5")
    return p


def resolve_config(args: argparse.Namespace) -> Preset:
    flags = given_flags(args, FLAG_KEYS)
    if args.mae_weights is not None and args.mae_weights.lower() == "none":  # absent flag: the preset's path
        flags["paths.mae_weights"] = None
    return load_preset(args.config, args.overrides, flags=flags)


def check_inputs(cfg: Preset) -> None:
    """Resolve the input paths in place (current dir, else repo root) and check every input before anything is
    written; one ``SetupError`` lists every problem, each with the flag to set."""
    paths, split = cfg.paths, cfg.data.split
    problems = []
    root = resolve_path(paths.data_root)
    images = list_volumes(root, split) if root.is_dir() else []
    if not images:
        code = " (the code package data/, not a data root)" if root.resolve() == (REPO_ROOT / "data").resolve() else ""
        problems.append(f"no processed volumes in {root / f'processed_{split}_images'}{code}: run the data "
                        "pipeline or set --data-root")
    unpaired = [p.name for p in images if not image_to_mask_path(p).is_file()]
    if unpaired:
        problems.append(f"{len(unpaired)} processed image(s) without a mask in {root / f'processed_{split}_masks'}, "
                        f"e.g. {unpaired[0]}: rerun data.preprocess or set --data-root")
    for name in REPORT_FILES:
        problems += _report_problems(root / name, cfg)
    if paths.mae_weights is not None:
        mae = resolve_path(paths.mae_weights)
        if not mae.is_file():
            problems.append(f"MAE weights {mae} not found: set --mae-weights (or --mae-weights none)")
        paths.mae_weights = str(mae)
    text_dir = resolve_path(paths.text_encoder)
    missing = missing_parts(text_dir, weights=text_weights_from_directory(cfg.model, from_checkpoint=False))
    if missing:
        problems.append(f"text encoder {text_dir} lacks {', '.join(missing)}: set --text-encoder")
    if problems:
        raise SetupError("cannot start: " + "; ".join(problems))
    # absolute: the run's record of its data, compared on --resume from wherever that is started
    paths.data_root, paths.text_encoder = str(root.resolve()), str(text_dir)


def _report_problems(path: Path, cfg: Preset) -> list[str]:
    """What keeps ``path`` (``{scan: {anatomy: text}}``, spec §1) from giving every anatomy its text."""
    if not path.is_file():
        return [f"{path} not found (anatomy-wise report texts, spec §1): set --data-root"]
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{path} is not valid JSON ({e})"]
    if not isinstance(info, dict):
        return [f"{path} holds a {type(info).__name__}, not {{scan: {{anatomy: text}}}}"]
    problems = []
    bad_scans = [s for s, entries in info.items() if not isinstance(entries, (dict, type(None)))]
    entries = [(s, a, t) for s, e in info.items() if isinstance(e, dict) for a, t in e.items()]
    bad_texts = [(s, a, t) for s, a, t in entries if not isinstance(t, (str, type(None)))]
    if bad_scans:
        problems.append(f"{path}: {len(bad_scans)} scan entries are not {{anatomy: text}} mappings, e.g. "
                        f"{bad_scans[0]!r}: {type(info[bad_scans[0]]).__name__}")
    if bad_texts:
        s, a, t = bad_texts[0]
        problems.append(f"{path}: {len(bad_texts)} texts are not strings, e.g. {s!r}/{a!r}: {type(t).__name__}")
    names = cfg.pipeline.anatomy_names
    unknown = sorted({a for _, a, _ in entries} - set(names))
    if unknown:
        problems.append(f"{path}: anatomy keys {', '.join(map(repr, unknown))} match no anatomy of "
                        f"{cfg.pipeline_config} ({', '.join(names)}; case-sensitive): rename them")
    return problems


def blocks_new_run(out_dir: Path) -> bool:
    """``out_dir`` holds a checkpoint or files of its own. A run that stopped before its first checkpoint
    left only its records: a new run starts it over, so the same command works again."""
    return out_dir.is_dir() and any(p.name not in (RUN_LOCK, *RUN_RECORDS) and not p.name.startswith(".tmp-")
                                    for p in out_dir.iterdir())


def check_output_dir(out_dir: Path) -> None:
    """``SetupError`` when ``out_dir`` is a file, ``NotWritableError`` when it cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SetupError(f"output directory {out_dir} is a file: set --output-dir to a directory")
    check_writable(out_dir)


@contextlib.contextmanager
def hold_output_dir(out_dir: Path):
    """Rank 0 locks ``out_dir`` for the block (another run on it: ``SetupError`` on every rank). A directory
    this call created is removed again when the block fails before the run wrote anything into it."""
    barrier()  # every rank checked the directory before rank 0 writes into it
    created = not out_dir.exists()
    try:
        with main_process_lock(out_dir / RUN_LOCK, f"output directory {out_dir}"):
            yield
    except InUseError as e:
        raise SetupError(str(e)) from None
    except BaseException:
        if is_main_process() and created and not any(p.name != RUN_LOCK for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def truncate_logs(out_dir: Path, start_epoch: int) -> None:
    """Drop the log lines of epochs >= ``start_epoch``: a resumed run writes them again. An unreadable last
    line is the one a kill cut short (its epoch is redone); an unreadable line before it is an error."""
    for name in ("log_steps.jsonl", "log.txt"):
        path = out_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for i, line in enumerate(lines):
            try:
                epoch = json.loads(line)["epoch"] if line.strip() else None
            except (ValueError, TypeError, KeyError):
                if i == len(lines) - 1:
                    logger.warning("%s: dropping its cut-short last line (from a killed run)", path)
                    continue
                raise SetupError(f"{path} line {i + 1} is not a JSON record with an epoch: repair or delete "
                                 "the line, then rerun") from None
            if epoch is not None and epoch < start_epoch:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            with atomic_output(path) as tmp:
                tmp.write_text("".join(kept))


def find_resume_point(out_dir: Path, cfg: Preset, world_size: int, allow_changed: bool) -> tuple[Path | None, int]:
    """(latest checkpoint, the epoch to start at) or (None, 0); a checkpoint that cannot be resumed, or whose
    data root or global batch differs from this run's (unless ``allow_changed``), is a ``UsageError``."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None, 0
    ckpt = load_checkpoint(path, mmap=True)  # mapped: only its records are read here; the tensors by _train_in
    if not isinstance(ckpt.get("optimizer"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} has no optimiser state or config (a weights-only copy?): --resume needs the "
                              f"checkpoint train.py wrote; move {path.name} out of {out_dir} or set --output-dir")
    start_epoch = int(ckpt["epoch"]) + 1
    if start_epoch >= cfg.optim.epochs:
        return path, start_epoch  # nothing to do: nothing to compare
    changes = changed_setup(ckpt, cfg, world_size)
    if changes and not allow_changed:
        raise SetupError(f"--resume: {'; '.join(changes)}: the resumed epochs would differ from an uninterrupted "
                         "run. Restore the setting, or pass --resume-changed to continue anyway")
    for change in changes:
        logger.warning("--resume-changed: %s (config.yaml keeps the run's original settings; each checkpoint "
                       "records its own)", change)
    return path, start_epoch


def changed_setup(ckpt: dict, cfg: Preset, world_size: int) -> list[str]:
    """How this run's data and global batch differ from those ``ckpt`` was trained with."""
    saved = ckpt["config"]
    changes = []
    saved_root = saved.get("paths", {}).get("data_root")
    if saved_root is None or Path(saved_root).resolve() != Path(cfg.paths.data_root).resolve():
        changes.append(f"--data-root is {cfg.paths.data_root}, the checkpoint was trained on {saved_root}")
    optim = saved.get("optim", {})
    saved_batch = optim.get("batch_size", 0) * optim.get("accum_steps", 0) * ckpt.get("world_size", world_size)
    batch = cfg.optim.batch_size * cfg.optim.accum_steps * world_size
    if saved_batch != batch:
        changes.append(f"the global batch is {batch} ({cfg.optim.batch_size} per process x {cfg.optim.accum_steps} "
                       f"accum x {world_size} processes), the checkpoint's {saved_batch} "
                       f"({optim.get('batch_size')} x {optim.get('accum_steps')} x {ckpt.get('world_size', '?')})")
    return changes


def prune_checkpoints(out_dir: Path, keep: int, protected: set[Path | None]) -> None:
    """Delete all but the ``keep`` newest checkpoints, never one in ``protected`` (the one resumed from)."""
    for path in list_checkpoints(out_dir)[:-keep]:
        if path not in protected:
            path.unlink()
            logger.info("--keep-checkpoints %d: deleted %s", keep, path.name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train(args: argparse.Namespace) -> None:
    """Run (or resume) a training run."""
    rank, world_size, device = init_distributed()
    setup_logging()
    cfg = resolve_config(args)
    if args.resume_changed and not args.resume:
        raise SetupError("--resume-changed goes with --resume")
    if args.keep_checkpoints is not None and args.keep_checkpoints < 1:
        raise SetupError(f"--keep-checkpoints {args.keep_checkpoints}: keep at least 1 (leave it out to keep all)")
    check_inputs(cfg)
    out_dir = Path(cfg.paths.output_dir)
    check_output_dir(out_dir)
    if not args.resume and blocks_new_run(out_dir):
        raise SetupError(f"output directory {out_dir} is not empty: pass --resume or set --output-dir")
    with hold_output_dir(out_dir):
        _train_in(out_dir, args, cfg, rank, world_size, device)


def _resume_point(out_dir: Path, args: argparse.Namespace, cfg: Preset, world_size: int) -> tuple[Path | None, int]:
    """Rank 0 decides where to start and every rank takes its decision (nodes that see different output
    directories must not start at different epochs); any rank's problem is every rank's error."""
    decision, error = (None, 0), None
    if is_main_process() and args.resume:
        try:
            decision = find_resume_point(out_dir, cfg, world_size, args.resume_changed)
        except UsageError as e:
            error = e
    decision, message = broadcast_from_main((decision, str(error) if error else None))
    if error is not None:
        raise error
    if message is not None:
        raise SetupError(f"{message} (rank 0's decision)")
    path = Path(decision[0]) if decision[0] else None
    missing = path is not None and not path.is_file()
    message = first_error_on_any_rank(f"rank 0 resumes from {path}, which rank {get_rank()} does not see: every "
                                      "node must see the same --output-dir (a shared file system)" if missing else None)
    if message is not None:
        raise SetupError(message)
    return path, decision[1]


def _train_in(out_dir: Path, args: argparse.Namespace, cfg: Preset, rank: int, world_size: int,
              device: torch.device) -> None:
    optim_cfg = cfg.optim
    resume_from, start_epoch = _resume_point(out_dir, args, cfg, world_size)
    if start_epoch >= optim_cfg.epochs:
        logger.info("--resume: %s is epoch %d of %d: nothing to do", resume_from, start_epoch - 1, optim_cfg.epochs)
        return
    seed_everything(cfg.seed + rank)

    pipe = cfg.pipeline
    dataset = CTRateTrainDataset(
        cfg.paths.data_root, anatomy_names=pipe.anatomy_names, crop_size=cfg.data.crop_size,
        hu_window=pipe.hu_window, flip_prob=cfg.data.flip_prob, split=cfg.data.split, seed=cfg.seed)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=optim_cfg.batch_size, sampler=sampler, num_workers=cfg.data.workers,
        collate_fn=collate, drop_last=True, pin_memory=device.type == "cuda")
    if len(loader) // optim_cfg.accum_steps == 0:
        raise SetupError(f"{len(dataset)} scans give no full step of batch {optim_cfg.batch_size} x "
                         f"{optim_cfg.accum_steps} accumulation x {world_size} processes: lower --batch-size")

    model, tokenizer = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=pipe.n_anatomies,
                                   text_encoder_dir=cfg.paths.text_encoder, mae_weights=cfg.paths.mae_weights)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optim_cfg.lr,
                                  betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        load_model_state(model, ckpt["model"], strict=True, source=resume_from)
        optimizer.load_state_dict(ckpt["optimizer"])
        logger.info("resumed from %s: starting epoch %d", resume_from, start_epoch)
    elif args.resume:
        logger.info("--resume: no checkpoint in %s, starting a new run", out_dir)

    step_class = TrainStep if optim_cfg.chunk_size is None else ChunkedTrainStep
    step_module: torch.nn.Module = step_class(model, AnatomyContrastiveLoss(rank, world_size, pipe.anatomy_names),
                                              tokenizer, cfg.model.text_max_length)
    if world_size > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # anatomies without usable pairs leave their projection unused
    eff_batch = optim_cfg.batch_size * optim_cfg.accum_steps * world_size
    logger.info("%d scans, %d steps/epoch, effective batch %d = %d per process x %d accum x %d processes, "
                "base lr %.2e (no batch scaling, as released)", len(dataset), len(loader) // optim_cfg.accum_steps,
                eff_batch, optim_cfg.batch_size, optim_cfg.accum_steps, world_size, optim_cfg.lr)

    if is_main_process():  # only now: a run that fails to start leaves its output directory as it was
        truncate_logs(out_dir, start_epoch)
        if resume_from is None:  # a resumed run keeps the record of what its first epochs were trained with
            save_config(cfg.to_dict(), out_dir)
    last = str(resume_from) if resume_from else None
    steps_per_epoch, max_steps = len(loader) // optim_cfg.accum_steps, optim_cfg.max_steps
    end_epoch = optim_cfg.epochs if max_steps is None else min(optim_cfg.epochs, -(-max_steps // steps_per_epoch))
    if end_epoch < optim_cfg.epochs:
        logger.info("--max-steps %d: stopping in epoch %d", max_steps, end_epoch - 1)
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        seed_everything(int(np.random.SeedSequence([cfg.seed, rank, epoch]).generate_state(1)[0]))
        try:
            stats = train_one_epoch(step_module, model, loader, optimizer, epoch=epoch, cfg=cfg,
                                    world_size=world_size, device=device, log_path=out_dir / "log_steps.jsonl",
                                    last_checkpoint=last,
                                    max_steps=None if max_steps is None else max_steps - epoch * steps_per_epoch)
        except SampleReadError as e:  # from a DataLoader worker its message ends with the worker's traceback
            reason = one_line(str(e).rsplit("SampleReadError: ", 1)[-1] if "Original Traceback" in str(e) else e)
            raise SetupError(f"{reason}; the run stopped in epoch {epoch} "
                             f"(last checkpoint: {last or 'none'}): fix or re-preprocess the volume, then run "
                             "the same command (with --resume once a checkpoint exists)") from e
        if is_main_process():
            # the log line first: a kill before the checkpoint leaves a line for an epoch without one, which
            # the resume drops and writes again (the other order would lose the line for good)
            with open(out_dir / "log.txt", "a") as f:
                f.write(json.dumps({"epoch": epoch, **stats}) + "\n")
            last = str(out_dir / f"checkpoint_{epoch}.pth")
            save_checkpoint(last, model=model, optimizer=optimizer, epoch=epoch, config=cfg.to_dict(),
                            extra={"world_size": world_size})
            if args.keep_checkpoints is not None:
                prune_checkpoints(out_dir, args.keep_checkpoints, protected={resume_from, Path(last)})
            logger.info("epoch %d done: %s", epoch, stats)
        barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("fVLM pre-training", parents=[get_args_parser()],
                                     epilog=preset_defaults(FLAG_KEYS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    try:
        return run_main("train", lambda: train(args))
    except FloatingPointError as e:
        logging.getLogger("train").error("%s", e)
        return 1
    finally:
        destroy()


if __name__ == "__main__":
    sys.exit(main())
