"""Agreement of the rule-based report decomposition (data.decompose) with the release's.

The reference (tests/data/ctrate_anatomy_texts_sample.json, = ../shared/reference/) holds the release's
anatomy texts of 100 CT-RATE scans, conclusion + description joined without a separator. Per scan it
rebuilds a report: the descriptions' sentences as findings and the conclusions' as impression, each
section's sentences shuffled (fixed seed), a quarter of the joins before a capital without a space
(as CT-RATE often writes), plus sentences about organs outside the four (bones, liver, thyroid, lymph
nodes, ...). It runs ``data.decompose`` on those reports, as a user does, and compares per anatomy:

- status: abnormal or normal, the label of the loss (data.texts.is_abnormal on the composed text);
- sentence recall: the reference's sentences found in the output's same anatomy and section;
- sentence precision: the output's sentences found in the reference's same anatomy and section.

    python bench/decompose_quality.py [--seed 0] [--abnormal-from findings]

prints the Markdown table (docs/decomposition.md) and one JSON line.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import decompose  # noqa: E402
from data.texts import compose_anatomy_text, is_abnormal, normal_template  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "ctrate_anatomy_texts_sample.json"
# Conclusion and description are joined without a separator: the first "." (or "?", "!") directly
# followed by a capital is where the description starts.
_JOIN = re.compile(r"[.!?](?=[A-Z])")
OTHER_FINDINGS = (
    "No lytic-destructive lesion was detected in the bone structures within the sections.",
    "Degenerative changes are observed in the thoracic spine.",
    "The liver is of normal size and its parenchyma density is natural.",
    "Hepatosteatosis is observed in the liver.",
    "A 12 mm hypodense lesion is observed in the right lobe of the thyroid gland.",
    "Thyroid gland dimensions are normal.",
    "Mediastinal and hilar lymph nodes are of normal size.",
    "Lymph nodes with a short axis of 11 mm are observed in the mediastinum.",
    "The gallbladder is contracted.",
    "Both adrenal glands are normal.",
    "Trachea and both main bronchi are open.",
    "Thoracic inlet structures are natural.",
)
OTHER_IMPRESSIONS = (
    "Degenerative changes in the thoracic spine.",
    "Hepatosteatosis.",
    "Thyroid nodule.",
    "Mediastinal lymphadenopathy.",
    "Cholelithiasis.",
)


def split_reference(text: str, anatomy: str) -> tuple[str, str]:
    """(conclusion, description) of a composed reference text; conclusion "" when normal."""
    template = normal_template(anatomy)
    if text.startswith(template):
        return "", text[len(template):]
    m = _JOIN.search(text)
    return (text[:m.end()], text[m.end():]) if m else (text, "")


def _join(sentences: list[str], rng: np.random.Generator) -> str:
    out = sentences[0] if sentences else ""
    for s in sentences[1:]:
        out += ("" if s[0].isupper() and rng.random() < 0.25 else " ") + s
    return out


def rebuild(reference: dict, settings: decompose.Settings, seed: int = 0
            ) -> tuple[list[decompose.Report], dict, dict]:
    """(reports, reference desc_info, reference conc_info) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    reports, desc_info, conc_info = [], {}, {}
    for scan, texts in reference.items():
        desc_info[scan], conc_info[scan] = {}, {}
        findings, impression = [], []
        for anatomy, text in texts.items():
            conc, desc = split_reference(text, anatomy)
            for section, store, sentences in ((conc, conc_info, impression), (desc, desc_info, findings)):
                if section.strip():
                    store[scan][anatomy] = section
                    sentences += [s for s in decompose.split_sentences(section, settings) if s not in sentences]
        findings += list(rng.choice(OTHER_FINDINGS, size=int(rng.integers(2, 5)), replace=False))
        impression += list(rng.choice(OTHER_IMPRESSIONS, size=int(rng.integers(0, 3)), replace=False))
        rng.shuffle(findings)
        rng.shuffle(impression)
        reports.append(decompose.Report(scan, _join(findings, rng), _join(impression, rng)))
    return reports, desc_info, conc_info


def compare(reference: dict, desc_ref: dict, conc_ref: dict, desc_out: dict, conc_out: dict,
            settings: decompose.Settings) -> dict[str, dict[str, float]]:
    """Per anatomy: status agreement, sentence recall and precision (both sections pooled), as fractions."""
    rows = {}
    for anatomy in next(iter(reference.values())):
        agree = found = n_ref = correct = n_out = 0
        for scan in reference:
            status = [is_abnormal(compose_anatomy_text(scan, anatomy, d, c), anatomy)
                      for d, c in ((desc_ref, conc_ref), (desc_out, conc_out))]
            agree += status[0] == status[1]
            for ref, out in ((desc_ref, desc_out), (conc_ref, conc_out)):
                ref_text, out_text = ref[scan].get(anatomy, ""), out.get(scan, {}).get(anatomy, "")
                ref_sentences = decompose.split_sentences(ref_text, settings)
                out_sentences = decompose.split_sentences(out_text, settings)
                n_ref += len(ref_sentences)
                found += sum(s in out_sentences for s in ref_sentences)
                n_out += len(out_sentences)
                correct += sum(s in ref_sentences for s in out_sentences)
        rows[anatomy] = {"status_agreement": agree / len(reference), "recall": found / max(n_ref, 1),
                         "precision": correct / max(n_out, 1), "sentences": n_ref,
                         "abnormal_reference": sum(is_abnormal(compose_anatomy_text(s, anatomy, desc_ref, conc_ref),
                                                               anatomy) for s in reference)}
    return rows


def measure(*, seed: int = 0, abnormal_from: str = "impression", reference_path: Path = REFERENCE,
            tmp_dir: Path) -> tuple[dict, decompose.Stats]:
    """Rebuild the reports, write them as a CT-RATE report CSV under ``tmp_dir`` and run the user's command
    (``data.decompose.run``) on them; returns (the per-anatomy comparison, the run's stats)."""
    reference = json.loads(Path(reference_path).read_text(encoding="utf-8"))
    settings = decompose.Settings.load()
    reports, desc_ref, conc_ref = rebuild(reference, settings, seed)
    root = Path(tmp_dir)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with open(root / decompose.METADATA_FILES["train"], "w", newline="") as f:
        csv.writer(f).writerows([["VolumeName"]] + [[f"{r.scan_id}_1.nii.gz"] for r in reports])
    with open(root / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(decompose.CTRATE_COLUMNS.values())
        w.writerows([f"{r.scan_id}_1.nii.gz", r.findings, r.impression or decompose.MISSING_TEXT] for r in reports)
    args = decompose.get_args_parser().parse_args(
        ["--reports", str(root / "reports.csv"), "--data-root", str(root), "--abnormal-from", abnormal_from,
         "--no-pbar", "--overwrite"])
    stats = decompose.run(args)
    desc_out = json.loads((root / decompose.DESC_FILE).read_text(encoding="utf-8"))
    conc_out = json.loads((root / decompose.CONC_FILE).read_text(encoding="utf-8"))
    return compare(reference, desc_ref, conc_ref, desc_out, conc_out, settings), stats


def markdown(rows: dict) -> str:
    lines = ["| anatomy | abnormal (reference) | status agreement | sentences (reference) | recall | precision |",
             "|---|---|---|---|---|---|"]
    for a, r in rows.items():
        lines.append(f"| {a} | {r['abnormal_reference']} | {100 * r['status_agreement']:.0f} % | {r['sentences']} | "
                     f"{100 * r['recall']:.1f} % | {100 * r['precision']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--abnormal-from", choices=decompose.ABNORMAL_FROM, default="impression")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, stats = measure(seed=args.seed, abnormal_from=args.abnormal_from, tmp_dir=Path(tmp))
    print(markdown(rows))
    print(json.dumps({"seed": args.seed, "abnormal_from": args.abnormal_from, "rows": rows,
                      "abnormal_from_findings_changed": stats.abnormal_from_findings}))


if __name__ == "__main__":
    main()
