"""Labels of an external dataset in CT-RATE's form, through a labels mapping YAML.

The YAML (``configs/labels/*.yaml``)::

    id_column: NoteAcc_DEID        # the dataset labels CSV's column of volume ids
    columns:                       # zero-shot abnormality -> the dataset's 0/1 column
      Emphysema: emphysema
      Mosaic attenuation pattern: null   # the dataset has no such label

A prediction row ``file_name`` finds its label row by ``data.import_ct.volume_id`` (the id
``import_ct`` named the volume by). Abnormalities mapped to ``null`` or not listed have no
label: their prediction columns are left out of the metrics with a note (never scored
against zeros). The result is a CT-RATE-style labels table (``VolumeName`` + one column
per labelled abnormality), which ``utils.metrics.align`` scores unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from data.import_ct import volume_id
from utils.cli import UsageError
from utils.metrics import FILE_COLUMN, LABEL_KEY, abnormality_of


class LabelsMapError(UsageError, ValueError):
    """The labels mapping YAML or the dataset labels CSV is unusable (one-line message)."""


@dataclass(frozen=True)
class LabelsMap:
    id_column: str
    columns: dict[str, str | None]  # abnormality -> dataset column (None: no label)


def load_labels_map(path: str | Path) -> LabelsMap:
    path = Path(path)
    if not path.is_file():
        raise LabelsMapError(f"labels map not found: {path} (set --labels-map)")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("id_column"), str) or not isinstance(doc.get("columns"), dict):
        raise LabelsMapError(f"{path}: expected 'id_column: NAME' and 'columns: {{abnormality: column or null}}'")
    bad = [k for k, v in doc["columns"].items() if not (v is None or isinstance(v, str))]
    if bad:
        raise LabelsMapError(f"{path}: columns {bad[:3]} must map to a column name or null")
    return LabelsMap(doc["id_column"], {str(k): v for k, v in doc["columns"].items()})


def read_dataset_labels(path: str | Path, labels_map: LabelsMap, volume_names: list[str]) -> pd.DataFrame:
    """``VolumeName`` (one row per name) + one column per labelled abnormality, from the dataset's CSV."""
    path = Path(path)
    if not path.is_file():
        raise LabelsMapError(f"labels CSV not found: {path} (set --labels)")
    df = pd.read_csv(path, dtype={labels_map.id_column: str})
    mapped = {a: c for a, c in labels_map.columns.items() if c is not None}
    missing = [c for c in [labels_map.id_column, *mapped.values()] if c not in df.columns]
    if missing:
        raise LabelsMapError(f"labels CSV {path} lacks the column(s) {missing[:5]} its labels map names")
    by_id = df.drop_duplicates(labels_map.id_column).set_index(labels_map.id_column)
    ids = [volume_id(n) for n in volume_names]
    absent = [n for n, i in zip(volume_names, ids) if i not in by_id.index]
    if absent:
        raise LabelsMapError(f"{len(absent)} volume(s) have no row in {path} "
                             f"(by {labels_map.id_column}): {', '.join(absent[:5])}")
    out = by_id.loc[ids, list(mapped.values())].set_axis(list(mapped), axis=1).reset_index(drop=True)
    out.insert(0, LABEL_KEY, volume_names)
    return out


def map_external_labels(predictions: pd.DataFrame, labels_path: str | Path,
                        labels_map_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(predictions without unlabelled items, CT-RATE-style labels, notes on what was left out)."""
    labels_map = load_labels_map(labels_map_path)
    names = predictions[FILE_COLUMN].astype(str).tolist()
    labels = read_dataset_labels(labels_path, labels_map, names)
    keep, notes = [FILE_COLUMN], []
    for column in predictions.columns[1:]:
        abnormality = abnormality_of(column)
        if labels_map.columns.get(abnormality) is None:
            why = "mapped to null" if abnormality in labels_map.columns else "not in the labels map"
            notes.append(f"{abnormality}: no label in {Path(labels_path).name} ({why}); left out of the metrics")
        else:
            keep.append(column)
    if len(keep) == 1:
        raise LabelsMapError(f"no prediction column has a label through {labels_map_path}")
    return predictions[keep], labels, notes
