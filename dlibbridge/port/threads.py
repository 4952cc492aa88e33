"""CPU threads for the torch port on cores shared with other jobs.

torch's CPU kernels run on an OpenMP (libgomp) pool whose idle threads *spin* by default.
When another process holds one of the cores, every one of the ~150 parallel regions of a
forward pass ends in a barrier that a spinning thread wastes its time slice on: at batch 64
on 2 cores shared with other jobs the port ran 4–6× slower than with sleeping idle threads
(docs/benchmarks.md, ``tools/bench_embed.py --threads-study``).

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is first imported, and offers no call to
change it later.  Nothing here runs by itself — a library call never changes the process; the
application chooses, through :func:`dlibbridge.tune_cpu <dlibbridge.port.runtime.tune_cpu>`
(which the ``dlibbridge`` command calls at start-up):

* before torch is imported, :func:`prefer_passive_openmp` sets ``OMP_WAIT_POLICY=PASSIVE``
  unless the environment already chose a policy;
* after torch was imported with the spinning default, the only remedy left is to run no more
  threads than there are free cores: :func:`guard_spinning_pool`;
* :func:`set_threads` / :func:`threads` set the count explicitly (sized to the cores this
  process may use by default).

This module does not import torch at import time, so :func:`prefer_passive_openmp` can run
before it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import sys

_user_chose_threads = False
_guard_done = False


def prefer_passive_openmp() -> bool:
    """Before torch is imported: idle OpenMP threads will sleep (``OMP_WAIT_POLICY=PASSIVE``)
    unless the environment set a policy.  Returns whether it set the variable (never once
    torch is imported: libgomp has read the policy by then)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def openmp_wait_policy() -> str:
    """``"passive"``, ``"active"`` or ``"default"`` (libgomp's spin-then-sleep, the value
    that collapses on shared cores) — the policy torch's pool runs (or, before torch is
    imported, will run) under, as the environment names it."""
    p = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    return p if p in ("passive", "active") else "default"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other work keeps busy *now*: the machine's CPU time over ``interval``
    seconds (Linux ``/proc/stat``), this process sleeping meanwhile.  The 1-minute load
    average, used before, lags: for a minute after any heavy job (a test run, an align) it
    counted a busy core on an idle machine and halved torch's pool (measured 14x instead of
    25x dlib-bin).  Elsewhere the load average is the fallback."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]      # all, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def free_cores() -> int:
    """Available cores minus those other work keeps busy now (:func:`busy_cores`), at least 1."""
    n = available_cores()
    return max(1, min(n, n - math.floor(busy_cores() + 0.5)))


def set_threads(n: int | None = None) -> int:
    """Run torch's CPU kernels on ``n`` threads (default: :func:`available_cores`; with a
    spinning OpenMP pool :func:`free_cores`, because spinning threads on busy cores are what
    collapses).  Returns the previous count."""
    import torch
    global _user_chose_threads
    if n is None:
        n = free_cores() if _spinning_openmp() else available_cores()
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    _user_chose_threads = True
    return prev


@contextlib.contextmanager
def threads(n: int | None = None):
    """``with threads(n): ...`` — :func:`set_threads` for the block, the previous count after."""
    import torch
    prev = set_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)


def _spinning_openmp() -> bool:
    import torch
    return openmp_wait_policy() != "passive" and "OpenMP" in torch.__config__.parallel_info()


def guard_spinning_pool() -> tuple[int, int] | None:
    """When torch runs libgomp's spinning default and nobody chose a thread count
    (``OMP_NUM_THREADS``, :func:`set_threads`): shrink the pool to :func:`free_cores`, once
    per process.  Returns ``(before, after)`` when it changed the count, else None."""
    global _guard_done
    if _guard_done:
        return None
    _guard_done = True
    import torch
    if (_user_chose_threads or "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() < 2
            or not _spinning_openmp()):
        return None
    before = torch.get_num_threads()
    n = min(before, free_cores())
    if n == before:
        return None
    torch.set_num_threads(n)
    return before, n


__all__ = ["prefer_passive_openmp", "openmp_wait_policy", "available_cores", "free_cores",
           "set_threads", "threads", "guard_spinning_pool"]
