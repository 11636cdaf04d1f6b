"""data.qc: the mosaics and the table, each flag on a volume made to have that fault, quiet on clean volumes."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from data import qc
from data.common import load_pipeline_config
from data.io import image_to_mask_path, list_volumes, open_volume, read_geometry, write_volume
from tests.test_data_pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "configs" / "pipeline_demo.yaml"


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """Six clean synthetic volumes through the four data steps (demo pipeline: 4 x 4 x 8 mm)."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("qc") / "ctrate"
    generate_dataset(root, n_train=1, n_valid=4, seed=0)
    for rc in run_pipeline(root, "valid", "--config", str(PIPELINE)):
        assert rc == 0
    assert len(list_volumes(root, "valid")) >= 5
    return root


def run_qc(root: Path, tmp_path: Path) -> dict[str, dict]:
    out = tmp_path / "qc"
    assert qc.main(["--data-root", str(root), "--split", "valid", "--n", "16", "--config", str(PIPELINE),
                    "--out", str(out)]) == 0
    with open(out / "qc_valid.csv", newline="") as f:
        rows = {r["volume"]: r for r in csv.DictReader(f)}
    assert {p.name for p in out.glob("*.png")} == {f"{v}.png" for v in rows}
    return rows


@pytest.mark.slow
def test_clean_volumes_are_not_flagged_and_mosaics_are_written(processed, tmp_path):
    rows = run_qc(processed, tmp_path)
    assert len(rows) == len(list_volumes(processed, "valid"))
    assert {v: r["flags"] for v, r in rows.items() if r["flags"]} == {}
    first = next(iter(rows.values()))
    assert 0 < float(first["lung_share"]) < 1 and int(first["heart_voxels"]) > 0
    assert -1100 < float(first["hu_p1"]) < -800 and float(first["padding_share"]) < 0.5
    from PIL import Image
    png = Image.open(next((tmp_path / "qc").glob("*.png")))
    assert png.size[0] > 200 and png.size[1] > 400  # 4 anatomy rows x 3 views


def _break(root: Path, fault: str) -> str:
    """Give the second processed volume ``fault``; returns its name."""
    pipe = load_pipeline_config(PIPELINE)
    path = list_volumes(root, "valid")[1]
    image, mask = np.array(open_volume(path)), np.array(open_volume(image_to_mask_path(path)))
    heart, aorta = pipe.anatomy_names.index("heart") + 1, pipe.anatomy_names.index("aorta") + 1
    if fault == "missing:heart":
        mask[mask == heart] = 0
    elif fault == "tiny:aorta":
        keep = np.argwhere(mask == aorta)[:5]
        mask[mask == aorta] = 0
        mask[tuple(keep.T)] = aorta
    elif fault == "mirrored":
        image, mask = image[:, :, ::-1], mask[:, :, ::-1]
    elif fault == "rescaled_twice":
        tissue = image != pipe.pad_hu
        image[tissue] -= 1024
    elif fault == "mostly_padding":
        cut = int(0.6 * image.shape[0])
        image[:cut], mask[:cut] = pipe.pad_hu, 0
    geometry = read_geometry(path)
    write_volume(path, np.ascontiguousarray(image), *geometry, compresslevel=0)
    write_volume(image_to_mask_path(path), np.ascontiguousarray(mask), *geometry, compresslevel=0)
    return path.stem


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing:heart", "tiny:aorta", "mirrored", "rescaled_twice", "mostly_padding"])
def test_each_flag_fires_on_its_fault_only(processed, tmp_path, fault):
    root = tmp_path / "root"
    shutil.copytree(processed, root)
    broken = _break(root, fault)
    rows = run_qc(root, tmp_path)
    assert fault in rows[broken]["flags"].split(), rows[broken]
    assert {v: r["flags"] for v, r in rows.items() if r["flags"] and v != broken} == {}


def test_missing_cache_is_a_one_line_error(tmp_path, caplog):
    assert qc.main(["--data-root", str(tmp_path), "--split", "valid", "--config", str(PIPELINE)]) == 2
    assert "no processed volumes" in caplog.text and not (tmp_path / "qc_valid").exists()
