"""fVLM pre-training (spec §3-6).

    torchrun --nproc_per_node=4 train.py                      # release settings, configs/ctrate.yaml
    python train.py --config configs/demo.yaml                # tiny demo on CPU
    python train.py --resume optim.lr=5e-5 data.workers=4     # key=value overrides any preset value

Paths default to the preset's (``data/``, ``mae_pretrain_vit_base.pth`` and
``BiomedVLP-CXR-BERT-specialized/`` relative to the current directory).
A new run refuses a non-empty output directory; ``--resume`` continues from
its latest ``checkpoint_{epoch}.pth`` (model, optimiser, epoch; the LR is a
pure function of (epoch, step) and every RNG is re-seeded from
(seed, rank, epoch) at the start of each epoch, so the resumed epochs are the
ones an uninterrupted run would have done).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from data.common import PipelineError
from data.dataset import CTRateTrainDataset, collate
from engine import TrainStep, train_one_epoch
from models.builder import build_model
from models.loss import AnatomyContrastiveLoss
from models.text_encoder import TextEncoderError
from utils.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from utils.config import ConfigError, resolve_path, save_config
from utils.distributed import barrier, destroy, init_distributed, is_main_process, setup_logging
from utils.preset import Preset, given_flags, load_preset

logger = logging.getLogger("train")
# command-line flag -> config key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"data_root": "paths.data_root", "mae_weights": "paths.mae_weights",
             "text_encoder": "paths.text_encoder", "output_dir": "paths.output_dir",
             "amp": "optim.amp", "grad_checkpointing": "model.grad_checkpointing",
             "accum_steps": "optim.accum_steps", "epochs": "optim.epochs",
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
    p.add_argument("--accum-steps", dest="accum_steps", type=int)
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


def check_paths(cfg: Preset) -> None:
    """Resolve the three input paths in place (current dir, else repo root); a missing one names its flag."""
    paths = cfg.paths
    for key, flag, is_dir in (("data_root", "--data-root", True), ("mae_weights", "--mae-weights", False),
                              ("text_encoder", "--text-encoder", True)):
        value = getattr(paths, key)
        if value is None:
            continue
        p = resolve_path(value)
        if not (p.is_dir() if is_dir else p.is_file()):
            hint = " (or --mae-weights none)" if key == "mae_weights" else ""
            raise SetupError(f"{key.replace('_', ' ')} {value} not found: set {flag}{hint}")
        setattr(paths, key, str(p))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) a training run; returns the last epoch's stats."""
    rank, world_size, device = init_distributed()
    setup_logging()
    cfg = resolve_config(args)
    check_paths(cfg)
    out_dir = Path(cfg.paths.output_dir)
    resume_from = latest_checkpoint(out_dir) if (args.resume and out_dir.is_dir()) else None
    if not args.resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise SetupError(f"output directory {out_dir} is not empty: pass --resume or set --output-dir")
    barrier()  # every rank checked the directory before rank 0 writes into it
    if is_main_process():
        save_config(cfg.to_dict(), out_dir)
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
    elif args.resume:
        logger.info("--resume: no checkpoint in %s, starting a new run", out_dir)

    step_module: torch.nn.Module = TrainStep(model, AnatomyContrastiveLoss(rank, world_size, pipe.anatomy_names),
                                             tokenizer, cfg.model.text_max_length)
    if world_size > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # anatomies without usable pairs leave their projection unused
    eff_batch = optim_cfg.batch_size * optim_cfg.accum_steps * world_size
    logger.info("%d scans, %d steps/epoch, effective batch %d = %d per process x %d accum x %d processes, "
                "base lr %.2e (no batch scaling, as released)", len(dataset), len(loader) // optim_cfg.accum_steps,
                eff_batch, optim_cfg.batch_size, optim_cfg.accum_steps, world_size, optim_cfg.lr)

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
