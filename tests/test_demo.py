"""The end-to-end test of the method: `make demo` at reduced length on the synthetic CT-RATE."""
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# An enlarged heart, a fluid rim around it and a stomach above the diaphragm change the shape
# of the anatomy masks, which the model sees through its token masks: the phantom's most
# visible abnormalities (AUC > 0.9 in the demo, README). Chance is 0.5 with a standard error
# of ~0.07 on the 80 validation volumes.
EASIEST = ["Cardiomegaly", "Pericardial effusion", "Hiatal hernia"]


@pytest.mark.slow
def test_demo_learns_easiest_abnormalities(tmp_path):
    """Synthetic data -> four steps -> torchrun training -> eval -> metrics: `make demo` as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = ["make", "-s", "demo", f"DEMO_DIR={tmp_path}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    metrics = pd.read_csv(tmp_path / "output" / "zeroshot_valid_metrics.csv").set_index("abnormality")
    auc = metrics.loc[EASIEST, "auc"]
    assert auc.mean() >= 0.75 and (auc > 0.6).all(), metrics["auc"].to_dict()
    # the release's column format, one row per validation reconstruction
    probs = pd.read_csv(tmp_path / "output" / "zeroshot_valid.csv")
    assert list(probs.columns)[0] == "file_name" and len(probs.columns) == 17 and len(probs) == 80
