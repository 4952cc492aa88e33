"""The one way dlibbridge reads back a file it wrote (checkpoints, saved models, caches, arrays).

Everything the tool reads back may have been edited, truncated by a full disk or a kill, or
replaced by someone else's file; a pickle can run any code as it loads.  So every torch file is
read with ``torch.load(weights_only=True)`` — tensors, containers and plain values only; the
numpy scalars and dtypes our records hold are the only globals added, and they build values,
not code — and every NumPy file with ``allow_pickle=False``.  A file that cannot be read this way
is one :class:`DamagedFileError` line naming it and what to do, never a traceback.  torch is
imported only inside :func:`read_torch` (this module sits below the codec).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DlibbridgeError


class DamagedFileError(DlibbridgeError, ValueError):
    """A file the tool wrote earlier that is damaged, truncated, foreign or unsafe to load."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _numpy_value_globals() -> list:
    """What a pickled numpy scalar or dtype needs (a validation record's ``np.float64``): the
    scalar constructor and the dtype classes, none of which call anything user-supplied."""
    import numpy as np
    out = [np.dtype, np.core.multiarray.scalar] if hasattr(np, "core") else [np.dtype]
    out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return out


def read_torch(path: str | os.PathLike, *, what: str, advice: str = "", map_location="cpu"):
    """``torch.load(path, weights_only=True)``; any failure (a truncated or corrupt file, a
    pickle that asks for code) is a :class:`DamagedFileError` "PATH: not a readable WHAT
    (reason); ADVICE"."""
    import pickle
    import warnings

    import torch
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: no such {what}" + (f"; {advice}" if advice else ""))
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_value_globals()):
            warnings.simplefilter("ignore")      # numpy's core → _core rename notice
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError) as e:
        raise DamagedFileError(f"{path}: not a readable {what} ({_first_line(e)})"
                               + (f"; {advice}" if advice else "")) from None


def read_npz(path: str | os.PathLike, *, what: str, advice: str = "") -> dict:
    """Every array of an ``.npz`` (or the one array of an ``.npy``, under key ``""``), loaded
    with ``allow_pickle=False`` into memory; a damaged or object-array file is one line."""
    import zipfile

    import numpy as np
    path = Path(path)
    try:
        with open(path, "rb") as f:
            got = np.load(f, allow_pickle=False)
            if isinstance(got, np.ndarray):
                return {"": got}
            with got:
                return {k: got[k] for k in got.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DamagedFileError(f"{path}: not a readable {what} ({_first_line(e)})"
                               + (f"; {advice}" if advice else "")) from None


def npz_names(path: str | os.PathLike) -> list[str]:
    """The array names of an ``.npz`` (``allow_pickle=False``), without reading the arrays:
    what recognising a file needs, not a multi-GB load."""
    import zipfile

    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError, EOFError, AttributeError, TypeError, zipfile.BadZipFile) as e:
        raise DamagedFileError(f"{path}: not a readable .npz ({_first_line(e)})") from None


__all__ = ["DamagedFileError", "read_torch", "read_npz", "npz_names"]
