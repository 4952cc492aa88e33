"""dlibbridge: dlib DNN files ⇄ an editable tree ⇄ PyTorch, and back to dlib.

``format`` (the codec) never imports torch; torch-based parts are imported lazily so
``import dlibbridge`` stays cheap for tools that only read or rewrite files.
"""
from .format import (  # noqa: F401
    DlibFormatError, Details, Field, Model, AddLayer, InputLayer, TagOrSkip, TagOnInput,
    Repeat, Loss, ShapePredictor, load, loads, dumps, save,
)

__version__ = "0.1.0"

_LAZY = {
    "to_torch": "convert",
    "to_dlib": "convert",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dlibbridge' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{mod}", __name__), name)
