"""Zero-shot classification metrics of the CT-CLIP protocol (spec §8).

For each item column of a prediction CSV (``file_name`` + one column per item,
named ``{anatomy}_{abnormality}_{negative}_{positive}``):

- abnormality = ``column.split("_")[1]``; its label for a row is the value of
  that column in the labels CSV row whose ``VolumeName`` equals ``file_name``;
- an empty probability counts as 0 (anatomy absent from the volume; how many
  per item is logged); a NaN written out (``nan``), an infinite one, one outside
  [0, 1] and a volume listed twice are input errors;
- labelled volumes the CSV lacks, and labelled abnormalities without an item
  column, are not scored (their counts are logged);
- AUC = ``sklearn.metrics.roc_auc_score``;
- threshold: 100 evenly spaced values ``np.linspace(0, 1, 100)``; prediction
  ``prob > threshold``; keep the threshold minimising
  ``sqrt((1 - TPR)**2 + FPR**2)``, ties -> the later (larger) threshold;
- at that threshold: accuracy, specificity (TN / (TN + FP)), sensitivity
  (TP / (TP + FN)), weighted F1 (``f1_score(average="weighted")``) and binary
  precision (``precision_score(zero_division=0)``).

The report has one row per item (named by its abnormality, or by the full
column name when two columns score the same abnormality) and a ``mean`` row,
the unweighted mean over items.

An abnormality whose labels are all of one class has no ROC curve: AUC and the
threshold metrics are undefined. Its row is all NaN and it is left out of the
mean, with a warning (:class:`SingleClassWarning`).

``bootstrap_ci`` gives percentile 95 % intervals by resampling volumes (rows)
with replacement; each resample recomputes everything above, threshold
selection included. Resamples where an item has a single class are skipped for
that item. For speed the resamples use :func:`fast_item_metrics`, the same
figures from the confusion counts and the rank-sum form of the AUC (tests check
it equals the sklearn path to 1e-12).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import f1_score, precision_score, roc_auc_score, roc_curve

from utils.cli import UsageError


logger = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "specificity", "sensitivity", "f1_weighted", "precision")
METRIC_TITLES = {
    "auc": "AUC",
    "accuracy": "ACC",
    "specificity": "Specificity",
    "sensitivity": "Sensitivity",
    "f1_weighted": "F1 (weighted)",
    "precision": "Precision",
}
THRESHOLDS = np.linspace(0.0, 1.0, 100)
FILE_COLUMN = "file_name"
LABEL_KEY = "VolumeName"


class MetricsInputError(UsageError, ValueError):
    """The prediction or labels CSV cannot be scored (message is one line)."""


class SingleClassWarning(UserWarning):
    """An abnormality's labels are all one class; its metrics are NaN."""


@dataclass(frozen=True)
class ScoringTable:
    """Aligned inputs: ``probs[:, j]`` and ``labels[:, j]`` belong to ``names[j]``."""

    file_names: list[str]
    columns: list[str]
    names: list[str]
    probs: np.ndarray  # (N, K) float64, NaN replaced by 0
    labels: np.ndarray  # (N, K) int64 in {0, 1}


def metrics_paths(csv_file: Path) -> dict[str, Path]:
    """What calc_metrics.py writes beside a prediction CSV: ``<stem>_metrics.csv``, ``_metrics.md``, ``_roc.png``."""
    stem = Path(csv_file).with_suffix("")
    return {"csv": stem.with_name(stem.name + "_metrics.csv"), "md": stem.with_name(stem.name + "_metrics.md"),
            "png": stem.with_name(stem.name + "_roc.png")}


def abnormality_of(column: str) -> str:
    """``"lung_Lung nodule_Not Nodule._Nodule."`` -> ``"Lung nodule"``."""
    parts = column.split("_")
    if len(parts) < 2 or not parts[1]:
        raise MetricsInputError(f"column {column!r} is not of the form anatomy_abnormality_negative_positive")
    return parts[1]


def _lines(rows) -> str:
    """CSV line numbers of data rows (the header is line 1)."""
    return ", ".join(str(int(r) + 2) for r in rows)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a prediction CSV as written by eval.py or the fVLM release: probabilities as floats, NaN where the
    cell is empty (the anatomy is absent: how eval.py and the release mark it).

    ``MetricsInputError`` for a volume listed twice and for a cell that reads as NaN although it is not empty
    (``nan`` text: a model output that is not a number, never an absent anatomy); each names the CSV lines."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MetricsInputError(f"cannot read prediction CSV {path}: {e}".replace("\n", " ")) from e
    if FILE_COLUMN not in df.columns:
        raise MetricsInputError(f"prediction CSV {path} has no {FILE_COLUMN!r} column (columns: {list(df.columns)[:5]})")
    if len(df.columns) < 2:
        raise MetricsInputError(f"prediction CSV {path} has no item columns")
    if df.empty:
        raise MetricsInputError(f"prediction CSV {path} has no rows")
    repeated = df[FILE_COLUMN][df[FILE_COLUMN].duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        raise MetricsInputError(
            f"prediction CSV {path} lists {repeated.nunique()} volume(s) more than once, e.g. {first} on lines "
            f"{_lines(repeated.index[repeated == first])}: keep one row per volume")
    columns = [c for c in df.columns if c != FILE_COLUMN]
    empty = df[columns] == ""
    try:
        probs = df[columns].mask(empty).map(float)  # float() reads 'nan' and 'inf', which are checked below
    except (ValueError, TypeError) as e:
        raise MetricsInputError(f"prediction CSV {path} holds a non-numeric probability: {e}") from e
    nan_text = probs.isna() & ~empty
    if nan_text.to_numpy().any():
        rows = np.flatnonzero(nan_text.to_numpy().any(axis=1))
        raise MetricsInputError(
            f"prediction CSV {path} holds {int(nan_text.to_numpy().sum())} NaN probabilities (not empty cells, which "
            f"mark an absent anatomy) on lines {_lines(rows[:5])}{', ...' if len(rows) > 5 else ''}, e.g. "
            f"{df[FILE_COLUMN].iloc[rows[0]]}: the model's outputs are not numbers; re-run eval.py")
    df[columns] = probs
    return df


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read the CT-RATE multi-abnormality labels CSV (``VolumeName`` + binary columns)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsInputError(f"labels CSV not found: {path} (set --labels or --data-root)")
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MetricsInputError(f"cannot read labels CSV {path}: {e}".replace("\n", " ")) from e
    if LABEL_KEY not in df.columns:
        raise MetricsInputError(f"labels CSV {path} has no {LABEL_KEY!r} column")
    repeated = df[df[LABEL_KEY].duplicated(keep=False)]
    disagreeing = repeated[~repeated.duplicated(keep=False)]  # rows of a repeated VolumeName that differ
    if len(disagreeing):
        first = disagreeing[LABEL_KEY].iloc[0]
        raise MetricsInputError(f"labels CSV {path} gives {first} different labels on lines "
                                f"{_lines(repeated.index[repeated[LABEL_KEY] == first])}: keep one row per volume")
    if len(repeated):
        logger.warning("labels CSV %s repeats %d VolumeName(s) with the same labels; one row of each is used",
                       path, repeated[LABEL_KEY].nunique())
        df = df.drop_duplicates(LABEL_KEY, keep="first")
    return df


def _few(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(str(n) for n in names[:k])
    return shown + (", ..." if len(names) > k else "")


def align(predictions: pd.DataFrame, labels: pd.DataFrame) -> ScoringTable:
    """Match every prediction row to its label row and every item column to its abnormality."""
    columns = [c for c in predictions.columns if c != FILE_COLUMN]
    abnormalities = [abnormality_of(c) for c in columns]
    unknown = sorted({a for a in abnormalities if a == LABEL_KEY or a not in labels.columns})
    if unknown:
        bad = [c for c, a in zip(columns, abnormalities) if a in unknown]
        raise MetricsInputError(
            f"unknown abnormality {_few(unknown)} (not a labels column) in prediction column(s) {_few(bad, 3)}"
        )
    file_names = predictions[FILE_COLUMN].astype(str).tolist()
    indexed = labels.set_index(LABEL_KEY)
    missing = [f for f in dict.fromkeys(file_names) if f not in indexed.index]
    if missing:
        raise MetricsInputError(
            f"{len(missing)} file name(s) of the prediction CSV are missing from the labels: {_few(missing)}"
        )
    label_values = indexed.loc[file_names, abnormalities].to_numpy()
    try:
        label_values = label_values.astype(np.float64)
    except ValueError as e:
        raise MetricsInputError(f"labels are not numeric: {e}") from e
    if not np.isin(label_values, (0.0, 1.0)).all():
        raise MetricsInputError("labels must be 0 or 1 (found other values or empty cells)")
    try:
        probs = predictions[columns].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise MetricsInputError(f"prediction CSV holds a non-numeric probability: {e}") from e
    bad = np.isinf(probs) | (probs < 0) | (probs > 1)  # NaN compares False: empty cells pass
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise MetricsInputError(f"{int(bad.sum())} probabilities are infinite or outside [0, 1], e.g. "
                                f"{probs[row, col]} for {file_names[row]} in {columns[col]!r}: fix the prediction CSV")
    _log_unscored(probs, file_names, abnormalities, labels)
    probs = np.nan_to_num(probs, nan=0.0)
    counts = pd.Series(abnormalities).value_counts()
    names = [a if counts[a] == 1 else c for c, a in zip(columns, abnormalities)]
    return ScoringTable(file_names, columns, names, probs, label_values.astype(np.int64))


def _log_unscored(probs: np.ndarray, file_names: Sequence[str], abnormalities: Sequence[str],
                  labels: pd.DataFrame) -> None:
    """Log what the scores leave out or fill in: empty cells (scored 0) per item, labelled volumes and
    abnormalities the prediction CSV lacks."""
    empty = np.isnan(probs).sum(axis=0)
    if empty.any():
        logger.warning("empty cells scored as probability 0 (spec §8), per item: %s",
                       ", ".join(f"{a} {n}" for a, n in zip(abnormalities, empty.tolist()) if n))
    listed = set(file_names)
    unscored = [v for v in labels[LABEL_KEY].astype(str) if v not in listed]
    if unscored:
        logger.warning("%d labelled volume(s) are not in the prediction CSV (not scored), e.g. %s",
                       len(unscored), _few(unscored, 3))
    unpredicted = [c for c in labels.columns if c != LABEL_KEY and c not in set(abnormalities)]
    if unpredicted:
        logger.warning("%d labelled abnormality(ies) have no item column in the prediction CSV (not scored): %s",
                       len(unpredicted), _few(unpredicted))


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Threshold of ``THRESHOLDS`` nearest to the ROC corner (ties -> the later one), and its predictions."""
    pred = probs[None, :] > THRESHOLDS[:, None]  # (T, N)
    pos = labels == 1
    tpr = (pred & pos).sum(1) / pos.sum()
    fpr = (pred & ~pos).sum(1) / (~pos).sum()
    dist = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
    best = len(THRESHOLDS) - 1 - int(np.argmin(dist[::-1]))  # last index among the minima
    return float(THRESHOLDS[best]), pred[best]


def item_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All metrics of one item; NaN everywhere when ``labels`` hold one class only."""
    if labels.min() == labels.max():
        return {m: math.nan for m in METRICS} | {"threshold": math.nan}
    threshold, pred = best_threshold(labels, probs)
    pred = pred.astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "accuracy": (tp + tn) / len(labels),
        "specificity": tn / (tn + fp),
        "sensitivity": tp / (tp + fn),
        "f1_weighted": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "threshold": threshold,
    }


def fast_item_metrics(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``item_metrics`` without sklearn's input validation, as an array in METRICS order.

    AUC = Mann-Whitney U / (n_pos n_neg) with average ranks for ties (= the
    trapezoidal ROC AUC); weighted F1 = support-weighted mean of the per-class
    F1 = 2TP / (2TP + FP + FN); precision = TP / (TP + FP), 0 when nothing is
    predicted positive.
    """
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(len(METRICS), np.nan)
    auc = (rankdata(probs)[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    _, pred = best_threshold(labels, probs)
    pos = labels == 1
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn, tn = n_pos - tp, n_neg - fp
    f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fn + fp else 0.0
    f1 = (n_pos * f1_pos + n_neg * f1_neg) / len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    return np.array([auc, (tp + tn) / len(labels), tn / n_neg, tp / n_pos, f1, precision])


def compute_metrics(table: ScoringTable) -> pd.DataFrame:
    """Report: one row per item plus ``mean``; columns METRICS + threshold, n, n_positive."""
    records = []
    for j, name in enumerate(table.names):
        lab = table.labels[:, j]
        m = item_metrics(lab, table.probs[:, j])
        if math.isnan(m["auc"]):
            warnings.warn(
                f"{name}: all {len(lab)} labels are {int(lab[0])}; AUC undefined, reported as NaN and "
                "left out of the mean",
                SingleClassWarning,
                stacklevel=2,
            )
        records.append({"abnormality": name, **m, "n": len(lab), "n_positive": int(lab.sum())})
    report = pd.DataFrame.from_records(records)
    mean = {"abnormality": "mean", **{k: float(report[k].mean(skipna=True)) for k in METRICS}}
    mean |= {"threshold": math.nan, "n": len(table.file_names), "n_positive": math.nan}
    report = pd.concat([report, pd.DataFrame([mean])], ignore_index=True)
    return report[["abnormality", *METRICS, "threshold", "n", "n_positive"]]


def compute_metrics_logged(table: ScoringTable) -> pd.DataFrame:
    """``compute_metrics`` for an entry point: each ``SingleClassWarning`` goes to the log instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SingleClassWarning)
        report = compute_metrics(table)
    for w in caught:
        logger.warning("%s", w.message)
    return report


def bootstrap_ci(
    table: ScoringTable, n_resamples: int, *, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs by resampling volumes: (low, high), each (K + 1, len(METRICS)), last row = mean."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = len(table.file_names)
    samples = np.empty((n_resamples, len(table.columns) + 1, len(METRICS)))
    for b in range(n_resamples):
        rows = rng.integers(0, n, size=n)
        values = np.stack([fast_item_metrics(table.labels[rows, j], table.probs[rows, j])
                           for j in range(len(table.columns))])
        samples[b, :-1] = values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with every item single-class
            samples[b, -1] = np.nanmean(values, axis=0)
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN item (single class in every resample)
        low = np.nanpercentile(samples, 100 * alpha, axis=0)
        high = np.nanpercentile(samples, 100 * (1 - alpha), axis=0)
    return low, high


def add_ci(report: pd.DataFrame, low: np.ndarray, high: np.ndarray) -> pd.DataFrame:
    """Insert ``{metric}_ci_low`` / ``{metric}_ci_high`` after each metric column."""
    report = report.copy()
    for i, m in enumerate(METRICS):
        pos = report.columns.get_loc(m) + 1
        report.insert(pos, f"{m}_ci_high", high[:, i])
        report.insert(pos, f"{m}_ci_low", low[:, i])
    return report


def format_report(report: pd.DataFrame, *, markdown: bool = False) -> str:
    """Table for the console (plain) or a Markdown file; CIs as ``x [lo, hi]`` when present."""
    header = ["Abnormality", *(METRIC_TITLES[m] for m in METRICS), "Threshold", "N", "N+"]
    rows = []
    for _, r in report.iterrows():
        cells = [str(r["abnormality"])]
        for m in METRICS:
            cell = f"{r[m]:.4f}" if not pd.isna(r[m]) else "nan"
            if f"{m}_ci_low" in report.columns and not pd.isna(r[m]):
                cell += f" [{r[f'{m}_ci_low']:.4f}, {r[f'{m}_ci_high']:.4f}]"
            cells.append(cell)
        cells.append(f"{r['threshold']:.4f}" if not pd.isna(r["threshold"]) else "")
        cells.append(str(int(r["n"])))
        cells.append(str(int(r["n_positive"])) if not pd.isna(r["n_positive"]) else "")
        rows.append(cells)
    return render_table(header, rows, markdown=markdown)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Rows of text cells as a Markdown table, or aligned for the console (first column left, the rest right)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(c) for c in rows)]) + "\n"


def plot_roc(table: ScoringTable, report: pd.DataFrame, path: str | Path) -> None:
    """One ROC panel per item, with its AUC and the chosen operating point; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(table.columns)
    ncols = min(4, k)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for j, name in enumerate(table.names):
        ax = axes[j // ncols][j % ncols]
        lab, pr = table.labels[:, j], table.probs[:, j]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if lab.min() != lab.max():
            fpr, tpr, _ = roc_curve(lab, pr)
            ax.plot(fpr, tpr, lw=1.5)
            r = report.iloc[j]
            ax.plot(1 - r["specificity"], r["sensitivity"], "o", ms=4, color="C3")
            ax.set_title(f"{name}\nAUC {r['auc']:.3f}", fontsize=8)
        else:
            ax.set_title(f"{name}\nsingle class: no ROC", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    for j in range(k, nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    fig.supxlabel("False positive rate", fontsize=8)
    fig.supylabel("True positive rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
