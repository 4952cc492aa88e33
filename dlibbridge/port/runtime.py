"""What every model loader of the ports does before CPU inference, in one place: a thread
pool that does not collapse on shared cores (:mod:`.threads`) and a heap that keeps freed
feature maps for the next batch (:mod:`.heap`).  Both defer to the environment's choices."""
from __future__ import annotations

from . import heap, threads


def prepare_cpu() -> None:
    """Once-per-process settings (each function remembers it ran); cheap to call again."""
    threads.guard_spinning_pool()
    heap.reuse_freed_memory()


__all__ = ["prepare_cpu"]
