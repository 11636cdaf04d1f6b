"""Report <-> volume retrieval on a split: every volume against every report (metrics in utils/retrieval.py).

    python retrieval.py --config configs/demo.yaml --checkpoint demo/output/checkpoint_17.pth --split valid
    python retrieval.py ... --texts report      # whole-report variant (free-text reports only)

Texts (``--texts``):
- ``anatomy`` (default): the spec §3 text of each anatomy of the volume's scan, from
  ``<data-root>/desc_info.json`` and ``conc_info.json``, encoded as in training; a volume is
  compared with a report on the anatomies present in its mask (all four have a text);
- ``report``: the whole report (``Findings_EN`` + " " + ``Impressions_EN`` of
  ``--reports``, default ``<data-root>/radiology_text_reports/validation_reports.csv``,
  truncated at the model's ``text_max_length``) against the normalised mean of the volume's
  anatomy features. fVLM never trains on this pairing: expect lower figures.

Image features come from ``--embeddings`` (default ``res/embed_<checkpoint>_<split>.npz``), the
file embed.py writes; it is computed (resumably) when missing, and reused afterwards. Text
features are cached beside it (``..._texts_<kind>.npz``). Both caches are keyed by content: the checkpoint's
size and mtime, each volume's image and mask, the report JSONs or reports CSV; what changed is computed again,
and the log says "reused" or "wrote".
Writes ``--output`` (default ``res/retrieval_<checkpoint>_<split>_<texts>.csv``) and a ``.md``
twin; prints the table with chance level in brackets, overall and per anatomy.
Exit status: 0 on success, 2 when it could not start.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import CHECKPOINT_FLAG_KEYS, checkpoint_args_parser, preset_defaults, run_main

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("retrieval")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM retrieval", parents=[checkpoint_args_parser()], add_help=False)
    p.add_argument("--texts", choices=("anatomy", "report"), default="anatomy",
                   help="anatomy-wise spec §3 texts (default) or whole free-text reports")
    p.add_argument("--reports", type=Path, help="reports CSV for --texts report (default: the split's CT-RATE CSV)")
    p.add_argument("--embeddings", type=Path,
                   help="image features of embed.py (default: res/embed_<checkpoint>_<split>.npz; computed if missing)")
    p.add_argument("--output", type=Path, help="table CSV (default: res/retrieval_<checkpoint>_<split>_<texts>.csv)")
    return p


def report_texts(path: Path, names: list[str]) -> list[str | None]:
    """Findings + impressions of each volume's report row; None when it has none."""
    import pandas as pd

    from zeroshot import ZeroShotSetupError

    if not path.is_file():
        raise ZeroShotSetupError(f"reports CSV not found: {path} (set --reports)")
    df = pd.read_csv(path).drop_duplicates("VolumeName").set_index("VolumeName")
    missing = [c for c in ("Findings_EN", "Impressions_EN") if c not in df.columns]
    if missing:
        raise ZeroShotSetupError(f"{path} lacks the column(s) {missing}")
    return [f"{df.at[n, 'Findings_EN']} {df.at[n, 'Impressions_EN']}" if n in df.index else None for n in names]


def text_features(s, names: list[str], kind: str, reports: Path, cache: Path, progress: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, A', E), present (M, A')) of the reports of ``names``; cached in ``cache``."""
    from data.io import atomic_output, file_fingerprint
    from data.texts import REPORT_JSONS, load_report_json
    from utils.embeddings import anatomy_texts, encode_texts

    sources = [reports] if kind == "report" else [s.data_root / name for name in REPORT_JSONS]
    # the files' size and mtime: changed reports or anatomy texts are encoded again
    key = f"{s.source} texts {kind} " + " ".join(f"{path.resolve()} {found}"
                                                   for path, found in zip(sources, file_fingerprint(sources)))
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["source"]) == key and [str(n) for n in z["names"]] == names:
                logger.info("reused text features %s", cache)
                return z["features"], z["present"]
    max_length = s.cfg.model.text_max_length
    encode = lambda batch: s.model.encode_texts(batch, s.tokenizer, max_length, device=s.device)  # noqa: E731
    if kind == "anatomy":
        per_volume = anatomy_texts(names, s.anatomies, *(load_report_json(p) for p in sources))
        width = len(s.anatomies)
    else:
        per_volume = [None if t is None else [t] for t in report_texts(reports, names)]
        width = 1
    flat = [t for texts in per_volume if texts is not None for t in texts]
    feats = encode_texts(encode, flat, progress=progress)
    out = np.full((len(names), width, feats.shape[-1] if len(flat) else 1), np.nan, dtype=np.float32)
    present = np.zeros((len(names), width), dtype=bool)
    rows = [i for i, texts in enumerate(per_volume) if texts is not None]
    out[rows] = feats.reshape(len(rows), width, -1)
    present[rows] = True
    with atomic_output(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, names=np.asarray(names, dtype=str), features=out, present=present, source=np.asarray(key))
    logger.info("wrote text features %s", cache)
    return out, present


def whole_volume(projected: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, E) normalised mean of the present anatomy features, (N, 1) present."""
    mean = np.where(present[..., None], np.nan_to_num(projected), 0).sum(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norm, 1e-12))[:, None], present.any(axis=1)[:, None]


def run(args: argparse.Namespace) -> pd.DataFrame:
    import pandas as pd

    from data.common import REPORT_FILES, scan_id_of
    from data.io import write_table
    from utils.embeddings import compute_image_embeddings, setup_features
    from utils.retrieval import anatomy_similarity, evaluate_both_directions, format_table

    s = setup_features(args)
    stem = f"{s.checkpoint.stem}_{args.split}"
    emb_path = args.embeddings or Path("res") / f"embed_{stem}.npz"
    emb, failures, computed = compute_image_embeddings(s.extractor, s.volumes, emb_path, source=s.source,
                                                       progress=args.pbar)
    logger.info("%s image features %s (%d volumes computed now)", "wrote" if computed else "reused", emb_path,
                computed)
    for name, reason in failures:
        logger.warning("left out %s: %s", name, reason)
    reports = args.reports or s.data_root / REPORT_FILES.get(args.split, f"radiology_text_reports/{args.split}_reports.csv")
    txt, txt_present = text_features(s, emb.names, args.texts, reports,
                                     emb_path.with_name(f"{emb_path.stem}_texts_{args.texts}.npz"), args.pbar)
    without = [n for n, p in zip(emb.names, txt_present.any(axis=1)) if not p]
    if without:
        logger.warning("%d volume(s) have no report and are left out: %s", len(without), ", ".join(without[:5]))
    keep = txt_present.any(axis=1)
    names = [n for n, k in zip(emb.names, keep) if k]
    groups = [scan_id_of(n) for n in names]
    img, img_present, txt, txt_present = emb.projected[keep], emb.present[keep], txt[keep], txt_present[keep]
    rows = []
    if args.texts == "report":
        rows += evaluate_both_directions(anatomy_similarity(*whole_volume(img, img_present), txt, txt_present),
                                         groups, groups, "whole report")
    else:
        rows += evaluate_both_directions(anatomy_similarity(img, img_present, txt, txt_present),
                                         groups, groups, "all anatomies")
        for a, anatomy in enumerate(emb.anatomies):
            sim = anatomy_similarity(img[:, a:a + 1], img_present[:, a:a + 1], txt[:, a:a + 1],
                                     txt_present[:, a:a + 1])
            rows += evaluate_both_directions(sim, groups, groups, anatomy)
    table = pd.DataFrame(rows)
    output = args.output or Path("res") / f"retrieval_{stem}_{args.texts}.csv"
    title = (f"Retrieval of `{s.checkpoint}` on {args.split} ({len(names)} volumes, {args.texts} texts; "
             "chance in brackets)")
    md = write_table(output, table.to_csv(index=False), title + "\n\n" + format_table(table, markdown=True))
    print(format_table(table), end="")
    logger.info("wrote %s and %s", output, md)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n\n")[0],
                                     epilog=preset_defaults(CHECKPOINT_FLAG_KEYS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    with torch.no_grad():
        return run_main("retrieval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
