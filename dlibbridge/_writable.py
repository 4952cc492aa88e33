"""Checks that an output can be written, made before the work that produces it: a command
that computes for a minute and then finds a read-only folder, a full disk or a directory
where its file should go has wasted the minute and, worse, used to report the failure with
the name of its own temporary file instead of the user's path."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DlibbridgeError
from ._paths import check_link


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


def check_output_file(path: str | os.PathLike, option: str, need_bytes: int = 0, *,
                      kind: str | None = None, is_kind: Callable[[Path], bool] | None = None) -> None:
    """``path`` will be written as a file: not a directory, in a writable folder with at
    least ``need_bytes`` free (the old file is only unlinked at the rename).  An existing file
    is replaced only when ``is_kind`` recognises it as what we write (``kind``, e.g. "a dlib
    DNN file"): a rerun replaces its own output, never a photo or a document typed as -o."""
    path = Path(path)
    check_link(path, option)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    if is_kind is not None and path.is_file() and not _safely(is_kind, path):
        raise OutputError(f"{option} {path} exists and is not {kind}; refusing to replace it "
                          "(remove it or choose another name)")
    _probe(path, option)
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < need_bytes:
        raise OutputError(f"cannot write {option} {path}: {free / 2**20:.0f} MiB free, "
                          f"about {need_bytes / 2**20:.0f} MiB needed")


def _safely(is_kind: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(is_kind(path))
    except Exception:       # any failure to recognise the file means it is not ours to replace
        return False


def is_zip(path: Path) -> bool:
    import zipfile
    return zipfile.is_zipfile(path)


def is_onnx(path: Path) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x08"


def is_embeddings(path: Path) -> bool:
    from ._load import npz_names
    return "embeddings" in npz_names(path)


def is_results_json(path: Path) -> bool:
    import json
    return "schema_version" in json.loads(path.read_text())


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """``path`` will be a folder we create or write into."""
    path = Path(path)
    check_link(path, option)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder")
    _probe(path / "x", option)
