"""Where dlib's model files live on this machine.

dlib's own models ship in the PyPI package ``face_recognition_models``.  Importing that
package fails with current setuptools (its ``__init__`` imports ``pkg_resources``), so we
locate its files with ``importlib.util.find_spec`` without executing it.  Nothing is ever
downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from ._paths import check_link
from .errors import DlibbridgeError

FACE_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_5 = "shape_predictor_5_face_landmarks.dat"
CNN_FACE_DETECTOR = "mmod_human_face_detector.dat"


class ModelNotFoundError(DlibbridgeError, FileNotFoundError):
    pass


class ModelPathError(DlibbridgeError, ValueError):
    """A model argument that names a directory: every command taking a model says so in the
    same words, before it reads or writes anything."""


def face_recognition_models_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the PyPI package 'face_recognition_models' is not installed "
            "(pip install face_recognition_models); it carries dlib's model files")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "models"
        if d.is_dir():
            return d
    raise ModelNotFoundError("face_recognition_models is installed but has no models/ folder")


def model_path(name: str) -> Path:
    """Path of one of dlib's model files from ``face_recognition_models``."""
    p = face_recognition_models_dir() / name
    if not p.is_file():
        raise ModelNotFoundError(f"{name} not found in {p.parent}")
    return p


def face_model_path() -> Path:
    return model_path(FACE_MODEL)


def landmarks5_path() -> Path:
    return model_path(LANDMARKS_5)


def cnn_face_detector_path() -> Path:
    return model_path(CNN_FACE_DETECTOR)


def resolve_model(spec: str | os.PathLike | None, what: str = "model") -> Path:
    """The model file a user named: None, "" or ``default`` (unless a file of that name
    exists) is dlib's installed face model, anything else the path as given.  A directory is
    refused here, the one place every command's model goes through (``what`` names the
    argument in the message, e.g. ``--base``)."""
    if not spec or (os.fspath(spec) == "default" and not Path(spec).exists()):
        return face_model_path()
    path = Path(spec)
    check_link(path, what)
    if path.is_dir():
        raise ModelPathError(f"{what} {path} is a directory, expected a model file (a dlib .dat, or a "
                             "dlibbridge checkpoint where the command takes one)")
    return path


def sample_chips_dir() -> Path:
    """25 aligned 150×150 chips of 5 people shipped inside the package (dlib's public-domain
    example faces, provenance in sample/README.md beside them): enough to calibrate ``unfreeze`` on a
    machine that has no faces of its own yet."""
    return Path(__file__).resolve().parent / "sample" / "johns"


def default_output_path(model: os.PathLike | str, suffix: str) -> Path:
    """``<name><suffix>.dat`` in the current directory (never next to, or over, the input)."""
    stem = Path(model).name
    if stem.endswith(".dat"):
        stem = stem[:-4]
    return Path.cwd() / f"{stem}{suffix}.dat"


def is_torch_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a zip archive — torch.save's format (a model.pt this package
    wrote, or TorchScript) — rather than a dlib file; torch-free, so commands that read dlib
    files can tell the two apart without importing torch."""
    try:
        if not os.path.isfile(path):    # a pipe (inspect /dev/stdin): peeking would eat its first bytes
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False
