"""One process at a time in a folder the tool owns while it works.

Two ``finetune --out RUN`` started a fraction of a second apart, or a ``--resume RUN`` while RUN
is still training, used to run side by side and replace each other's files.  Every command that
owns a folder (a run folder, align's and evaluate's chip folders, a report, a store being packed)
holds :func:`folder_lock` on it for as long as it writes there.

The lock is ``flock(2)`` on a small file (``.dlibbridge.lock`` in the folder, or a named file
beside it): the kernel drops it when its holder dies, so a lock left by a process killed with -9
is taken over by the next command with nothing to clean up, and no stale-pid guessing.  The
file records who holds it (pid, command, host, start time) for the refusal message.  It is
removed on release; the inode is compared after locking, so a command that opened the file just
before its holder removed it retries on the new one instead of locking a file nobody else sees.
Cost: a few syscalls and a 100-byte write per command, 0.3–0.5 ms on ext4 (tests/test_hostile.py::test_lock_cost
prints it).  Nothing is flushed: the file only has to exist while its holder lives.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ._io import WriteError
from .errors import DlibbridgeError

LOCK_NAME = ".dlibbridge.lock"


class LockedError(DlibbridgeError, OSError):
    """Another process holds the folder (its pid and command are in the message)."""

    def __str__(self) -> str:
        return self.args[0]


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return (f"{info.get('command', 'dlibbridge')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
                f"since {time.strftime('%H:%M:%S', time.localtime(info.get('started', 0)))})")
    except (OSError, ValueError, AttributeError):
        return "another dlibbridge process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, *, lock_file: str | os.PathLike | None = None,
                create: bool = True) -> Iterator[Path]:
    """Hold ``folder`` (created when ``create``, and removed again at the end if it is still
    empty) for this process, or raise :class:`LockedError` naming the holder.  ``lock_file`` overrides where the lock lives (for a folder that does not
    exist yet and appears by a rename, e.g. a chip store: a file beside it)."""
    folder = Path(folder)
    made = create and lock_file is None and not folder.exists()
    if made:
        folder.mkdir(parents=True, exist_ok=True)
    path = Path(lock_file) if lock_file is not None else folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError(folder, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise LockedError(f"{folder} is in use by {who}; wait for it to finish or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)              # its holder removed it between our open and our lock: retry
    try:
        who = json.dumps({"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                          "started": time.time(), "argv": sys.argv[1:]}).encode("utf-8")
        os.pwrite(fd, who, 0)
        os.ftruncate(fd, len(who))    # after the write: ext4 flushes a file truncated to 0 on close (ms)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)       # still ours: we hold the lock on this very inode
        os.close(fd)
        if made:                  # a job refused before it wrote anything leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()


__all__ = ["LOCK_NAME", "LockedError", "folder_lock"]
