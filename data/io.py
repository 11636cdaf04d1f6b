"""File I/O of the data steps, the training cache and the run outputs: NIfTI volumes, CSV reports, atomic writes.

Atomic writes: every output is written to a temporary sibling
``.tmp-{host}~{pid}~{token}~{name}`` and renamed (``os.replace``) by ``atomic_output``,
so a killed process never leaves a truncated file under the final name. The name is
unique per writer, so two runs writing the same output at once (overlapping shard
specs) never share a temporary; it starts with a dot, so listings skip it, and the stale
ones killed writers on this host left (their pid gone) are removed by the next writer in
that folder. ``write_case_csv`` writes the per-case reports
(``volume,reason`` failures, ``volume,warning`` warnings) with one line per cell.

Array layout: every array here is ``(D, H, W)`` = ``(z, y, x)``, exactly what
``SimpleITK.GetArrayFromImage`` returns for the same file. On disk the files are
standard NIfTI-1 (x fastest), so the ``(D, H, W)`` C-order array is the
transpose of nibabel's ``(x, y, z)`` Fortran-order array: no copy either way.

Geometry is given the SimpleITK way (LPS): ``spacing_xyz``, ``origin_xyz`` and
``direction`` (9 floats, row-major 3x3 matrix whose columns are the x, y, z axis
directions). The NIfTI affine stores it in RAS (x and y negated), as
SimpleITK/ITK write it, so SimpleITK reads back the same geometry and viewers
(ITK-SNAP, 3D Slicer, FSLeyes) show the volume the right way round.

Training cache (``processed_{split}_images``/``_masks``): uncompressed int16 HU /
uint8 anatomy ids. ``open_volume`` memory-maps it: a random crop reads only the
voxels it needs, losslessly, and the files open in any viewer. HU scaling
happens at read time (``scale_hu``).
"""
from __future__ import annotations

import csv
import errno
import fcntl
import json
import locale
import math
import os
import secrets
import shutil
import socket
import time
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from utils.cli import UsageError


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class VolumeReadError(ValueError):
    """A volume file is missing, corrupt, truncated or not in the expected format."""


class InUseError(UsageError, RuntimeError):
    """Another run holds the lock of an output (``run_lock``)."""


class NotWritableError(UsageError, OSError):
    """An output folder cannot be written (``check_writable``)."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_SWEPT_FOLDERS: set[Path] = set()


def _remove_stale_temporaries(folder: Path) -> None:
    """Once per process and folder (a folder may hold a manifest per volume): remove the temporaries that
    killed writers on this host left there (their pid is gone), and any of the older fixed ``.tmp-{name}`` form."""
    if folder in _SWEPT_FOLDERS:
        return
    _SWEPT_FOLDERS.add(folder)
    host = socket.gethostname()
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(".tmp-"):
                continue
            parts = entry.name[len(".tmp-"):].split("~", 3)
            if len(parts) == 4 and (parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1]))):
                continue  # another host's writer, or one still running
            try:
                _remove(folder / entry.name)
            except FileNotFoundError:  # removed by another writer meanwhile
                pass


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``, unique to this writer (module docstring), to write (a file or
    a directory); on success it replaces ``path``, on any exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".tmp-{socket.gethostname()}~{os.getpid()}~{secrets.token_hex(4)}~{path.name}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a non-empty directory
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Temporaries (``atomic_output``) of outputs that belong together (an image and its mask): none is renamed
    into place before all are written, so a failure leaves every one as it was, never a new image beside an
    old mask; then the last path first, so a reader listing the first finds the others."""
    with ExitStack() as stack:
        yield tuple(stack.enter_context(atomic_output(p)) for p in paths)


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process locale after the block: ITK's DICOM (GDCM) I/O sets it to "C", after which
    Python's ``open()`` without an encoding reads text as ASCII for the rest of the process."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


# fds of the locks this process holds: a forked worker closes its copies (``close_inherited_locks``), so
# that a worker outliving its parent never keeps the parent's lock
HELD_LOCK_FDS: set[int] = set()


def close_inherited_locks() -> None:
    """In a forked child: close the inherited lock fds (the parent's lock stays held through its own fd)."""
    for fd in list(HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    HELD_LOCK_FDS.clear()


def _lock_holders(path: Path) -> str:
    """The holders a lock file records (``run_lock``), less those gone from this host (finished shared holders);
    when all are gone, the last one, marked so (a process it started may hold the lock)."""
    host, live, gone = socket.gethostname(), [], []
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if words[:1] != ["pid"]:
            continue
        if len(words) > 4 and words[3] == host and words[1].isdigit() and not _pid_alive(int(words[1])):
            gone.append(f"{line.strip()}, exited: a process it started may still hold it")
        else:
            live.append(line.strip())
    return "; ".join(live or gone[-1:]) or "holder not recorded"


@contextmanager
def run_lock(path: str | Path, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold ``fcntl.flock`` on the lock file ``path`` (created if needed) until the block ends.

    ``InUseError`` at once when another process holds it (exclusive against any holder; ``shared``
    locks coexist with each other), naming the holder: each holder writes ``pid P on host H since T``
    into the file (an exclusive holder replaces its text, a shared one adds a line). The kernel drops
    the lock when the holder exits, however it dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(f"{what} is in use by another run ({_lock_holders(path)}; lock {path}): "
                             "wait for it to end, or stop that process") from None
        HELD_LOCK_FDS.add(fd)
        holder = (f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode()
        if shared:  # one small O_APPEND write: shared holders never mix their lines
            with open(path, "ab") as f:
                f.write(holder)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        yield
    finally:
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)


def check_writable(folder: str | Path) -> None:
    """``NotWritableError`` naming ``folder`` (or its nearest existing parent) unless a file can be created there."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        probe = os.open(existing / f".write-test-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise NotWritableError(exc.errno or errno.EACCES,
                               f"cannot write to {existing} ({exc.strerror}): make it writable or choose "
                               "another output location") from None
    os.close(probe)
    os.unlink(existing / f".write-test-{os.getpid()}")


def file_fingerprint(paths: Sequence[Path]) -> list[list[int] | None]:
    """``[size, mtime_ns]`` per file (``None`` when missing): what a rerun compares to decide it changed."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(None)
        else:
            out.append([st.st_size, st.st_mtime_ns])
    return out


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8, whatever the locale)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    """Atomically write ``obj`` as JSON."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f)


def read_json(path: str | Path) -> object | None:
    """The JSON in ``path``; ``None`` when it is missing or unreadable (treated as absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: one CSV cell, one log line."""
    return " ".join(str(text).split())


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Atomically write a CSV (``header`` then ``rows``)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_table(output: str | Path, csv_text: str, markdown: str) -> Path:
    """A result table: ``output`` (CSV text) and its Markdown twin ``output.with_suffix(".md")``, each
    atomically; returns the .md path (calc_metrics.py, probe.py, retrieval.py)."""
    output = Path(output)
    md = output.with_suffix(".md")
    for path, text in ((output, csv_text), (md, markdown)):
        write_text(path, text)
    return md


def write_case_csv(path: str | Path, rows: Iterable[tuple[str, str]], header: Sequence[str] = ("volume", "reason")
                   ) -> None:
    """A per-case report (failures: ``volume,reason``; warnings: ``volume,warning``), sorted by volume,
    each cell on one line; header only when ``rows`` is empty."""
    write_csv(path, header, sorted((one_line(name), one_line(text)) for name, text in rows))


def affine_from_geometry(spacing_xyz: Sequence[float], origin_xyz: Sequence[float],
                         direction: Sequence[float] = IDENTITY_DIRECTION) -> np.ndarray:
    """4x4 NIfTI (RAS) affine from SimpleITK (LPS) geometry."""
    rot = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ rot @ np.diag(np.asarray(spacing_xyz, dtype=np.float64))
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin_xyz, dtype=np.float64)
    return affine


def geometry_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of ``affine_from_geometry``: (spacing_xyz, origin_xyz, direction)."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    rot = lps[:, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:, 3].tolist()), tuple(rot.ravel().tolist())


def _load(path: str | Path, *, three_d: bool = True) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path), mmap=True)
    except FileNotFoundError:
        raise VolumeReadError(f"missing file {path}") from None
    except (ImageFileError, OSError, ValueError, EOFError) as exc:
        raise VolumeReadError(f"unreadable NIfTI {path}: {exc}") from exc
    if three_d and len(img.shape) != 3:
        raise VolumeReadError(f"{path}: expected a 3D volume, got shape {img.shape}")
    return img


def check_complete(path: str | Path) -> None:
    """``VolumeReadError`` unless the file holds the whole volume its header announces.

    SimpleITK zero-fills a truncated ``.nii.gz`` without an error, so readers call
    this first: for gzip the trailer's ISIZE (uncompressed size mod 2**32) must equal
    ``data offset + voxels * bytes per voxel``; an uncompressed file must be that long.
    """
    img = _load(path, three_d=False)
    expected = img.dataobj.offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    path = Path(path)
    size = path.stat().st_size
    if str(path).endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(max(size - 4, 0))
            isize = int.from_bytes(f.read(4), "little")
        if isize != expected % 2**32:
            raise VolumeReadError(f"truncated gzip NIfTI {path.name} (trailer size {isize}, expected {expected})")
    elif size < expected:
        raise VolumeReadError(f"truncated NIfTI {path.name} ({size} bytes, expected {expected})")


def count_non_finite(path: str | Path) -> int:
    """Voxels that are NaN or +-inf in the stored array (0 for integer types, without reading them).

    Read with nibabel, unscaled: SimpleITK silently turns them into finite values.
    """
    img = _load(path, three_d=False)
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(img.dataobj.get_unscaled())))


def open_volume(path: str | Path) -> np.ndarray:
    """Memory-mapped ``(D, H, W)`` view of an uncompressed, unscaled NIfTI (no full decode)."""
    img = _load(path)
    if str(path).endswith(".gz"):
        raise VolumeReadError(f"{path}: compressed NIfTI cannot be memory-mapped")
    proxy = _unscaled(img.dataobj, path)
    try:
        arr = proxy.get_unscaled()
    except (ValueError, OSError) as exc:  # truncated file: mmap larger than the file
        raise VolumeReadError(f"truncated or unreadable NIfTI {path}: {exc}") from exc
    return arr.T


def _unscaled(proxy, path: str | Path):
    """``proxy`` (a volume's array proxy); ``VolumeReadError`` when its header scales the stored values."""
    if proxy.slope != 1.0 or proxy.inter != 0.0:
        raise VolumeReadError(f"{path}: scaled NIfTI (scl_slope={proxy.slope}, scl_inter={proxy.inter})")
    return proxy


def read_volume(path: str | Path) -> np.ndarray:
    """``(D, H, W)`` array of an unscaled NIfTI: memory-mapped (``open_volume``), or decoded when it is gzipped."""
    if not str(path).endswith(".gz"):
        return open_volume(path)
    check_complete(path)
    proxy = _unscaled(_load(path).dataobj, path)
    try:
        return np.asarray(proxy.get_unscaled()).T
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise VolumeReadError(f"corrupt NIfTI {path}: {exc}") from exc


def read_geometry(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing_xyz, origin_xyz, direction) from the header only."""
    return geometry_from_affine(_load(path).affine)


def read_spacing_xyz(path: str | Path) -> tuple[float, float, float]:
    """Voxel spacing (x, y, z) in mm from the header only."""
    spacing = read_geometry(path)[0]
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def write_volume(path: str | Path, array_dhw: np.ndarray, spacing_xyz: Sequence[float],
                 origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
                 direction: Sequence[float] = IDENTITY_DIRECTION, *, compresslevel: int = 1) -> None:
    """Write a ``(D, H, W)`` array atomically (``atomic_output``).

    ``.nii`` is written uncompressed (the cache format); ``.nii.gz`` with gzip
    ``compresslevel`` (1 = fastest). The dtype is kept; no scaling is stored.
    """
    with atomic_output(path) as tmp:
        save_volume(tmp, array_dhw, spacing_xyz, origin_xyz, direction, compresslevel=compresslevel)


def save_volume(path: str | Path, array_dhw: np.ndarray, spacing_xyz: Sequence[float],
                origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
                direction: Sequence[float] = IDENTITY_DIRECTION, *, compresslevel: int = 1) -> None:
    """``write_volume`` without its own temporary: for a temporary of ``atomic_outputs``."""
    _save_nifti(nifti_image(array_dhw, spacing_xyz, origin_xyz, direction), Path(path), compresslevel)


def nifti_image(array_dhw: np.ndarray, spacing_xyz: Sequence[float], origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
                direction: Sequence[float] = IDENTITY_DIRECTION) -> nib.Nifti1Image:
    """In-memory NIfTI of a ``(D, H, W)`` array with SimpleITK (LPS) geometry, as ``write_volume`` stores it."""
    array_dhw = np.asarray(array_dhw)
    if array_dhw.ndim != 3:
        raise ValueError(f"expected a (D, H, W) array, got shape {array_dhw.shape}")
    img = nib.Nifti1Image(array_dhw.T, affine_from_geometry(spacing_xyz, origin_xyz, direction))
    img.header.set_data_dtype(array_dhw.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def _save_nifti(img: nib.Nifti1Image, path: Path, compresslevel: int) -> None:
    # nibabel's Opener picks gzip from the ".gz" suffix; the level is passed per file, never through
    # its process-global Opener.default_compresslevel
    level = {"compresslevel": compresslevel} if path.name.endswith(".gz") else {}
    with nib.openers.Opener(str(path), "wb", **level) as f:
        img.to_stream(f)


def scale_hu(array: np.ndarray, hu_window: Sequence[float] = (-1150, 350)) -> np.ndarray:
    """Clip HU to ``hu_window`` and scale linearly to float32 [0, 1] (lo -> 0, hi -> 1).

    ``array`` may be any view (a memory-mapped crop, flipped): the first pass reads
    it once and every later pass runs on a contiguous buffer.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if hi <= lo:
        raise ValueError(f"hu_window must be increasing, got {hu_window}")
    array = np.asarray(array)
    out = np.empty(array.shape, dtype=np.float32)
    width = np.float32(hi - lo)
    if np.issubdtype(array.dtype, np.integer):
        # for integers clip(x, lo, hi) == clip(x, ceil(lo), floor(hi)): stays in the input dtype
        info = np.iinfo(array.dtype)
        lo_i, hi_i = max(math.ceil(lo), info.min), min(math.floor(hi), info.max)
        clipped = np.clip(array, array.dtype.type(lo_i), array.dtype.type(hi_i),
                          out=np.empty(array.shape, dtype=array.dtype))
        if lo_i == lo and hi_i - lo_i <= info.max:  # shift exactly in the integer domain
            np.subtract(clipped, array.dtype.type(lo_i), out=clipped)
            np.divide(clipped, width, out=out, dtype=np.float32)
            return out
        np.subtract(clipped, np.float32(lo), out=out, dtype=np.float32)
    else:
        np.subtract(array, np.float32(lo), out=out, dtype=np.float32)
        np.clip(out, 0.0, width, out=out)
    out /= width
    return out


def list_volumes(data_root: str | Path, split: str) -> list[Path]:
    """Sorted processed image paths ``processed_{split}_images/*/*/*.nii``."""
    folder = Path(data_root) / f"processed_{split}_images"
    return sorted(p for p in folder.glob("*/*/*.nii") if not p.name.startswith("."))


def image_to_mask_path(path: str | Path) -> Path:
    """``.../processed_{split}_images/a/b/x.nii`` -> ``.../processed_{split}_masks/a/b/x.nii``."""
    path = Path(path)
    folder = path.parents[2]
    if not folder.name.endswith("_images"):
        raise ValueError(f"{path} is not inside a *_images folder")
    mask_folder = folder.with_name(folder.name[: -len("_images")] + "_masks")
    return mask_folder / path.relative_to(folder)
