"""Data-parallel training under ``torchrun``: the process group, each process's device, rank-0-only side effects.

Stages 1 and 3 join torchrun's process group themselves (``setup`` / ``distributed``) and wrap what they train in
``DistributedDataParallel`` (``wrap``). Launched without torchrun (no RANK / WORLD_SIZE / LOCAL_RANK in the
environment) every helper here is a no-op: one process, no process group, the same results as ever.

Under ``torchrun --nproc_per_node=N`` each process joins the group with NCCL when it trains on CUDA and Gloo on
the CPU (``GFENV_DIST_BACKEND=gloo`` forces Gloo, which also lets several processes share one GPU), and
``--device cuda`` means ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

BACKEND_VAR = "GFENV_DIST_BACKEND"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 and in a plain (non-distributed) run: the process that prints and writes files."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """``GFENV_DIST_BACKEND`` if set, else NCCL for CUDA and Gloo for the CPU."""
    backend = os.environ.get(BACKEND_VAR) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_VAR}={backend!r} is not supported; use 'nccl' (CUDA) or 'gloo'.")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"The NCCL backend needs CUDA, but the device is {device}; unset {BACKEND_VAR} or use "
                         f"--device cuda.")
    return backend


def local_device(device: str | torch.device) -> torch.device:
    """The device this process trains on: under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type != "cuda" or not launched():
        return device
    local, per_node = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ValueError("--device cuda but no CUDA device is visible to this process.")
    if local >= gpus and backend_for(device) == "nccl":
        raise ValueError(f"torchrun started {per_node} processes on this node, which has {gpus} GPU(s): NCCL needs "
                         f"one GPU per process; use --nproc_per_node={gpus} (or {BACKEND_VAR}=gloo to share GPUs).")
    wanted = torch.device("cuda", local % gpus)
    if device.index is not None and device.index != wanted.index and per_node > 1:
        raise ValueError(f"Under torchrun with {per_node} processes per node, process LOCAL_RANK={local} trains on "
                         f"{wanted}, not {device}; pass --device cuda.")
    return wanted if device.index is None else device


def setup(device: str | torch.device = "cpu") -> tuple[torch.device, bool]:
    """Join torchrun's process group when launched by it and not yet joined.

    Returns (the device this process trains on, whether this call created the group: then ``cleanup`` it).
    """
    dev = local_device(device)
    if not launched() or is_initialized():
        return dev, False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    dist.init_process_group(backend, **({"device_id": dev} if backend == "nccl" else {}))
    return dev, True


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """``with distributed(device) as dev:`` joins torchrun's group for the block (a no-op without torchrun) and
    yields this process's device; the group is left at the end only if this block created it."""
    dev, created = setup(device)
    try:
        yield dev
    finally:
        if created:
            cleanup()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a dataset download), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def rank_seed(seed: int, process: int | None = None) -> int:
    """A seed of its own for each rank; rank 0 keeps ``seed``, so a one-process run is unchanged."""
    process = rank() if process is None else process
    return (seed + process * 0x9E3779B97F4A7C15) % 2**63


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch of indices: every ``world_size``-th, starting at ``rank``."""
    return indices[rank()::world_size()] if is_initialized() else indices


def per_rank(count: int) -> int:
    """A global count (images, episodes) split over the ranks, rounded up."""
    return -(-count // world_size())


def wrap(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` inside a process group, else ``module`` itself.

    DDP averages the gradients of the parameters that require them over the ranks during ``backward``; it only
    sees the passes that go through its ``forward``, so wrap a module whose forward computes the loss.
    """
    if not is_initialized():
        return module
    ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` when ``skip`` (a non-final micro-batch of gradient accumulation), else nothing."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a no-op in one process); returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so that all ranks hold the model rank 0
    saves (DDP already keeps the parameters equal)."""
    if not is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


class GracefulStop:
    """Ctrl-C for a process group: ``with GracefulStop() as stop:`` and ``if stop.requested(): ...`` once per step.

    A KeyboardInterrupt in one process would leave the others blocked in a collective, and torchrun passes Ctrl-C
    (SIGINT) and SIGTERM on to every process. Inside a process group the block therefore turns both signals into a
    flag; ``requested()`` (a collective: every rank calls it at the same point) is true on every rank as soon as
    any rank got one, so all ranks stop after the same step. torchrun kills processes still running 30 s later.
    Outside a process group nothing changes: Ctrl-C raises KeyboardInterrupt and ``requested()`` is False.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.flag = False
        self.agreed = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __enter__(self) -> GracefulStop:
        if is_initialized():
            try:
                self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
            except ValueError:  # not the main thread: signals cannot be caught here
                self._previous = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self) -> bool:
        if not is_initialized():
            return False
        flag = torch.tensor([float(self.flag)], device=self.device)
        self.agreed = bool(all_reduce_sum(flag).item() > 0)
        return self.agreed
