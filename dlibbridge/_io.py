"""Writing outputs without ever leaving a half-written file, and hashing inputs.

Every file dlibbridge writes goes through :func:`write_atomic`: a temporary file beside the
target (same folder, so the rename cannot cross file systems), flushed, then renamed over the
target — an interrupted run leaves the old file or the new one, never a torn one.
:func:`replace_verified` adds a check of the written bytes before the rename, for outputs that
are re-read by their consumer (a dlib file loaded in dlib) before they may replace anything.
The typed writers only turn an object into bytes, in the one spelling each format has here.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from .errors import DlibbridgeError

TMP_PREFIX = ".tmp-"     # every temporary file dlibbridge makes starts so

T = TypeVar("T")


class WriteError(DlibbridgeError, OSError):
    """Writing an output failed part-way (a full disk, a read-only file system, no
    permission): the message names the user's path, never the temporary file the bytes were
    going to, and the temporary file is gone."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        super().__init__(f"cannot write {os.fspath(path)}: {cause.strerror or cause}")
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, os.fspath(path)

    def __str__(self) -> str:
        return self.args[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True,
                 shown_as: str | os.PathLike | None = None, tmp_dir: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename, so a
    crash never leaves a half-written file where a good one is expected.  ``fsync=False`` for
    files that can always be remade (aligned chips: the fsync cost 10 % of an align run).
    ``tmp_dir``: a folder of the tool's own on the same file system for the temporary file, so
    that the leftovers of a killed run can be removed without touching the user's files.
    A failing write raises :class:`WriteError` naming ``shown_as`` (default ``path``)."""
    path = os.fspath(path)
    d = os.fspath(tmp_dir) if tmp_dir is not None else os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.basename(path), dir=d)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(shown_as or path, e) from None
        raise


def replace_verified(path: str | os.PathLike, data: bytes, verify: Callable[[Path], T]) -> T:
    """Write ``data`` to a temporary file beside ``path``, run ``verify(tmp)`` (which re-reads
    it and raises if it is wrong), and only then rename it to ``path``.  Returns what
    ``verify`` returned; on any failure ``path`` is untouched and the temporary file gone."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{TMP_PREFIX}{os.getpid()}-{out.name}")
    try:
        write_atomic(tmp, data, shown_as=out)
        result = verify(tmp)
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise WriteError(out, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return result


def json_bytes(obj, *, indent: int | None = 2, newline: bool = True, **dumps) -> bytes:
    return (json.dumps(obj, indent=indent, **dumps) + ("\n" if newline else "")).encode("utf-8")


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, newline: bool = True,
               fsync: bool = True, **dumps) -> None:
    """``json.dumps(obj, indent=…, **dumps)`` (+ newline), written atomically."""
    write_atomic(path, json_bytes(obj, indent=indent, newline=newline, **dumps), fsync=fsync)


def csv_bytes(rows: Iterable[dict], fields: list[str]) -> bytes:
    """CSV with a header row, ``\\n`` line ends, None as an empty cell, unknown keys ignored."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue().encode("utf-8")


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str]) -> None:
    write_atomic(path, csv_bytes(rows, fields))


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` (uncompressed), written atomically."""
    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def write_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)``, written atomically (torch is imported only here)."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def png_bytes(rgb) -> bytes:
    """Lossless PNG of a uint8 RGB image (H, W, 3), as OpenCV encodes it."""
    import cv2
    import numpy as np
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
