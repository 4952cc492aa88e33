"""Faces of photos (or chips) → descriptors, and the threshold a model is used at: the pieces
shared by the jobs that come after a fine-tune (``compare``, ``identify``, ``cluster``) and by
:mod:`dlibbridge.face_recognition`.

Photos go through the one alignment path (:func:`dlibbridge.data.align.align_photo`: dlib's
detector, 5-point landmarks, ``get_face_chip``; decoded by
:func:`dlibbridge.data.images.read_image`), so a face gives the descriptor dlib's own pipeline
gives; a file that is already 150x150 is taken as an aligned chip, as ``evaluate`` takes it.

The threshold: a fine-tune run folder's ``summary.json`` records the distance threshold it
recommends for its models (``recommended_threshold``, written by ``finetune --camera``); a
model file that the run lists among its ``files`` is used at that threshold unless one is
given, any other model at dlib's 0.6.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.align import DETECTORS, AlignSettings, Source, align_photo, hog_detector_pickle, use_hog_detector_pickle
from ..data.images import ImageReadError, is_chip_sized, is_image_file, read_image, walk_files
from ..errors import DlibbridgeError
from ..options import option
from .embedders import EMBED_DIM, Embedder, ModelSpec, make_embedder
from .metrics import DLIB_THRESHOLD

RUN_SUMMARY = "summary.json"      # what a fine-tune run folder records about its exported models


class FacesError(DlibbridgeError, ValueError):
    """Inputs the face jobs cannot use (no photos, no face, a bad threshold)."""


@dataclass(frozen=True)
class Threshold:
    """A distance threshold and where it came from (said beside every decision)."""
    value: float
    source: str


def model_threshold(model: str | os.PathLike, given: float | None = None) -> Threshold:
    """The threshold ``model`` is used at: ``given``; else the recommended threshold of the
    fine-tune run whose ``summary.json`` (beside the model) lists the model among its files;
    else dlib's 0.6."""
    if given is not None:
        if not (0 < given < 4):          # descriptors are unit-length-ish: distances lie in [0, 2]
            raise FacesError(f"--threshold {given} is not a distance between 0 and 4")
        return Threshold(float(given), "given")
    path = Path(model)
    summary = path.parent / RUN_SUMMARY
    if path.is_file() and summary.is_file():
        try:
            run = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            run = {}
        rec = run.get("recommended_threshold") if isinstance(run, dict) else None
        if path.name in (run.get("files") or []) and isinstance(rec, dict) and rec.get("threshold"):
            return Threshold(float(rec["threshold"]), f"the run's recommended threshold ({summary})")
    return Threshold(DLIB_THRESHOLD, "dlib's default")


@dataclass
class ModelOptions:
    """How the face jobs name their model, device and threshold."""
    model: str = option("default", "dlib .dat, a fine-tune run's model.dat or model.pt, TorchScript or ONNX file; "
                        "'default' = dlib's model", flags=("--model", "-m"), metavar="MODEL")
    engine: str = option("torch", "run .dat models through the torch port (default) or the dlib package itself",
                         choices=("torch", "dlib"))
    device: str = option("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    threshold: float | None = option(None, "same person below this descriptor distance (default: the run's "
                                     "recommended threshold for a fine-tuned model.dat/model.pt, else dlib's 0.6)",
                                     type=float, metavar="T")
    detector: str = option("hog", "face detector for photos (150x150 files are taken as aligned chips)",
                           choices=DETECTORS, show_default=False)
    upsample: int = option(1, "detector upsampling", metavar="N")

    def embedder(self, batch_size: int = 64) -> Embedder:
        return make_embedder(ModelSpec.parse(self.model, self.engine), device=self.device,
                             batch_size=batch_size)

    def threshold_for(self) -> Threshold:
        return model_threshold(ModelSpec.parse(self.model, self.engine).path, self.threshold)

    def align_settings(self, multi: str) -> AlignSettings:
        return AlignSettings(detector=self.detector, upsample=self.upsample, multi=multi)


@dataclass
class Face:
    """One face found in ``file``: its number in the photo (``index``, 0 for a chip), its box
    (left, top, right, bottom, inclusive as dlib; None for a chip) and descriptor."""
    file: Path
    index: int
    box: tuple[int, int, int, int] | None
    descriptor: np.ndarray


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, and the image files below each folder (recursive, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(p / rel for rel in walk_files(p) if is_image_file(rel))
        elif p.is_file():
            out.append(p)
        else:
            raise FacesError(f"{p} does not exist")
    return out


def _faces_in(task: tuple) -> list[tuple] | str:
    """One file in a worker: its (chip, index, box) faces, or why it has none."""
    path, chips_dir, settings, stem = task
    try:
        if is_chip_sized(path):
            return [(read_image(path).rgb, 0, None)]
        rows = align_photo(path.parent, chips_dir, Source(path.name, "", stem), settings, "")
        faces = [(read_image(Path(chips_dir) / r["chip"]).rgb, int(r["face"]),
                  tuple(int(r[k]) for k in ("left", "top", "right", "bottom")))
                 for r in rows if r.get("chip")]
    except ImageReadError as e:
        return e.reason
    return faces or (rows[0].get("reason") or rows[0]["status"])


def describe(files: Sequence[Path], embedder: Embedder, settings: AlignSettings, *, workers: int = 0,
             batch_size: int = 64, progress: bool = False, desc: str = "faces") -> tuple[list[Face], list[tuple[Path, str]]]:
    """Every face of ``files`` that ``settings.multi`` keeps (``all``: every face; ``largest``,
    ``center``: one per photo) with its descriptor, in file order, and the files without a
    face with the reason.  ``workers`` processes detect and align while the network embeds."""
    from tqdm import tqdm

    from ..data.prefetch import prefetched
    faces: list[Face] = []
    failed: list[tuple[Path, str]] = []
    pending: list[tuple] = []

    def flush():
        if pending:
            vecs = embedder.embed(np.stack([chip for _, _, chip, _ in pending]))
            faces.extend(Face(f, k, box, v) for (f, k, _, box), v in zip(pending, vecs))
            pending.clear()

    hog = hog_detector_pickle() if workers and settings.detector == "hog" else None
    with tempfile.TemporaryDirectory(prefix="dlibbridge-faces-") as chips_dir:
        tasks = [(Path(f), chips_dir, settings, str(i)) for i, f in enumerate(files)]
        results = prefetched(_faces_in, tasks, workers, initializer=use_hog_detector_pickle, initargs=(hog,))
        with contextlib.closing(results), tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
            for f, got in zip(files, results):
                if isinstance(got, str):
                    failed.append((Path(f), got))
                else:
                    pending.extend((Path(f), k, chip, box) for chip, k, box in got)
                if len(pending) >= batch_size:
                    flush()
                bar.update(1)
        flush()
    return faces, failed


def descriptors(faces: Sequence[Face]) -> np.ndarray:
    return np.stack([f.descriptor for f in faces]) if faces else np.zeros((0, EMBED_DIM), np.float32)
