"""Process-group helpers shared by training and evaluation under ``torchrun``.

torchrun starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables. :func:`init_from_env` joins that group (gloo on CPU, NCCL on CUDA); everything else here works
the same whether or not a group exists, so single-process code paths need no special cases.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process group (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun described, if any. Returns True when running distributed.

    The backend follows the device: NCCL for CUDA (each rank takes GPU ``LOCAL_RANK``), gloo otherwise.
    Calling it again, or without torchrun, is a no-op.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints and results."""
    return rank() == 0


def device_for_rank(device: str | torch.device) -> torch.device:
    """``cuda`` means this rank's GPU under torchrun; other devices pass through."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[Any], rank_: int | None = None, world: int | None = None) -> list[Any]:
    """This rank's share of ``items``: every ``world``-th item starting at ``rank`` (order kept)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return [items[i] for i in range(rank_, len(items), world)]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, produced by this program), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
