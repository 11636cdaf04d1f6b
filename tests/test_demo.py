"""The end-to-end test of the method: `make demo` as is on the synthetic CT-RATE."""
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from data.io import list_volumes

REPO = Path(__file__).resolve().parents[1]
# Abnormalities that change an anatomy as a whole: an enlarged heart, a fluid rim around it, a
# stomach above the diaphragm, hyperlucent and hyperinflated lungs. The demo scores them at
# 0.95-1.0 (docs/demo-findings.md); chance is 0.5 with a standard error of ~0.035 on the ~270 validation volumes.
WHOLE_ANATOMY = ["Cardiomegaly", "Pericardial effusion", "Hiatal hernia", "Emphysema"]


@pytest.mark.slow
def test_demo_learns_whole_anatomy_abnormalities(tmp_path):
    """Synthetic data -> four steps -> torchrun training -> eval -> metrics: `make demo` as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = ["make", "-s", "demo", f"DEMO_DIR={tmp_path}"]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        volumes = list_volumes(tmp_path / "ctrate", "valid")  # what eval.py scores
    finally:
        shutil.rmtree(tmp_path / "ctrate", ignore_errors=True)  # ~6 GB of volumes; the outputs are small
    metrics = pd.read_csv(tmp_path / "output" / "zeroshot_valid_metrics.csv").set_index("abnormality")
    auc = metrics.loc[WHOLE_ANATOMY, "auc"]
    assert auc.mean() >= 0.9 and (auc > 0.75).all(), metrics["auc"].to_dict()
    # the release's column format, one row per validation reconstruction
    probs = pd.read_csv(tmp_path / "output" / "zeroshot_valid.csv")
    assert list(probs.columns)[0] == "file_name" and len(probs.columns) == 17 and len(probs) == len(volumes) > 200
