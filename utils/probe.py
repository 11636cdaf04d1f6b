"""Linear probes on frozen features (probe.py): does an abnormality live in the image features at all?

Per abnormality, a scikit-learn ``StandardScaler`` + ``LogisticRegression`` (L2, ``C``) on the
volume features, scored on volumes it was not fitted on:

- k-fold: ``StratifiedGroupKFold`` (shuffled with ``seed``) with the patient as group, so
  reconstructions and scans of one patient never sit on both sides; every volume gets an
  out-of-fold probability;
- a given split: fitted on the listed training volumes, probabilities for the others.

A training part with one class only predicts that class (probability 0 or 1).
Features of a volume = for each chosen anatomy its feature (0 where absent) and a 0/1
presence flag, concatenated.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from utils.cli import UsageError



class ProbeError(UsageError, ValueError):
    """The probe cannot be fitted as asked (message names the flag to change)."""


def design_matrix(features: np.ndarray, present: np.ndarray, anatomy_idx: Sequence[int]) -> np.ndarray:
    """(N, sum over chosen anatomies of (F + 1)) from features (N, A, F) and present (N, A)."""
    blocks = []
    for a in anatomy_idx:
        blocks.append(np.where(present[:, a, None], np.nan_to_num(features[:, a]), 0.0))
        blocks.append(present[:, a, None].astype(np.float64))
    return np.concatenate(blocks, axis=1).astype(np.float64)


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, c: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """Positive-class probabilities of ``x_test``."""
    if y_train.min() == y_train.max():
        return np.full(len(x_test), float(y_train[0]))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable folds: weights grow, probs still rank
        model.fit(x_train, y_train)
    return model.predict_proba(x_test)[:, 1]


def cross_validated_probs(x: np.ndarray, y: np.ndarray, groups: Sequence[str], *, folds: int = 5, c: float = 1.0,
                          seed: int = 0, name: str = "labels") -> np.ndarray:
    """Out-of-fold probabilities of every row (group k-fold, stratified on ``y``); ``name`` (the abnormality)
    is named in the ``ProbeError`` when there are too few patients or volumes for ``folds``."""
    n_groups = len(set(groups))
    if n_groups < folds:
        raise ProbeError(f"{folds} folds need at least {folds} patients, got {n_groups} (lower --folds)")
    members = np.bincount(y, minlength=2)
    if members.max() < folds:  # StratifiedGroupKFold's own condition: it would raise
        raise ProbeError(f"{name}: {folds} folds need at least {folds} volumes of one class, got {members[0]} "
                         f"negative and {members[1]} positive (lower --folds)")
    out = np.empty(len(y))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer members of a class than folds: still a valid split
        splits = list(splitter.split(x, y, groups))
    for train, test in splits:
        out[test] = fit_predict(x[train], y[train], x[test], c=c, seed=seed)
    return out
