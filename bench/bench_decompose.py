"""Speed of ``python -m data.decompose`` (rules backend) at CT-RATE size, on one core.

Reports: the 100 reference-derived reports of bench/decompose_quality.py rebuilt with ``--n`` / 100 seeds
(sentences reshuffled, other organs drawn anew), written as a CT-RATE report CSV with a metadata CSV.
Times the user's command (``data.decompose.main``: read, split, assign, write both JSON files) and, in the
same run, its I/O floor (reading the CSV with ``csv`` and writing the same JSON). Prints one JSON line.

    python bench/bench_decompose.py [--n 50000]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decompose_quality import REFERENCE, rebuild  # noqa: E402
from data import decompose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    args = ap.parse_args()
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    settings = decompose.Settings.load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "metadata").mkdir()
        names, rows = [], []
        for seed in range(-(-args.n // len(reference))):
            for r in rebuild(reference, settings, seed)[0]:
                name = f"train_{len(names)}_a_1.nii.gz"
                names.append([name])
                rows.append([name, r.findings, r.impression or decompose.MISSING_TEXT])
        names, rows = names[:args.n], rows[:args.n]
        with open(root / decompose.METADATA_FILES["train"], "w", newline="") as f:
            csv.writer(f).writerows([["VolumeName"], *names])
        with open(root / "reports.csv", "w", newline="") as f:
            csv.writer(f).writerows([list(decompose.CTRATE_COLUMNS.values()), *rows])

        start, cpu_start = time.perf_counter(), time.process_time()
        assert decompose.main(["--reports", str(root / "reports.csv"), "--data-root", str(root), "--no-pbar"]) == 0
        command_s, command_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        desc = json.loads((root / decompose.DESC_FILE).read_text(encoding="utf-8"))

        start = time.perf_counter()
        with open(root / "reports.csv", newline="", encoding="utf-8") as f:
            n_read = sum(1 for _ in csv.DictReader(f))
        decompose.write_outputs(root / "floor", desc, desc)
        io_floor_s = time.perf_counter() - start
    chars = sum(len(r[1]) + len(r[2]) for r in rows)
    print(json.dumps({"reports": n_read, "mean_report_chars": round(chars / len(rows)), "command_s": round(command_s, 2),
                      "command_cpu_s": round(command_cpu_s, 2),
                      "reports_per_s": round(len(rows) / command_s), "io_floor_s": round(io_floor_s, 2),
                      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
