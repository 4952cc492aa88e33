"""glibc's heap for CPU inference: keep freed feature maps for the next batch.

A forward pass of the face ResNet allocates and frees ~50 MB of feature maps per batch of 64
in blocks of 1–17 MB.  glibc serves blocks above its mmap threshold (dynamic, from 128 KiB)
with fresh ``mmap`` pages and trims freed memory at the top of the heap above 2× that
threshold, so every batch faults its feature maps in again: ~13,000 minor page faults per
forward, ~18% of a forward's time on this project's VMs (faults are expensive in a VM;
the forward ran 1.27× faster without them: tools/bench_embed.py, docs/benchmarks.md).
:func:`reuse_freed_memory` (run by ``dlibbridge.tune_cpu``, never by a loader) sets both
thresholds once, so blocks up to :data:`MMAP_THRESHOLD` come from the heap and up to
:data:`TRIM_THRESHOLD` of freed memory stays mapped for reuse: no faults after the first
batch, bit-identical results.

The environment's choice wins, as with ``OMP_WAIT_POLICY`` (:mod:`.threads`): nothing is
changed when ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a
``glibc.malloc`` tunable is set, or on a C library other than glibc (an allocator preloaded
in its place, jemalloc or tcmalloc, keeps its own policy: glibc's ``mallopt`` is not called).
The cost: a process that once held a large working set keeps up to ``TRIM_THRESHOLD`` of it
mapped after freeing it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's ceiling for the mmap threshold on 64-bit (``4 MiB × sizeof(long)``).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ENV_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: bool | None = None


def environment_chose() -> bool:
    """Whether the environment already sets glibc's heap thresholds."""
    return any(k in os.environ for k in _ENV_CHOICES) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def in_effect() -> bool:
    """Whether :func:`reuse_freed_memory` set the thresholds in this process."""
    return bool(_applied)


def reuse_freed_memory() -> bool:
    """Once per process: glibc keeps freed feature maps for reuse (see the module docstring).
    Returns whether this call set the thresholds (False when an earlier call did, or when the
    environment or the C library keeps its own policy)."""
    global _applied
    if _applied is not None:
        return False
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or environment_chose():
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        _applied = False
    return _applied


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "environment_chose", "in_effect", "reuse_freed_memory"]
