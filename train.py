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
as it was. A new run refuses a non-empty output directory; ``--resume`` continues from
its latest ``checkpoint_{epoch}.pth`` (model, optimiser, epoch; the LR is a
pure function of (epoch, step) and every RNG is re-seeded from
(seed, rank, epoch) at the start of each epoch, so the resumed epochs are the
ones an uninterrupted run would have done).
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

from data.common import PipelineError
from data.dataset import CTRateTrainDataset, collate
from data.io import InUseError, atomic_output, image_to_mask_path, list_volumes
from engine import ChunkedTrainStep, TrainStep, train_one_epoch
from models.builder import build_model, text_weights_from_directory
from models.loss import AnatomyContrastiveLoss
from models.text_encoder import TextEncoderError, missing_parts
from utils.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from utils.config import REPO_ROOT, ConfigError, resolve_path, save_config
from utils.distributed import barrier, destroy, init_distributed, is_main_process, main_process_lock, setup_logging
from utils.preset import Preset, given_flags, load_preset

logger = logging.getLogger("train")
RUN_LOCK = ".train.lock"  # in the output directory; not a file of the run
REPORT_FILES = ("desc_info.json", "conc_info.json")
# command-line flag -> config key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"data_root": "paths.data_root", "mae_weights": "paths.mae_weights",
             "text_encoder": "paths.text_encoder", "output_dir": "paths.output_dir",
             "amp": "optim.amp", "grad_checkpointing": "model.grad_checkpointing",
             "accum_steps": "optim.accum_steps", "chunk_size": "optim.chunk_size", "epochs": "optim.epochs",
             "batch_size": "optim.batch_size", "workers": "data.workers"}


class SetupError(RuntimeError):
    """A path or setting needed to start training is missing; the message names the flag."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM pre-training", add_help=False)
    p.add_argument("--config", default="configs/ctrate.yaml", help="YAML preset")
    p.add_argument("--data-root", dest="data_root", help="processed cache + desc/conc_info.json")
    p.add_argument("--mae-weights", dest="mae_weights", help="MAE ViT-B weights, or 'none'")
    p.add_argument("--text-encoder", dest="text_encoder", help="local CXR-BERT (or BERT) directory")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--amp", choices=["none", "bf16"])
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True)
    p.add_argument("--accum-steps", dest="accum_steps", type=int,
                   help="micro-batches per step, each with its own contrastive loss (another objective than one batch)")
    p.add_argument("--chunk-size", dest="chunk_size", type=int,
                   help="encode each batch in chunks of this many scans: the same step, less memory, one more forward")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=5e-5")
    return p


def resolve_config(args: argparse.Namespace) -> Preset:
    flags = given_flags(args, FLAG_KEYS)
    if str(args.mae_weights).lower() == "none":
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
        problems += _json_problems(root / name)
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
    paths.data_root, paths.text_encoder = str(root), str(text_dir)


def _json_problems(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path} not found (anatomy-wise report texts, spec §1): set --data-root"]
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return [f"{path} is not valid JSON ({e})"]
    return []


def has_run_files(out_dir: Path) -> bool:
    """Anything in ``out_dir`` besides the run lock."""
    return out_dir.is_dir() and any(p.name != RUN_LOCK for p in out_dir.iterdir())


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
        if is_main_process() and created and not has_run_files(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def truncate_logs(out_dir: Path, start_epoch: int) -> None:
    """Drop the log lines of epochs >= ``start_epoch``: a resumed run writes them again."""
    for name in ("log_steps.jsonl", "log.txt"):
        path = out_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < start_epoch]
        if kept != lines:
            with atomic_output(path) as tmp:
                tmp.write_text("".join(kept))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) a training run; returns the last epoch's stats."""
    rank, world_size, device = init_distributed()
    setup_logging()
    cfg = resolve_config(args)
    check_inputs(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if not args.resume and has_run_files(out_dir):
        raise SetupError(f"output directory {out_dir} is not empty: pass --resume or set --output-dir")
    with hold_output_dir(out_dir):
        return _train_in(out_dir, args, cfg, rank, world_size, device)


def _train_in(out_dir: Path, args: argparse.Namespace, cfg: Preset, rank: int, world_size: int,
              device: torch.device) -> dict[str, float]:
    resume_from = latest_checkpoint(out_dir) if args.resume else None
    seed_everything(cfg.seed + rank)

    pipe = cfg.pipeline
    dataset = CTRateTrainDataset(
        cfg.paths.data_root, anatomy_names=pipe.anatomy_names, crop_size=cfg.data.crop_size,
        hu_window=pipe.hu_window, flip_prob=cfg.data.flip_prob, split=cfg.data.split, seed=cfg.seed)
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    optim_cfg = cfg.optim
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
    start_epoch = 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        load_model_state(model, ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        logger.info("resumed from %s: starting epoch %d", resume_from, start_epoch)
        if is_main_process():
            truncate_logs(out_dir, start_epoch)
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

    if is_main_process():  # only now: a run that fails to start leaves no config behind
        save_config(cfg.to_dict(), out_dir)
    stats: dict[str, float] = {}
    last = str(resume_from) if resume_from else None
    for epoch in range(start_epoch, optim_cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        seed_everything(int(np.random.SeedSequence([cfg.seed, rank, epoch]).generate_state(1)[0]))
        stats = train_one_epoch(step_module, model, loader, optimizer, epoch=epoch, cfg=cfg, world_size=world_size,
                                device=device, log_path=out_dir / "log_steps.jsonl", last_checkpoint=last)
        if is_main_process():
            last = str(out_dir / f"checkpoint_{epoch}.pth")
            save_checkpoint(last, model=model, optimizer=optimizer, epoch=epoch,
                            config=cfg.to_dict())
            with open(out_dir / "log.txt", "a") as f:
                f.write(json.dumps({"epoch": epoch, **stats}) + "\n")
            logger.info("epoch %d done: %s", epoch, stats)
        barrier()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("fVLM pre-training", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        train(args)
    except (SetupError, ConfigError, FileNotFoundError, PipelineError, TextEncoderError, CheckpointError) as e:
        logging.getLogger("train").error("%s", e)
        return 2
    except FloatingPointError as e:
        logging.getLogger("train").error("%s", e)
        return 1
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
