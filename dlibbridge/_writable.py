"""Checks that an output can be written, made before the work that produces it: a command
that computes for a minute and then finds a read-only folder, a full disk or a directory
where its file should go has wasted the minute and, worse, used to report the failure with
the name of its own temporary file instead of the user's path."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DlibbridgeError


class OutputError(DlibbridgeError, ValueError):
    """An output path that cannot be written; the message names the user's path."""


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def _probe(path: Path, option: str) -> None:
    """Create and remove a file of our own where ``path`` will be made: the only test that
    holds for root (``os.access`` says yes) and read-only mounts alike."""
    d = _existing_ancestor(path)
    if not d.is_dir():
        raise OutputError(f"cannot write {option} {path}: {d} is not a folder")
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise OutputError(f"cannot write {option} {path}: {d} is not writable ({e.strerror})") from None


def check_output_file(path: str | os.PathLike, option: str, need_bytes: int = 0) -> None:
    """``path`` will be written as a file: not a directory, in a writable folder with at
    least ``need_bytes`` free (twice that during the atomic replace is not needed: the old
    file is only unlinked at the rename)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    _probe(path, option)
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < need_bytes:
        raise OutputError(f"cannot write {option} {path}: {free / 2**20:.0f} MiB free, "
                          f"about {need_bytes / 2**20:.0f} MiB needed")


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """``path`` will be a folder we create or write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder")
    _probe(path / "x", option)
