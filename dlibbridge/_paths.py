"""Paths the tool reads back from its own files, and paths it is handed, made safe in one place.

dlibbridge writes records that name other files: align's ``manifest.csv`` and
``.align/journal.jsonl``, a report's ``.dlibbridge-report.json``, a chip store's ``index.json``,
pairs files.  Those records live in folders a user can edit, copy or receive from someone else,
so a row naming ``../elsewhere/x.jpg``, ``/etc/passwd`` or a symlink that leads out of the
folder must not make the tool read, pack, copy or delete a file outside it.
:func:`confined` is the one rule: a record's path is relative, has no ``..`` component, and
still lies inside its folder once every symlink is resolved; anything else is an
:class:`UnsafePathError` naming the file and the line it came from.

:func:`resolved` is the other boundary: ``Path.resolve`` raises ``RuntimeError`` on a symlink
loop in Python < 3.13 (a traceback), and a loop or a dangling link otherwise reads as the
misleading "no such file"; every user-given path that is resolved goes through it.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path

from ._io import sha256_file
from .errors import DlibbridgeError


class UnsafePathError(DlibbridgeError, ValueError):
    """A path in a file the tool reads back that leads outside its folder."""


class BadPathError(DlibbridgeError, ValueError):
    """A path given by the user that cannot be followed (a symlink loop, a dangling link)."""


def resolved(path: str | os.PathLike, what: str = "") -> Path:
    """``Path(path).resolve()`` with a one-line error for a symlink loop instead of a traceback."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    try:
        r = p.resolve()
    except (RuntimeError, OSError) as e:      # 3.11/3.12: RuntimeError("Symlink loop ..."); 3.13: OSError(ELOOP)
        raise BadPathError(f"{label} is a symlink loop") from None
    return r


def check_link(path: str | os.PathLike, what: str) -> None:
    """Refuse a path that is a symlink leading nowhere (a loop, or a missing target), with
    what it is, before it is read or written: otherwise it is a traceback or "no such file"
    naming a path that exists as a link."""
    p = Path(path)
    if not p.is_symlink():
        return
    try:
        os.stat(p)
    except OSError as e:
        kind = "a symlink loop" if e.errno == 40 else f"a symlink to a missing {os.readlink(p)}"
        raise BadPathError(f"{what} {p} is {kind}") from None


class Folder:
    """The folder of a record file, whose paths are confined to it (:func:`confined` is this for
    one path).  Resolved sub-folders are cached, so a manifest of 100,000 rows costs a few
    microseconds a row (one ``lstat``) instead of a full ``resolve`` each.  ``links=False``
    skips the symlink test, for the user's own input folders (a folder of links to photos is
    a normal way to make a data set; only the tool's folders must not lead out)."""

    def __init__(self, root: str | os.PathLike, source: str | os.PathLike, *, links: bool = True):
        self.root, self.source, self.links = Path(root), source, links
        self._base: Path | None = None
        self._dirs: dict[str, bool] = {}

    def path(self, rel: str, line: int | None = None) -> Path:
        """``root / rel`` for a path ``rel`` read at ``line`` of the record file: relative, no
        ``..``, no drive, no NUL, and inside the folder after resolving symlinks; else
        :class:`UnsafePathError` naming the file and the line."""
        where = f"{self.source}" + (f" line {line}" if line is not None else "")
        if not isinstance(rel, str) or not rel or "\0" in rel:
            raise UnsafePathError(f"{where}: {rel!r} is not a file name")
        # plain string tests: this runs once per row of a manifest (pathlib costs 10x more)
        if rel.startswith(("/", "\\")) or rel[1:2] == ":":
            raise UnsafePathError(f"{where}: {rel!r} is an absolute path; only paths inside {self.root} are followed")
        if ".." in rel.replace("\\", "/").split("/"):
            raise UnsafePathError(f"{where}: {rel!r} climbs out with '..'; only paths inside {self.root} are followed")
        if not self.links:
            return self.root / rel
        parent = posixpath.dirname(rel)
        inside = self._dirs.get(parent)
        if inside is None:
            inside = self._dirs[parent] = self._inside(self.root / parent, where, rel)
        if inside and os.path.islink(os.path.join(self.root, rel)):
            inside = self._inside(self.root / rel, where, rel)
        if not inside:
            raise UnsafePathError(f"{where}: {rel!r} leads outside {self.root} through a symlink")
        return self.root / rel

    def _inside(self, path: Path, where: str, rel: str) -> bool:
        try:
            if self._base is None:
                self._base = self.root.resolve()
            return path.resolve().is_relative_to(self._base)
        except (RuntimeError, OSError):
            raise UnsafePathError(f"{where}: {rel!r} is a symlink loop") from None


def confined(root: str | os.PathLike, rel: str, *, source: str | os.PathLike, line: int | None = None,
             links: bool = True) -> Path:
    """``root / rel`` for one path ``rel`` read from the file ``source``: :meth:`Folder.path`."""
    return Folder(root, source, links=links).path(rel, line)


def is_recorded(root: str | os.PathLike, rel: str, sha256: str | None, *, source: str | os.PathLike) -> bool:
    """``root / rel`` is a regular file (not a link), inside ``root``, whose bytes still hash to
    the ``sha256`` the tool recorded when it wrote it: the only kind of file the tool replaces
    or deletes."""
    if not sha256:
        return False
    path = confined(root, rel, source=source)
    if path.is_symlink() or not path.is_file():
        return False
    return sha256_file(path) == sha256


def remove_recorded(root: str | os.PathLike, rel: str, sha256: str | None, *, source: str | os.PathLike) -> bool:
    """The one way the tool deletes a file it wrote earlier: only when :func:`is_recorded`
    holds; anything else (edited since, replaced by the user, outside ``root``) stays.  True
    when it was removed."""
    if not is_recorded(root, rel, sha256, source=source):
        return False
    (Path(root) / rel).unlink()
    return True


__all__ = ["UnsafePathError", "BadPathError", "resolved", "check_link", "Folder", "confined", "is_recorded",
           "remove_recorded"]
