"""Work done in worker processes a few items ahead of the caller, results in order: the one
overlap mechanism behind ``embed`` (decoding chips) and ``evaluate`` (decoding chips, aligning
photos) while the network runs in the calling process.

Why processes and ordered results: decoding and dlib's detector hold the GIL for most of
their time, so threads would not run beside the network; and the callers pair each result
with its input (paths, cache keys) by position, so a run with workers must give exactly what
the same run without them gives.  Workers are started with ``spawn``: a fork of a process
whose OpenMP pool (torch's) is running can hang.  A worker starts in ~0.3 s under the
``dlibbridge`` command (whose import is torch-free); spawn also re-runs the top-level imports
of the calling script, so a script that imports torch at the top pays ~2 s more per worker.
Workers ignore Ctrl-C (only the calling process acts on it: it stops handing out work and
shuts the pool down), so an interrupted run prints no traceback from them.  Workers die with
their parent: a parent killed with -9 cannot shut its pool down, and its workers would go on
aligning for minutes (:func:`worker_pool`).
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

from ..errors import DlibbridgeError

T = TypeVar("T")
R = TypeVar("R")

#: Decoding a 150x150 chip costs 1/6-1/7 of embedding it on a CPU (docs/benchmarks.md): more
#: decoders than this cannot be kept busy by a CPU network.
MAX_DECODE_WORKERS = 4


class WorkerError(DlibbridgeError, RuntimeError):
    """A worker process died (a crash inside dlib, the OOM killer)."""


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(n_items: int, batch_size: int, *, aligning: bool = False) -> int:
    """Worker processes for ``n_items`` in batches of ``batch_size``.

    Decoding chips: none for a few batches (starting a worker costs ~1 s), else one per core
    beyond the first (the network takes the calling process's core), at most
    :data:`MAX_DECODE_WORKERS`.  Aligning photos (``aligning``): one per core — dlib's
    detector costs several times the network per face, so it is the stage to spread, and a
    batch of photos repays a worker's start-up many times over."""
    if aligning:
        return cores()
    if n_items < 8 * batch_size:
        return 0
    return max(1, min(MAX_DECODE_WORKERS, cores() - 1))


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes started inside this block ignore SIGINT from birth (the disposition is
    inherited through exec).  Ctrl-C reaches every process of the terminal's group; only the
    calling process should act on it, while workers finish the item in hand."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """The process pool of every parallel stage (``align -j``, ``embed``/``evaluate`` workers):
    spawned (see the module's docstring), each worker bound to this process's life."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """In a new worker: exit when ``parent`` dies, then the pool's own initializer.  Linux's
    parent-death signal does it at once; a thread watching the parent id covers other systems
    and the moment before the signal was armed."""
    import sys
    import threading
    import time
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="dlibbridge-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def prefetched(fn: Callable[[T], R], items: Iterable[T], workers: int, *, ahead: int | None = None,
               initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[R]:
    """``fn(item)`` for each item, in order.  ``workers`` = 0 calls ``fn`` here, when the
    caller asks for the next result; otherwise ``workers`` spawned processes work up to
    ``ahead`` items (default two per worker) ahead of the caller.  ``fn``, the items and
    ``initializer`` (run once in each worker, or here before the first item) must pickle.
    The pool is shut down however the caller stops (the end, an exception, Ctrl-C, closing
    the generator): unstarted items are cancelled, the ones in hand finished."""
    if workers < 0:
        raise ValueError("workers must be 0 or more")
    if workers == 0:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    from concurrent.futures.process import BrokenProcessPool
    ahead = max(workers, 2 * workers if ahead is None else ahead)   # the first submissions start every worker
    pool = worker_pool(workers, initializer, initargs)
    pending: deque = deque()
    todo = iter(items)
    try:
        with children_ignore_sigint():
            for item in todo:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    break
        while pending:
            fut = pending.popleft()
            nxt = next(todo, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            try:
                result = fut.result()
            except BrokenProcessPool:
                raise WorkerError("a worker process died (a crash inside dlib, or out of memory); finished work "
                                  "is kept — rerun with --workers 0 to find the input it stopped at") from None
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
