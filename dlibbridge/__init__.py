"""dlibbridge: dlib DNN files ⇄ an editable tree ⇄ PyTorch, and back to dlib.

``codec`` (the file codec) never imports torch; the torch port (``port``) is imported lazily
so ``import dlibbridge`` stays cheap for tools that only read or rewrite files.  The package
map is docs/architecture.md.  Importing it, or calling it, never changes the process (threads,
environment, allocator): :func:`tune_cpu` does, when the application asks.
"""
from .codec.tree import (  # noqa: F401
    DlibFormatError, Details, Field, Model, AddLayer, InputLayer, TagOrSkip, TagOnInput,
    Repeat, Loss, ShapePredictor, load, loads, dumps, save,
)

__version__ = "0.1.0"

_LAZY = {
    "to_torch": "port.convert",
    "to_dlib": "port.convert",
    "cnn_face_detector": "port.mmod",
    "set_threads": "port.threads",
    "threads": "port.threads",
    "tune_cpu": "port.runtime",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dlibbridge' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{mod}", __name__), name)
