"""Deterministic synthetic mini CT-RATE (spec §1 layout) for tests, benchmarks and the demo.

`python -m data.synthetic --data-root DIR [--n-train N --n-valid N --seed S --workers W --realistic
--ctrate-version 1|2]`, or `--write-demo-bert [DIR]` to (re)write the demo BERT vocabulary and config.
"""
from __future__ import annotations

import argparse
import logging

from data.synthetic.vocab import DEMO_BERT_DIR, write_demo_bert
from data.synthetic.writer import generate_dataset


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", dest="data_root", help="data root written (required unless --write-demo-bert)")
    ap.add_argument("--n-train", type=int, default=24, help="training scans")
    ap.add_argument("--n-valid", type=int, default=12, help="validation scans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--realistic", action="store_true", help="512x512x~240 at ~0.7x0.7x1.5 mm (benchmarks)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ctrate-version", type=int, choices=(1, 2), default=1,
                    help="1: raw volumes under {split}/ (original upload); 2: HU with true geometry under "
                         "{split}_fixed/ (today's download)")
    ap.add_argument("--write-demo-bert", metavar="DIR", nargs="?", const=str(DEMO_BERT_DIR),
                    help=f"(re)write the demo BERT vocab/config (default {DEMO_BERT_DIR}) and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = get_args_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.write_demo_bert:
        write_demo_bert(args.write_demo_bert)
        return 0
    if not args.data_root:
        ap.error("--data-root is required")
    if min(args.n_train, args.n_valid) < 1 or args.workers < 1:
        ap.error("--n-train, --n-valid and --workers must be >= 1")
    generate_dataset(args.data_root, n_train=args.n_train, n_valid=args.n_valid, seed=args.seed,
                     realistic=args.realistic, workers=args.workers, ctrate_version=args.ctrate_version)
    return 0
