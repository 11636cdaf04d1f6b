"""The README's "Reproducing the paper on CT-RATE" commands, run as written (issue 26).

A repository laid out as the README says (the tracked code, a synthetic CT-RATE v2 download
and the anatomy JSONs under ``data/``, ``mae_pretrain_vit_base.pth`` and
``BiomedVLP-CXR-BERT-specialized/`` at the root in their real layouts, ``.venv`` the test's
environment; TotalSegmentator's home folder holding our small weights in its layout,
``TOTALSEG_HOME_DIR``, as after ``totalseg_download_weights``) runs the README's command block, read
from README.md, in one bash shell. Added,
only to make it short: ``--max-steps 1 --batch-size 2 --workers 0`` for train.py (one step of
the ctrate preset on CPU), one process per torchrun (a free port via PET_MASTER_PORT), and the
checkpoint of that step (``checkpoint_0``) for the README's ``checkpoint_19``. The preset's
defaults are then checked from what the run wrote.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file

from data.synthetic import generate_dataset
from tests.conftest import make_cxr_bert_dir, make_mae_file
from utils.checkpoint import from_release_state_dict, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Reproducing the paper on CT-RATE"
SHORT_TRAIN = "--max-steps 1 --batch-size 2 --workers 0"


def readme_block(readme: Path = REPO / "README.md") -> list[str]:
    """The lines of the first ```bash block of the README's reproduction section."""
    text = readme.read_text()
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block, f"'{SECTION}' has no bash block"
    return block.group(1).splitlines()


def _one(lines: list[str], pattern: str) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) == 1, f"README block: expected one line matching {pattern!r}, found {len(hits)}"
    return hits[0]


def shortened(lines: list[str]) -> str:
    """The block as a bash script with only the additions of the module docstring."""
    lines = list(lines)
    # "# ... the same four with --split valid": the four data steps again, with that split
    i = _one(lines, r"^#.*the same four with --split \w+")
    split = re.search(r"--split \w+", lines[i]).group(0)
    steps = [j for j in range(i) if re.match(r"python \w+\.py --split train", lines[j])]
    assert len(steps) == 4, lines
    lines[i:i + 1] = [lines[j].replace("--split train", split) for j in steps]
    lines[_one(lines, r"train\.py")] = lines[_one(lines, r"train\.py")].split("#")[0].rstrip() + " " + SHORT_TRAIN
    lines = [re.sub(r"--nproc_per_node=\d+", "--nproc_per_node=1", line) for line in lines]
    lines = [re.sub(r"checkpoint_\d+", "checkpoint_0", line) for line in lines]
    return "\n".join(lines) + "\n"


def lay_out_repository(repo: Path) -> None:
    """The checkout's files (tracked and new, as a clone holds them), the download and the weights where the
    README puts them, and .venv the running environment (installed: `make install` has nothing to do)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)  # mtimes kept: the venv stamp stays newer than requirements.txt
    venv = Path(sys.prefix)
    assert (venv / ".installed").is_file(), f"run from the project's .venv (make install), not {venv}"
    (repo / ".venv").symlink_to(venv)
    generate_dataset(repo / "data", n_train=2, n_valid=3, seed=0, ctrate_version=2)
    make_mae_file(repo / "mae_pretrain_vit_base.pth")
    make_cxr_bert_dir(repo / "BiomedVLP-CXR-BERT-specialized")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shortening_adds_only_the_step_limit_and_sizes():
    script = shortened(readme_block())
    assert script.count(SHORT_TRAIN) == 1 and "--masks-from" not in script
    assert "checkpoint_19" not in script and "--nproc_per_node=4" not in script
    for line in readme_block():  # every command of the README is in the script, changed at most as above
        command = re.sub(r"checkpoint_\d+", "checkpoint_0", re.sub(r"--nproc_per_node=\d+", "--nproc_per_node=1",
                                                                  line.split("#")[0].strip()))
        assert command in script


@pytest.mark.slow
def test_readme_commands_use_every_preset_default(tmp_path, totalseg_home):
    repo = tmp_path / "fvlm"
    lay_out_repository(repo)
    env = {**os.environ, "PET_MASTER_PORT": str(free_port()), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "TOTALSEG_HOME_DIR": str(totalseg_home)}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["bash", "-e", "-c", shortened(readme_block(repo / "README.md"))], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    data, out = repo / "data", repo / "output" / "fvlm_ctrate"
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0.pth"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["paths"]["mae_weights"], "train.py ran without the preset's MAE weights"
    paths = {k: (repo / v).resolve() for k, v in config["paths"].items()}  # relative to where train.py ran
    assert paths == {"data_root": data.resolve(), "mae_weights": (repo / "mae_pretrain_vit_base.pth").resolve(),
                     "text_encoder": (repo / "BiomedVLP-CXR-BERT-specialized").resolve(), "output_dir": out.resolve()}
    assert config["optim"]["max_steps"] == 1 and config["optim"]["epochs"] == 20  # the preset, one step of it
    ckpt = load_checkpoint(out / "checkpoint_0.pth")
    assert ckpt["epoch"] == 0
    model = from_release_state_dict(ckpt["model"])
    # One AdamW step at warmup_lr 1e-6 moves a weight by at most ~1e-6: the ViT blocks are still MAE's
    # (a random init differs by ~1e-2), the text encoder still the directory's.
    mae = torch.load(repo / "mae_pretrain_vit_base.pth", weights_only=True)["model"]
    vit = {k.removeprefix("visual_encoder."): v for k, v in model.items() if k.startswith("visual_encoder.blocks.")}
    assert len(vit) == 144
    for k, v in vit.items():
        torch.testing.assert_close(v, mae[k], rtol=0, atol=3e-6, msg=k)
    bert = load_file(str(repo / "BiomedVLP-CXR-BERT-specialized" / "model.safetensors"))
    text = {k: v for k, v in model.items() if k.startswith("text_encoder.encoder.")}
    assert text
    for k, v in text.items():
        torch.testing.assert_close(v, bert["bert." + k.removeprefix("text_encoder.")], rtol=0, atol=3e-6, msg=k)
    # generate_mask ran TotalSegmentator (not a copy of the ground truth): its masks are not the phantoms'
    mask = sorted((data / "train_mask").rglob("*.nii.gz"))[0]
    truth = data / "totalseg_gt" / "train" / mask.relative_to(data / "train_mask")
    labels, truth_labels = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (mask, truth))
    assert labels.shape == truth_labels.shape and (labels > 0).any() and (labels != truth_labels).any()
    # the data steps wrote under data/, eval scored every validation volume, calc_metrics wrote its tables
    n_valid = len(list((data / "processed_valid_images").rglob("*.nii")))
    csv = repo / re.search(r"--csv_file (\S+)", shortened(readme_block(repo / "README.md"))).group(1)
    assert len(csv.read_text().splitlines()) == 1 + n_valid
    assert csv.with_name(csv.stem + "_metrics.csv").is_file()
