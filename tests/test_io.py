"""data/io.py: atomic outputs, per-case CSV reports, NIfTI writes without process-global settings."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from data.io import atomic_output, write_case_csv, write_volume


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_output_overwrites_a_stale_temporary_and_replaces_a_directory(tmp_path):
    out = tmp_path / "encoder"
    (out / "old").mkdir(parents=True)
    (tmp_path / ".tmp-encoder").mkdir()
    (tmp_path / ".tmp-encoder" / "stale").write_text("from a killed run")
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


def test_case_csv_has_one_line_per_case_sorted(tmp_path):
    path = tmp_path / "fix_train_failures.csv"
    write_case_csv(path, [("b.nii.gz", "first line\nsecond  line"), ("a.nii.gz", "")])
    lines = path.read_text().splitlines()
    assert lines == ["volume,reason", "a.nii.gz,", "b.nii.gz,first line second line"]
    write_case_csv(path, [], header=("volume", "warning"))
    assert list(csv.reader(open(path))) == [["volume", "warning"]]


def test_write_volume_sets_the_gzip_level_per_file_not_globally(tmp_path):
    before = nib.openers.Opener.default_compresslevel
    array = np.zeros((8, 16, 16), np.int16)  # compressible: stored (level 0) is much larger than level 9
    write_volume(tmp_path / "stored.nii.gz", array, (1, 1, 1), compresslevel=0)
    write_volume(tmp_path / "deflated.nii.gz", array, (1, 1, 1), compresslevel=9)
    assert nib.openers.Opener.default_compresslevel == before
    assert (tmp_path / "stored.nii.gz").stat().st_size > 4 * (tmp_path / "deflated.nii.gz").stat().st_size
    for name in ("stored.nii.gz", "deflated.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(tmp_path / name).dataobj).T, array)


def test_dicom_io_keeps_the_process_locale(tmp_path):
    """ITK's DICOM I/O sets the C locale, after which open() reads UTF-8 configs as ASCII."""
    import locale

    from data.import_ct import read_dicom_series
    from data.synthetic_external import write_dicom_series

    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(tmp_path / "series", np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    assert read_dicom_series(tmp_path / "series").GetSize() == (8, 8, 3)
    assert locale.setlocale(locale.LC_ALL) == before
