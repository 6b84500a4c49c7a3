"""Processes and devices: torchrun / DistributedDataParallel (NCCL on GPU, gloo on CPU).

Launch with ``torchrun --nproc_per_node=N train.py CONFIG`` (``NPROC=N bash train.sh ...``);
a plain ``python train.py`` is one process. Work is split with :class:`ShardSampler`, which
gives rank r the indices r, r + W, r + 2W, ... without padding, so evaluation counts summed
over ranks equal the single-process counts exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_processes(device_name: str = "auto") -> ProcessInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessInfo(rank, world_size, local_rank, device)


def close_processes() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class ShardSampler(Sampler[int]):
    """Indices ``start + rank, start + rank + W, ...`` below ``num_items``, at most ``limit``.

    Args:
        num_items: dataset length.
        rank, world_size: this process and the number of processes.
        limit: the number of indices this rank yields (None = all of its share); training
            uses the same limit on every rank so that they step together.
        skip: leading indices of this rank's share to leave out (a resumed epoch).
    """

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, limit: int | None = None, skip: int = 0):
        self.indices = list(range(rank, num_items, world_size))
        if limit is not None:
            self.indices = self.indices[:limit]
        self.indices = self.indices[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
