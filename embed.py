"""Frozen per-anatomy image features of a split, for probing and retrieval (one ``.npz`` per run).

    python embed.py --config configs/demo.yaml --checkpoint demo/output/checkpoint_17.pth --split valid
    python probe.py --embeddings res/embed_checkpoint_17_valid.npz --labels LABELS.csv

Writes ``--output`` (default ``res/embed_<checkpoint stem>_<split>.npz``): ``names`` (VolumeNames),
``anatomies``, ``projected`` (N, A, E: the joint-space features eval.py scores with),
``pooled`` (N, A, C: the same before the anatomy's projection), ``present`` (N, A) and
``checkpoint``; absent anatomies are NaN. Read it with ``numpy.load``. Resumable: a killed run
continues from its ``.partial-`` file (every ``--save-every`` volumes); a finished file is
reused unless ``--overwrite`` or its inputs changed (the checkpoint's or a volume's size or mtime, the data root,
the window): the log says "reused" or "wrote". ``--volumes LIST`` embeds only the VolumeNames of a text file.
Exit status: 0 = all embedded, 1 = some volume unreadable (``<stem>_failures.csv``), 2 = not started.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import CHECKPOINT_FLAG_KEYS, checkpoint_args_parser, preset_defaults, run_main

logger = logging.getLogger("embed")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM embeddings", parents=[checkpoint_args_parser()], add_help=False)
    p.add_argument("--output", type=Path, help="embeddings file (default: res/embed_<checkpoint>_<split>.npz)")
    p.add_argument("--volumes", type=Path, help="text file of VolumeNames to embed (default: the whole split)")
    p.add_argument("--save-every", type=int, default=50, help="volumes between resumable saves (default 50)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if --output exists")
    return p


def run(args: argparse.Namespace) -> int:
    from data.io import write_case_csv
    from utils.embeddings import compute_image_embeddings, partial_path, read_name_list, setup_features, volume_name
    from zeroshot import ZeroShotSetupError

    s = setup_features(args)
    volumes = s.volumes
    if args.volumes is not None:
        wanted = read_name_list(args.volumes, "--volumes")
        volumes = [v for v in volumes if volume_name(v) in wanted]
        missing = sorted(wanted - {volume_name(v) for v in volumes})
        if missing:
            raise ZeroShotSetupError(f"{len(missing)} volume(s) of {args.volumes} are not processed in "
                                     f"{s.data_root}: {', '.join(missing[:5])}")
    output = args.output or Path("res") / f"embed_{s.checkpoint.stem}_{args.split}.npz"
    if args.overwrite:
        output.unlink(missing_ok=True)
        partial_path(output).unlink(missing_ok=True)
    emb, failures, computed = compute_image_embeddings(s.extractor, volumes, output, source=s.source,
                                                       save_every=args.save_every, progress=args.pbar)
    failures_csv = output.with_name(output.stem + "_failures.csv")
    write_case_csv(failures_csv, failures)
    logger.info("%s %s: %d volumes x %d anatomies (%d computed now), projected %d, pooled %d; %d failed (%s)",
                "wrote" if computed else "reused", output, len(emb.names), len(emb.anatomies), computed,
                emb.projected.shape[-1], emb.pooled.shape[-1], len(failures), failures_csv)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n\n")[0],
                                     epilog=preset_defaults(CHECKPOINT_FLAG_KEYS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    if args.save_every < 1:
        parser.error("--save-every must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    with torch.no_grad():
        return run_main("embed", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
