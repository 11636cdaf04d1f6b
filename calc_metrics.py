"""Metrics of a zero-shot prediction CSV (spec §8, CT-CLIP protocol).

    python calc_metrics.py --csv_file res/checkpoint_19.csv [--labels PATH | --data-root data]
                           [--bootstrap 1000] [--seed 0]
    python calc_metrics.py --csv_file res/radchest.csv --labels LABELS.csv --labels-map configs/labels/radchestct.yaml

Reads a CSV written by eval.py or by the fVLM release (``file_name`` + one
column per item ``{anatomy}_{abnormality}_{negative}_{positive}``), prints the
per-abnormality table (AUC, ACC, specificity, sensitivity, weighted F1,
precision, and their mean) and writes next to the input ``<stem>_metrics.csv``,
``<stem>_metrics.md`` and ``<stem>_roc.png``. The rules are in utils/metrics.py.

Relative paths are found from the current directory, else from the repository root (so the
seed's commands work from the repository root and from ``data/``). Empty cells (scored 0, spec
§8) are counted per item in the log, and so are labelled volumes and abnormalities that the
CSV lacks.

Exit status: 0 on success, 2 on unusable input (one-line message on stderr), e.g. an infinite
probability or one outside [0, 1].
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import run_main

logger = logging.getLogger("calc_metrics")

LABELS_RELPATH = Path("multi_abnormality_labels") / "valid_predicted_labels.csv"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("calc_metrics", add_help=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--csv_file", "--csv-file", dest="csv_file", required=True, type=Path,
                   help="prediction CSV (file_name + item columns)")
    p.add_argument("--labels", type=Path, default=None,
                   help=f"labels CSV (default: <data-root>/{LABELS_RELPATH.as_posix()})")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="CT-RATE root (default: data)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="95%% CIs from N resamples of the volumes (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--labels-map", type=Path, default=None,
                   help="YAML mapping an external dataset's label columns to the items (configs/labels/)")
    return p


def run(csv_file: Path, labels_path: Path, *, bootstrap: int = 0, seed: int = 0, labels_map: Path | None = None):
    """Compute, print and save the report; returns it as a DataFrame."""
    from data.io import write_table
    from data.labels_map import map_external_labels
    from utils.metrics import (add_ci, align, bootstrap_ci, compute_metrics_logged, format_report, metrics_paths,
                               plot_roc, read_labels, read_predictions)

    predictions = read_predictions(csv_file)
    if labels_map is None:
        labels = read_labels(labels_path)
    else:
        predictions, labels, notes = map_external_labels(predictions, labels_path, labels_map)
        for note in notes:
            logger.warning("%s", note)
    table = align(predictions, labels)
    report = compute_metrics_logged(table)
    if bootstrap:
        low, high = bootstrap_ci(table, bootstrap, seed=seed)
        report = add_ci(report, low, high)
    paths = metrics_paths(csv_file)
    title = f"Zero-shot metrics of `{csv_file.name}` ({len(table.file_names)} volumes, labels `{labels_path}`"
    title += f", 95% bootstrap CIs from {bootstrap} resamples, seed {seed})" if bootstrap else ")"
    write_table(paths["csv"], report.to_csv(index=False), title + "\n\n" + format_report(report, markdown=True))
    plot_roc(table, report, paths["png"])
    print(format_report(report), end="")
    logger.info("wrote %s, %s, %s", paths["csv"], paths["md"], paths["png"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from utils.config import resolve_path

    # relative paths: from the current directory, else from the repository root (as train.py and eval.py)
    labels = resolve_path(args.labels if args.labels is not None else resolve_path(args.data_root) / LABELS_RELPATH)
    return run_main("calc_metrics", lambda: run(resolve_path(args.csv_file), labels, bootstrap=args.bootstrap,
                                                seed=args.seed, labels_map=args.labels_map))


if __name__ == "__main__":
    sys.exit(main())
