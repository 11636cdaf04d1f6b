"""Distributed helpers that are no-ops on a single process (torchrun or plain python)."""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data.io import InUseError, run_lock

logger = logging.getLogger(__name__)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Init from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); else single process.

    Backend nccl with CUDA, gloo on CPU. Returns (rank, world_size, device).
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        logger.info("not launched by torchrun: single-process training")
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not is_dist():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_rank(), get_world_size(), device


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Mean of a float over ranks (the value itself on one process)."""
    if not is_dist():
        return value
    t = torch.tensor(float(value), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / get_world_size()


def broadcast_from_main(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself on a single process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error_on_any_rank(message: str | None) -> str | None:
    """The lowest rank's error message, on every rank (None when no rank has one): every rank stops
    together instead of the others waiting for the failed one."""
    if not is_dist():
        return message
    messages: list[str | None] = [None] * get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank() if is_dist() else int(os.environ.get("RANK", 0))
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    """Entry-point logging: INFO from rank 0 only, warnings and errors from every rank."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{os.environ.get('RANK', '0')}] %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter())
    handler.fvlm = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "fvlm", False)] + [handler]
    root.setLevel(level)


def gather_to_main(obj: object) -> list[object]:
    """Every rank's ``obj`` on rank 0 (a one-item list on a single process)."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * dist.get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out if is_main_process() else []


@contextmanager
def main_process_lock(path: str | Path, what: str) -> Iterator[None]:
    """Rank 0 holds ``data.io.run_lock(path)`` for the block; when another run holds it, every rank raises
    ``InUseError`` (rank 0 with the lock's message), so no rank goes on alone."""
    with ExitStack() as stack:
        error = ""
        if is_main_process():
            try:
                stack.enter_context(run_lock(path, what))
            except InUseError as e:
                error = str(e)
        if all_reduce_mean(float(bool(error))) > 0:
            raise InUseError(error or f"{what} is in use by another run (see rank 0)")
        yield


def destroy() -> None:
    """Tear down the process group, if any."""
    if is_dist():
        dist.destroy_process_group()
