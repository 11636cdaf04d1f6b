"""Report <-> volume retrieval metrics (retrieval.py).

Similarity of volume i and report j (anatomy-wise, the default):
``mean over anatomies a present in both of cos(image feature[i, a], text feature[j, a])``
(features are L2-normalised, so cos = dot). A pair with no anatomy in common gets
``NO_COMMON`` (below any cosine: ranked last). The whole-report variant is the same
formula with one "anatomy": the normalised mean of a volume's anatomy features against
the feature of its whole report text. The (N, M) matrix is built in row blocks, so the
memory peak is the matrix itself (3,039 x 3,039 float32 = 37 MB), never (N, M, A).

Ranks: a query's positives are the gallery items of the same group (the scan: the
reconstructions of a scan share one report). Its rank = 1 + the number of negatives whose
similarity is strictly greater than the best positive's (ties count for the query).
Recall@K = fraction of queries with rank <= K; mean rank = mean of ranks. A query whose
positives all score ``NO_COMMON`` is left out.

Chance, per query with P positives among G gallery items, averaged over queries:
Recall@K = 1 - C(G - P, K) / C(G, K) (the best of P positives among the first K of a
random order) and E[rank] = 1 + (G - P) / (P + 1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from utils.metrics import render_table

RECALL_AT = (1, 5, 10, 50, 100)
NO_COMMON = -2.0
BLOCK_ROWS = 512


def anatomy_similarity(image: np.ndarray, image_present: np.ndarray, text: np.ndarray, text_present: np.ndarray,
                       *, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """(N, M) float32 mean cosine over shared anatomies; image (N, A, E), text (M, A, E), present (·, A) bool."""
    n, a = image_present.shape
    if text.shape[1] != a or text_present.shape[1] != a:
        raise ValueError(f"image has {a} anatomies, text {text.shape[1]}")
    img = np.where(image_present[..., None], np.nan_to_num(image), 0).astype(np.float32)
    txt = np.where(text_present[..., None], np.nan_to_num(text), 0).astype(np.float32)
    txt_present = text_present.astype(np.float32)
    out = np.empty((n, text.shape[0]), dtype=np.float32)
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        num = sum(img[rows, k] @ txt[:, k].T for k in range(a))  # [b, M]
        den = image_present[rows].astype(np.float32) @ txt_present.T  # [b, M] shared anatomies
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where(den > 0, num / np.maximum(den, 1), NO_COMMON)
    return out


def ranks(similarity: np.ndarray, query_groups: Sequence, gallery_groups: Sequence, *,
          block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(rank per query, positives per query); rank is NaN for a query without a scorable positive."""
    q = pd.factorize(pd.Index(list(query_groups)).append(pd.Index(list(gallery_groups))))[0]
    qg, gg = q[: len(query_groups)], q[len(query_groups):]
    out = np.full(similarity.shape[0], np.nan)
    n_pos = np.zeros(similarity.shape[0], dtype=np.int64)
    for start in range(0, similarity.shape[0], block_rows):
        sim = similarity[start:start + block_rows]
        pos = qg[start:start + block_rows, None] == gg[None, :]  # [b, G]
        best = np.where(pos, sim, -np.inf).max(axis=1)
        above = ((sim > best[:, None]) & ~pos).sum(axis=1)
        ok = best > NO_COMMON
        out[start:start + len(sim)] = np.where(ok, 1 + above, np.nan)
        n_pos[start:start + len(sim)] = pos.sum(axis=1)
    return out, n_pos


def chance_recall(gallery: int, positives: np.ndarray, k: int) -> float:
    """Mean over queries of 1 - C(G - P, K) / C(G, K)."""
    miss = np.ones(len(positives))
    for i in range(min(k, gallery)):
        miss *= np.clip((gallery - positives - i) / (gallery - i), 0, None)
    return float(np.mean(1 - miss))


def chance_mean_rank(gallery: int, positives: np.ndarray) -> float:
    return float(np.mean(1 + (gallery - positives) / (positives + 1)))


def retrieval_row(label: str, rank: np.ndarray, positives: np.ndarray, gallery: int) -> list[dict]:
    """Two table rows: the measured figures and chance, for one direction / similarity."""
    ok = ~np.isnan(rank)
    r, p = rank[ok], positives[ok]
    measured = {f"R@{k}": float(np.mean(r <= k)) if len(r) else np.nan for k in RECALL_AT}
    chance = {f"R@{k}": chance_recall(gallery, p, k) if len(r) else np.nan for k in RECALL_AT}
    common = {"queries": int(ok.sum()), "gallery": gallery}
    return [{"retrieval": label, "kind": "measured", **measured, "mean_rank": float(np.mean(r)) if len(r) else np.nan,
             "median_rank": float(np.median(r)) if len(r) else np.nan, **common},
            {"retrieval": label, "kind": "chance", **chance,
             "mean_rank": chance_mean_rank(gallery, p) if len(r) else np.nan, "median_rank": np.nan, **common}]


def evaluate_both_directions(similarity: np.ndarray, volume_groups: Sequence, report_groups: Sequence,
                             label: str) -> list[dict]:
    """volume->report (rows of ``similarity``) and report->volume (its columns) rows of the table."""
    rank_v, pos_v = ranks(similarity, volume_groups, report_groups)
    rank_r, pos_r = ranks(np.ascontiguousarray(similarity.T), report_groups, volume_groups)
    return (retrieval_row(f"{label} volume->report", rank_v, pos_v, similarity.shape[1])
            + retrieval_row(f"{label} report->volume", rank_r, pos_r, similarity.shape[0]))


def format_table(table: pd.DataFrame, *, markdown: bool = False) -> str:
    """Measured and chance side by side: ``R@K`` cells ``0.1234 (0.0100)``."""
    header = ["Retrieval", *(f"R@{k}" for k in RECALL_AT), "Mean rank", "Median rank", "Queries", "Gallery"]
    rows = []
    for label, group in table.groupby("retrieval", sort=False):
        m = group[group["kind"] == "measured"].iloc[0]
        c = group[group["kind"] == "chance"].iloc[0]
        # ranks are whole numbers and a median may end in .5: :g keeps it (.0f printed 1.5 as 2)
        rows.append([label, *(f"{m[f'R@{k}']:.4f} ({c[f'R@{k}']:.4f})" for k in RECALL_AT),
                     f"{m['mean_rank']:.1f} ({c['mean_rank']:.1f})", f"{m['median_rank']:g}",
                     str(int(m["queries"])), str(int(m["gallery"]))])
    return render_table(header, rows, markdown=markdown)
