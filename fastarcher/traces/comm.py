"""Cross-rank plumbing of the traces: gather per-rank payloads to rank 0 and share rank 0's metrics.

torch.distributed is used only when it is initialised with more than one process. Payloads are
pickled CPU objects (numpy arrays), sent over gloo: with an NCCL default group a gloo side group is
made once (a collective: every rank must build its tracers in the same order).
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["TraceComm"]


class TraceComm:
    """Rank, world size and the object collectives the traces need."""

    def __init__(self, rank: int, world_size: int, where: str):
        initialised = dist.is_available() and dist.is_initialized()
        if initialised:
            if rank != dist.get_rank() or world_size != dist.get_world_size():
                raise ValueError(
                    f"{where}: rank/world_size ({rank}/{world_size}) differ from torch.distributed "
                    f"({dist.get_rank()}/{dist.get_world_size()})"
                )
        elif world_size != 1 or rank != 0:
            raise ValueError(f"{where}: rank/world_size ({rank}/{world_size}) need an initialised torch.distributed "
                             "process group")
        self.rank = rank
        self.world_size = world_size
        self.group = None
        if initialised and world_size > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, payload: Any) -> list[Any] | None:
        """Every rank's payload on rank 0 (in rank order), None elsewhere."""
        if self.group is None:
            return [payload]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(payload, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
