"""Retrieval scoring benchmark at CT-RATE validation size: 3,039 volumes x 3,039 reports, 4 anatomies.

Times the user's code path (``utils.retrieval.anatomy_similarity`` in row blocks, then
``evaluate_both_directions``: ranks, recalls and chance for both directions) on random unit
features (E = 256, each anatomy present with p = 0.9), against a baseline measured in the same
run: the unblocked similarity through one (N, M, A) einsum. Peak memory of each is traced by
``tracemalloc`` (numpy allocations). Prints one JSON line. Features themselves (one encoder
pass per anatomy and volume, then cached by embed.py) are not timed here.

    python bench/bench_retrieval.py [--n 3039] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = _threads
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from utils.retrieval import NO_COMMON, anatomy_similarity, evaluate_both_directions  # noqa: E402


def _features(rng: np.random.Generator, n: int, a: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    f = rng.standard_normal((n, a, e)).astype(np.float32)
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    return f, rng.random((n, a)) < 0.9


def _traced(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def baseline_similarity(img, img_present, txt, txt_present) -> np.ndarray:
    both = img_present[:, None, :] & txt_present[None, :, :]  # [N, M, A]
    cos = np.einsum("nae,mae->nma", np.nan_to_num(img), np.nan_to_num(txt))  # [N, M, A]
    count = both.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (cos * both).sum(-1) / count, NO_COMMON).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3039)
    ap.add_argument("--anatomies", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    img, img_present = _features(rng, args.n, args.anatomies, args.dim)
    txt, txt_present = _features(rng, args.n, args.anatomies, args.dim)
    groups = [f"scan{i // 2}" for i in range(args.n)]  # two reconstructions per scan
    sim, t_sim, mem_sim = _traced(lambda: anatomy_similarity(img, img_present, txt, txt_present))
    _, t_rank, mem_rank = _traced(lambda: evaluate_both_directions(sim, groups, groups, "all"))
    base, t_base, mem_base = _traced(lambda: baseline_similarity(img, img_present, txt, txt_present))
    print(json.dumps({
        "n_volumes": args.n, "n_reports": args.n, "anatomies": args.anatomies, "dim": args.dim,
        "threads": args.threads, "similarity_s": round(t_sim, 3), "similarity_peak_mib": round(mem_sim, 1),
        "ranks_both_directions_s": round(t_rank, 3), "ranks_peak_mib": round(mem_rank, 1),
        "baseline_einsum_s": round(t_base, 3), "baseline_peak_mib": round(mem_base, 1),
        "max_abs_diff_vs_baseline": float(np.abs(sim - base).max()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
