"""The process-wide CPU settings the torch port runs fastest under, applied only when the
application asks (:func:`tune_cpu`, ``dlibbridge.tune_cpu``): a library call — ``to_torch``,
a loader, an embedder, the detector — never changes threads, environment or allocator of the
process it runs in.  The ``dlibbridge`` command calls :func:`tune_cpu` at start-up.

What each setting buys is measured in docs/benchmarks.md (``tools/bench_embed.py``):

* idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, :mod:`.threads`): beside one busy
  process 1.5–1.7× faster than libgomp's spinning default (4–6× on a loaded 2-core machine),
  0.77–1.06× of it on an idle machine;
* glibc keeps freed feature maps (:mod:`.heap`): no page faults per forward after the first,
  1.27× faster forward passes on this project's VMs;
* torch imported before :func:`tune_cpu` (the policy is fixed by then): a spinning pool is
  shrunk to the cores free at call time, the one remedy left.

Each defers to the environment's own choice (``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS``,
glibc's ``MALLOC_*`` variables and tunables) and to :func:`~.threads.set_threads`.
"""
from __future__ import annotations

import sys

from . import heap, threads


def tune_cpu() -> list[str]:
    """Apply the settings above to this process; returns one line per change it made (empty
    when nothing was left to change, e.g. on a second call: it is idempotent).  Call it
    before importing torch to get the sleeping pool; afterwards only the thread count can
    still help."""
    changed = []
    if threads.prefer_passive_openmp():
        changed.append("OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep)")
    if heap.reuse_freed_memory():
        changed.append(f"glibc heap keeps freed memory (mmap threshold {heap.MMAP_THRESHOLD >> 20} MiB, "
                       f"trim threshold {heap.TRIM_THRESHOLD >> 20} MiB)")
    if "torch" in sys.modules:
        sized = threads.guard_spinning_pool()
        if sized is not None:
            changed.append(f"torch threads {sized[0]} -> {sized[1]} (torch was imported first with "
                           f"OpenMP's spinning pool; set OMP_WAIT_POLICY=PASSIVE or call tune_cpu() "
                           f"before importing torch to keep every core)")
    return changed


__all__ = ["tune_cpu"]
