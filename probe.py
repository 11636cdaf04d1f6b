"""Linear probes of frozen features against a labels CSV, scored like calc_metrics.py (rules in utils/probe.py).

    python embed.py --config configs/demo.yaml --checkpoint demo/output/checkpoint_17.pth --split valid
    python probe.py --embeddings res/embed_checkpoint_17_valid.npz --labels demo/ctrate/multi_abnormality_labels/valid_predicted_labels.csv
    python probe.py --embeddings E.npz --labels LABELS.csv --labels-map configs/labels/radchestct.yaml --train-list train.txt

One probe per zero-shot item of ``--items`` whose abnormality has a label: on the features of the
item's anatomy (``--anatomies item``, default) or of every anatomy (``all``), ``--features``
projected (the joint space) or pooled (before the projection). ``--folds K`` (default 5)
cross-validation grouped by patient, or ``--train-list`` (VolumeNames to fit on; the rest are
scored). Prints and writes ``--output`` (default ``<embeddings stem>_probe_<features>.csv``) and a
``.md`` twin in calc_metrics.py's table format.
Exit status: 0 on success, 2 on unusable input.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import FEATURE_KINDS, run_main

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("probe")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM linear probe", add_help=False)
    p.add_argument("--embeddings", type=Path, required=True, help="features written by embed.py")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV (CT-RATE's, or a dataset's with --labels-map)")
    p.add_argument("--labels-map", type=Path, help="YAML mapping the dataset's label columns (configs/labels/)")
    p.add_argument("--items", type=Path, default=Path("configs/zeroshot_items.yaml"),
                   help="items giving each abnormality its anatomy (default configs/zeroshot_items.yaml)")
    p.add_argument("--features", choices=FEATURE_KINDS, default="projected",
                   help="joint-space (projected) or pre-projection (pooled) features (default: projected)")
    p.add_argument("--anatomies", choices=("item", "all"), default="item",
                   help="features of the item's anatomy only (default) or of all anatomies")
    p.add_argument("--folds", type=int, default=5, help="k-fold cross-validation grouped by patient (default 5)")
    p.add_argument("--train-list", type=Path, help="VolumeNames to fit on (one per line); the others are scored")
    p.add_argument("--C", dest="c", type=float, default=1.0, help="inverse L2 strength (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="fold shuffling and solver seed (default 0)")
    p.add_argument("--output", type=Path, help="report CSV (default: <embeddings stem>_probe_<features>.csv)")
    return p


def labels_for(args: argparse.Namespace, names: list[str]) -> pd.DataFrame:
    from data.labels_map import load_labels_map, read_dataset_labels
    from utils.metrics import LABEL_KEY, MetricsInputError, read_labels

    if args.labels_map is not None:
        return read_dataset_labels(args.labels, load_labels_map(args.labels_map), names)
    labels = read_labels(args.labels).set_index(LABEL_KEY)
    missing = [n for n in names if n not in labels.index]
    if missing:
        raise MetricsInputError(f"{len(missing)} embedded volume(s) have no row in {args.labels}: {missing[:5]}")
    return labels.loc[names].reset_index()


def run(args: argparse.Namespace) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    from data.common import patient_id_of
    from data.io import write_table
    from utils.embeddings import ImageEmbeddings, read_name_list
    from utils.metrics import MetricsInputError, ScoringTable, compute_metrics_logged, format_report
    from utils.probe import cross_validated_probs, design_matrix, fit_predict
    from zeroshot import ZeroShotSetupError, load_items

    emb = ImageEmbeddings.load(args.embeddings)
    _, items = load_items(args.items)
    labels = labels_for(args, emb.names)
    feats = emb.projected if args.features == "projected" else emb.pooled
    columns, probs, truth = [], [], []
    train = None
    if args.train_list is not None:
        listed = read_name_list(args.train_list, "--train-list")
        train = np.array([n in listed for n in emb.names])
        if train.all() or not train.any():
            raise MetricsInputError(f"{args.train_list}: must list some but not all of the {len(emb.names)} volumes")
    for item in items:
        if item.abnormality not in labels.columns:
            logger.warning("%s: no label column; not probed", item.abnormality)
            continue
        if item.anatomy not in emb.anatomies:
            raise ZeroShotSetupError(f"item anatomy {item.anatomy} is not in {args.embeddings}'s {emb.anatomies}")
        anat = range(len(emb.anatomies)) if args.anatomies == "all" else [emb.anatomies.index(item.anatomy)]
        x = design_matrix(feats, emb.present, anat)
        y = pd.to_numeric(labels[item.abnormality], errors="coerce").to_numpy()
        if not np.isin(y, (0, 1)).all():
            raise MetricsInputError(f"{args.labels}: {item.abnormality} labels must be 0 or 1 (found others or empty)")
        y = y.astype(np.int64)
        if train is None:
            p = cross_validated_probs(x, y, [patient_id_of(n) for n in emb.names], folds=args.folds, c=args.c,
                                      seed=args.seed, name=item.abnormality)
        else:
            p = np.full(len(y), np.nan)
            p[~train] = fit_predict(x[train], y[train], x[~train], c=args.c, seed=args.seed)
        columns.append(item.abnormality)
        probs.append(p)
        truth.append(y)
    if not columns:
        raise MetricsInputError(f"no item of {args.items} has a label column in {args.labels}")
    rows = np.ones(len(emb.names), bool) if train is None else ~train
    table = ScoringTable([n for n, r in zip(emb.names, rows) if r], columns, columns,
                         np.stack(probs, axis=1)[rows], np.stack(truth, axis=1)[rows])
    report = compute_metrics_logged(table)
    output = args.output or args.embeddings.with_name(f"{args.embeddings.stem}_probe_{args.features}.csv")
    how = f"{args.folds}-fold CV by patient" if train is None else f"fit on {int(train.sum())} listed volumes"
    title = (f"Linear probe of `{args.embeddings.name}` ({args.features} features, {args.anatomies} anatomies, "
             f"{how}, C={args.c}, {len(table.file_names)} scored volumes, labels `{args.labels}`)")
    md = write_table(output, report.to_csv(index=False), title + "\n\n" + format_report(report, markdown=True))
    print(format_report(report), end="")
    logger.info("wrote %s and %s", output, md)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.folds < 2 or args.c <= 0:
        parser.error("--folds must be >= 2 and --C > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main("probe", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
