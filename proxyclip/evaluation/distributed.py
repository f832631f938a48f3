"""Process groups for ``torchrun``: shard images, sum confusion matrices (gloo on CPU, NCCL on GPUs).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is the single-process
identity, so the evaluation code has one path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group ``torchrun`` describes (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Backend: NCCL when ``device`` is CUDA, else gloo. Returns rank 0 of 1 outside torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def shard(indices: Sequence[int], info: DistInfo) -> List[int]:
    """This process's share: every ``world_size``-th index from ``rank`` (balanced to within one)."""
    return list(indices)[info.rank :: info.world_size]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over all processes (int64 counts stay exact)."""
    if not info.enabled:
        return t
    dev = torch.device(f"cuda:{info.local_rank}") if info.backend == "nccl" else torch.device("cpu")
    buf = t.to(dev).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
