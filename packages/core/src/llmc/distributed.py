"""Data-parallel calibration over ``torch.distributed``: who this process is, and the collectives
modifiers reduce their statistics with.

Under ``torchrun --nproc-per-node N -m llmc oneshot ...`` (or inside a process group the
caller made) every rank loads the model, calibrates on its share of the batches and, at
each layer's end, modifiers sum (or take the extremes of) what the ranks saw, so every
rank computes the same compression; solves are spread over the ranks and their results
broadcast; rank 0 saves. Outside a process group of more than one rank every function here
is the single-process identity, so modifiers call them unconditionally.

A rank that fails records why in the process group's store and leaves the group; the
others' next collective then fails with :class:`DistributedError` naming it, and nothing is
saved.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_FAILED = "llmc/failed"
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DistributedError(RuntimeError):
    """Another rank stopped: this one cannot go on (its collectives would never complete)."""


def is_distributed() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """The rank that saves and logs per-run summaries (rank 0; the only one outside a group)."""
    return rank() == 0


def initialize() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment), NCCL
    on GPUs, gloo on CPU; a group the caller initialised is used as it is. Returns whether
    this run is distributed."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_group)
        logger.info("Rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return is_distributed()


def _leave_group() -> None:
    """Leave the group :func:`initialize` joined before the interpreter's teardown (it stays for
    later runs in the process until then). Left to the teardown, gloo's threads once aborted a
    rank that had finished and saved ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device | None:
    """This rank's accelerator under a distributed run (``cuda:LOCAL_RANK``), else None."""
    if not is_distributed() or not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _failure() -> str | None:
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.check([_FAILED]):
            return store.get(_FAILED).decode()
    except Exception:  # noqa: BLE001 - the store lives on rank 0, which may be the one gone
        return None
    return None


def _collective(run: Callable[[], Any]) -> Any:
    try:
        return run()
    except DistributedError:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise several types when a peer leaves
        reason = _failure()
        if reason is None:
            raise DistributedError(f"A collective failed ({exc}); another rank probably stopped. Nothing is saved.") from exc
        raise DistributedError(f"{reason}. This rank stops too; nothing is saved.") from exc


def report_failure(exc: BaseException) -> None:
    """Tell the other ranks why this one stops (through the store) and leave the group, so
    their collectives fail instead of waiting for it."""
    if not is_distributed() or isinstance(exc, DistributedError):
        return
    try:
        dist.distributed_c10d._get_default_store().set(_FAILED, f"Rank {rank()} failed: {type(exc).__name__}: {exc}")
    except Exception:  # noqa: BLE001 - best effort: leaving the group is what unblocks the others
        pass
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ranks, in place (through the backend's device if it lives
    elsewhere), and return it. The identity outside a distributed run."""
    if not is_distributed():
        return tensor
    device = _comm_device()
    work = tensor if tensor.device == device else tensor.to(device)
    _collective(lambda: dist.all_reduce(work, op=_OPS[op]))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """``src``'s ``tensor`` on every rank, in place; the identity outside a distributed run."""
    if not is_distributed():
        return tensor
    device = _comm_device()
    work = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    _collective(lambda: dist.broadcast(work, src=src))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; CPU tensors only), in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(gathered, obj))
    return gathered


def barrier() -> None:
    if is_distributed():
        _collective(lambda: dist.all_reduce(torch.zeros(1, device=_comm_device())))


def assign(costs: Sequence[float]) -> list[int]:
    """An owner rank for each piece of work of the given costs (largest first to the least
    loaded rank): the same answer on every rank, so each knows whose results to receive."""
    load = [0.0] * world_size()
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner = min(range(len(load)), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += costs[i]
    return owners


class RankShard:
    """Every ``world``-th batch of a loader from the ``rank``-th: each rank's share of the
    calibration set (batch ``k`` of rank ``r`` is batch ``k * world + r`` of the whole)."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.rank, None, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.loader), self.world))  # type: ignore[arg-type]


def _fingerprint(loader: Iterable[Any]) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    for batch in loader:
        count += 1
        for key in sorted(batch) if isinstance(batch, dict) else ():
            value = batch[key]
            if isinstance(value, torch.Tensor):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return count, digest.hexdigest()


def shard_calibration_data(loader: Iterable[Any]) -> Iterable[Any]:
    """This rank's share of the calibration batches.

    When every rank holds the same data (the same script on every rank), rank ``r`` takes
    batches ``r, r + N, ...``; when their data differ, each rank's is taken as its share
    already (the caller split it). Refuses fewer batches than ranks before any work."""
    if not is_distributed():
        return loader
    prints = all_gather_object(_fingerprint(loader))
    if len(set(prints)) > 1:
        logger.info("The ranks' calibration data differ: each rank calibrates on its own (%s batches).",
                    ", ".join(str(count) for count, _ in prints))
        if min(count for count, _ in prints) == 0:
            raise ValueError("A rank has no calibration batches: give every rank at least one.")
        return loader
    count = prints[0][0]
    if count < world_size():
        raise ValueError(
            f"{count} calibration batches for {world_size()} ranks: every rank needs at least one; "
            "raise num_calibration_samples or run on fewer ranks."
        )
    logger.info("Every rank holds the same %d calibration batches: rank %d of %d takes batches %d, %d, ...",
                count, rank(), world_size(), rank(), rank() + world_size())
    return RankShard(loader, rank(), world_size())
