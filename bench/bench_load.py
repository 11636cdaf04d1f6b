"""Loading a training checkpoint for evaluation: the whole file (baseline) against the model weights only.

Builds the paper's model (configs/ctrate.yaml, a random CXR-BERT-size text encoder), takes one AdamW step so the
optimiser holds its two moments, saves ``checkpoint_0.pth`` as train.py does, then loads it into a fresh model,
alternating, each load in its own process (so each has its own peak memory):

- ``whole``: ``utils.checkpoint.load_checkpoint`` (``torch.load`` of everything, optimiser included) and
  ``load_model_state`` of its ``model`` entry: what eval/predict/embed/retrieval did before;
- ``weights``: ``load_model_weights`` (memory-mapped; only the model entry is read) and ``load_model_state``:
  what ``models.builder.build_model(checkpoint=...)`` does now.

Prints one JSON line: file size, median seconds and the resident memory each load added (median). The page cache is warm for both (the file
was just written and is read once before timing).

    python bench/bench_load.py [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def _model():
    from bench_train import _random_bert_dir  # the bench's CXR-BERT-size random text encoder
    from models.builder import build_model
    from utils.preset import load_preset

    cfg = load_preset(REPO / "configs" / "ctrate.yaml",
                      flags={"paths.text_encoder": str(_random_bert_dir("ctrate.yaml")), "paths.mae_weights": None})
    model, _ = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=cfg.pipeline.n_anatomies,
                           text_encoder_dir=cfg.paths.text_encoder)
    return model


def _rss_gb() -> float:
    """Resident memory of this process now (VmRSS), in GB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 2**20


def load_once(kind: str, path: Path) -> None:
    """One timed load in this process, as eval's ``build_model`` does it (the loaded entry kept until the model
    has it); prints ``{"seconds", "rss_gb"}`` (resident memory the load added)."""
    from utils.checkpoint import load_checkpoint, load_model_state, load_model_weights

    model = _model()
    before = _rss_gb()
    start = time.perf_counter()
    sd = load_checkpoint(path)["model"] if kind == "whole" else load_model_weights(path)
    load_model_state(model, sd, strict=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_gb": _rss_gb() - before}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--load", choices=("whole", "weights"), help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        load_once(args.load, args.path)
        return 0
    import torch

    from utils.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        model = _model()
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        for q in model.parameters():
            q.grad = torch.zeros_like(q) if q.requires_grad else None
        optimizer.step()
        path = save_checkpoint(Path(tmp) / "checkpoint_0.pth", model=model, optimizer=optimizer, epoch=0)
        del model, optimizer
        path.read_bytes()  # warm the page cache for both
        runs: dict[str, list[dict]] = {"whole": [], "weights": []}
        for _ in range(args.reps):
            for kind in runs:
                out = subprocess.run([sys.executable, __file__, "--load", kind, "--path", str(path)], check=True,
                                     capture_output=True, text=True).stdout
                runs[kind].append(json.loads(out.splitlines()[-1]))
        print(json.dumps({"file_gb": round(path.stat().st_size / 1e9, 2), **{
            kind: {"median_s": round(statistics.median(r["seconds"] for r in rs), 2),
                   "rss_gb": round(statistics.median(r["rss_gb"] for r in rs), 2)} for kind, rs in runs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
