"""Make the ``face_recognition`` package use another face model — dlib's file after a
fine-tune — and that model's threshold.

``face_recognition`` computes every encoding with one module-level network,
``face_recognition.api.face_encoder = dlib.face_recognition_model_v1(<dlib's model file>)``,
and decides matches with ``compare_faces(known, candidate, tolerance=0.6)``.  :func:`use_model`
swaps that network for the given model and makes the run's threshold the default tolerance
of ``compare_faces`` (both spellings, ``face_recognition.compare_faces`` and
``face_recognition.api.compare_faces``), and restores both on exit::

    import face_recognition
    from dlibbridge.face_recognition import use_model

    with use_model("runs/cam1/model.dat") as model:      # or a run's model.pt, or its folder
        known = face_recognition.face_encodings(face_recognition.load_image_file("alice.jpg"))[0]
        enc = face_recognition.face_encodings(face_recognition.load_image_file("door.jpg"))
        face_recognition.compare_faces([known], enc[0])  # at model.threshold
        model.threshold                                   # the tolerance now in use

How the tolerance maps: ``tolerance`` is a distance between descriptors, the same quantity as
dlib's threshold, the run's recommended threshold (``summary.json``) and ``--threshold`` of
``dlibbridge compare/identify/cluster``.  ``compare_faces`` counts a distance *equal* to the
tolerance as a match, dlib and dlibbridge count it as different; only an exact tie differs.
A tolerance passed explicitly still wins.

The swap is of module attributes of ``face_recognition``: it holds for every thread until the
block ends, so use one model at a time.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .assets import resolve_model
from .errors import DlibbridgeError
from .eval.faces import Threshold, model_threshold


class FaceRecognitionError(DlibbridgeError, ImportError):
    """The face_recognition package is missing or cannot start."""


@dataclass(frozen=True)
class UsedModel:
    """What :func:`use_model` put in place: the dlib file face_recognition runs, and the
    threshold its ``compare_faces`` now defaults to."""
    dat: Path
    threshold: float
    threshold_source: str


def _import_face_recognition():
    try:
        import face_recognition
        import face_recognition.api
    except ImportError as e:
        raise FaceRecognitionError(f"face_recognition is not importable ({e}); install it with "
                                   "`pip install --no-deps face_recognition 'setuptools<80' Click`") from None
    return face_recognition


def _model_file(model: str | os.PathLike) -> Path:
    """A run folder names its model.dat; ``default`` dlib's model."""
    path = Path(model)
    return path / "model.dat" if path.is_dir() else resolve_model(model)


@contextlib.contextmanager
def use_model(model: str | os.PathLike = "default", threshold: float | None = None) -> Iterator[UsedModel]:
    """Within the block, ``face_recognition`` encodes with ``model`` (a dlib .dat, a
    dlibbridge checkpoint such as a run's model.pt, a run folder, or ``default``) and
    ``compare_faces`` defaults to ``threshold`` (default: the run's recommended threshold,
    else dlib's 0.6).  See the module docstring."""
    import dlib

    from .port.checkpoint import sniff
    fr = _import_face_recognition()
    api = fr.api
    path = _model_file(model)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    thr: Threshold = model_threshold(path, threshold)
    with contextlib.ExitStack() as stack:
        dat = path
        if sniff(path) != "dat":             # a torch checkpoint: dlib runs its .dat export
            from .port.checkpoint import load_model
            from .port.convert import to_dlib
            dat = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dlibbridge-fr-"))) / "model.dat"
            to_dlib(load_model(path), dat, check=True)
        try:
            encoder = dlib.face_recognition_model_v1(str(dat))
        except RuntimeError as e:
            raise ValueError(f"dlib cannot load {path} as a face recognition model: {e}") from None
        saved = api.face_encoder, api.compare_faces, fr.compare_faces
        original = saved[1]

        def compare_faces(known_face_encodings, face_encoding_to_check, tolerance=thr.value):
            return original(known_face_encodings, face_encoding_to_check, tolerance)

        compare_faces.__doc__ = original.__doc__
        api.face_encoder, api.compare_faces, fr.compare_faces = encoder, compare_faces, compare_faces
        try:
            yield UsedModel(dat, thr.value, thr.source)
        finally:
            api.face_encoder, api.compare_faces, fr.compare_faces = saved


__all__ = ["use_model", "UsedModel", "FaceRecognitionError"]
