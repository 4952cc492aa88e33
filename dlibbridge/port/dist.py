"""Processes launched by ``torchrun``: the rank, world size and device of this one, and the few
collectives the jobs need — DDP fine-tuning (``train.loop``) and the sharded bulk work of
``embed`` and ``evaluate`` (each rank a contiguous share of the images, gathered by rank 0)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"        # where collective tensors live (NCCL needs CUDA tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def shard(self, n: int, unit: int = 1) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``n`` items, cut at multiples of
        ``unit`` (a batch): every rank's batches are then batches a single process makes, so the
        merged result is the single-process result bit for bit (a network's output for one
        image moves in the last bits with the other images of its batch)."""
        units = -(-n // unit)
        lo, hi = (min(n, r * units // self.world * unit) for r in (self.rank, self.rank + 1))
        return lo, hi

    def gather_obj(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast_obj(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU (and for
    jobs whose collectives carry only Python objects: pass ``"cpu"``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Dist(tdist.get_rank(), tdist.get_world_size(), local,
                f"cuda:{local}" if backend == "nccl" else "cpu")


def rank_device(device: str, dist: Dist) -> str:
    """``cuda`` without an index (or ``auto`` on a GPU machine) names this process's GPU
    (``LOCAL_RANK``) under torchrun."""
    if device == "auto":
        from .device import resolve_device
        device = str(resolve_device(device))
    return f"cuda:{dist.local_rank}" if dist.world > 1 and device == "cuda" else device
