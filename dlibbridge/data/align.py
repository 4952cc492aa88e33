"""Photos → aligned 150×150 face chips, exactly as dlib prepares them for its face network.

``compute_face_descriptor(img, shape)`` crops with ``get_face_chip_details(shape, 150, 0.25)``;
a chip made any other way (another detector, another landmark model, another crop) shifts
every descriptor.  So this module uses only dlib's own pieces: its HOG detector (or the CNN
detector ``mmod_human_face_detector.dat``), its 5-point landmark model, and
``dlib.get_face_chip(img, shape, size=150, padding=0.25)``; photos are decoded by
:func:`dlibbridge.data.images.read_image` (dlib's JPEG decoder by default).

:func:`align` runs that over a folder tree:

* layout: ``RAW_DIR/<identity>/**/photo`` (dlib's metric-learning example, FaceNet), or a flat
  folder of photos (no identities, e.g. for embedding);
* chips are PNG (lossless) at the mirrored path under ``OUT_DIR``, written atomically;
* ``manifest.csv`` has one row per chip or per photo without one (with the status/reason),
  ``summary.json`` the counts; both are rewritten atomically at the end of each run;
* exact duplicates (same bytes) are found first and not processed twice;
* the work is spread over a process pool with a progress bar; every finished photo is
  appended to ``OUT_DIR/.align/journal.jsonl``, so an interrupted run continues where it
  stopped and a finished one reruns in seconds.

``manifest.csv`` columns: ``source`` (path under RAW_DIR), ``identity`` (first sub-folder, ''
in a flat folder), ``status`` (:data:`STATUSES`), ``reason`` (for ``error``: a
``data.REASONS`` code or ``processing_failed``), ``chip`` (path under OUT_DIR), ``n_faces``
(detections in the photo), ``face`` (index of this chip among the photo's chips), ``score``
(detector score; empty for the fallback box), ``left top right bottom`` (the box, inclusive,
dlib's convention), ``landmarks`` (the 5 points, ``x0 y0 … x4 y4``), ``width height`` (after
EXIF orientation), ``orientation``, ``decoder`` (dlib or pillow), ``sha256`` (of the file),
``duplicate_of`` and ``note`` (decoder warnings, error details).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import pickle
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import assets
from .images import CHIP_SIZE, DECODERS, DEFAULT_MAX_PIXELS, ImageReadError, read_image, walk_files
from .prefetch import children_ignore_sigint, cores, worker_pool
from .._lock import folder_lock
from .._paths import Folder, check_link, resolved
from .._io import TMP_PREFIX, png_bytes, sha256_file, write_atomic, write_csv, write_json
from ..errors import DlibbridgeError
from ..options import option

__all__ = ["CHIP_SIZE", "CHIP_PADDING", "DETECTORS", "MULTI_POLICIES", "FALLBACKS", "CNN_PRECISIONS", "CENTER_BOX_FRACTION",
           "MANIFEST_FIELDS", "STATUSES", "RETRY_REASONS", "AlignError", "OutputError", "AlignSettings", "Face",
           "FaceAligner", "pyramid_up", "frontal_face_detector", "hog_detector_pickle", "use_hog_detector_pickle", "center_box",
           "choose_faces", "Source", "process_photo", "align_photo", "list_sources", "default_jobs", "Journal", "align",
           "write_manifest", "read_manifest", "format_summary"]

CHIP_PADDING = 0.25   # compute_face_descriptor's padding at CHIP_SIZE: the chip the network was trained on

DETECTORS = ("hog", "cnn")
#: Arithmetic of ``--detector cnn`` (the torch port, :mod:`dlibbridge.port.mmod`): ``float32``
#: finds dlib's rectangles; ``bfloat16`` runs its convolutions in bfloat16 (AMX / AVX-512
#: bf16 CPUs: several times faster) and is not dlib-exact (docs/benchmarks.md, bench_detect).
CNN_PRECISIONS = ("float32", "bfloat16")
MULTI_POLICIES = ("largest", "center", "all", "skip")
FALLBACKS = ("center",)

#: Side of the ``--fallback center`` box as a fraction of min(height, width), centred: the
#: median HOG box on the pre-cropped celeba-dev photos (LFW-style 250×250 crops → ~90 px).
CENTER_BOX_FRACTION = 0.36

MANIFEST_FIELDS = (
    "source", "identity", "status", "reason", "chip", "n_faces", "face", "score",
    "left", "top", "right", "bottom", "landmarks", "width", "height", "orientation",
    "decoder", "sha256", "duplicate_of", "note",
)
#: ``status`` values.  ``error`` rows carry a :data:`dlibbridge.data.images.REASONS` code in ``reason``,
#: or ``processing_failed`` when dlib failed on a decoded image (detail in ``note``).
STATUSES = ("ok", "fallback", "no_face", "multiple_faces", "duplicate", "error")

STATE_DIR = ".align"
_JOURNAL = "journal.jsonl"
_TMP = "tmp"            # temporaries of chip writes (renamed into place when complete)
_LOCK = "lock"
_SETTINGS = "settings.json"


class AlignError(DlibbridgeError, ValueError):
    """A run that cannot start (bad folders, settings that contradict an earlier run) or
    cannot go on (chips cannot be written)."""


class OutputError(AlignError):
    """Writing into OUT_DIR failed (disk full, permissions): every later photo would fail the
    same way, so the run stops; what is done is kept and a rerun continues."""


#: Reasons that may not hold next time (a file being copied, a transient dlib failure): a
#: resumed run tries these photos again instead of reusing the recorded failure.
RETRY_REASONS = frozenset({"unreadable", "processing_failed"})


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """Everything that changes the chips.  A resumed run must use the same settings."""

    detector: str = option("hog", "dlib's HOG detector (default) or its CNN mmod_human_face_detector, run by "
                           "dlibbridge's torch port (the same rectangles as dlib's, batched, faster)", choices=DETECTORS)
    upsample: int = option(1, "upsample the image N times before detecting (default 1, as dlib's examples)", metavar="N")
    cnn_precision: str = option("float32", "arithmetic of --detector cnn: float32 (default: dlib's boxes) or "
                                "bfloat16 (faster on CPUs with AMX; NOT dlib-exact: on ~3%% of photos a box sits "
                                "one window position away from dlib's)", choices=CNN_PRECISIONS)
    detector_model: str | None = option(None, "the CNN detector's .dat for --detector cnn (default dlib's "
                                        "mmod_human_face_detector; e.g. one made by dlibbridge finetune-detector)",
                                        metavar="DET.dat")
    multi: str | None = option(None, "several faces in a photo: keep the largest, the most central, all, or skip the "
                               "photo (default: largest with identity folders, all in a flat folder)",
                               choices=MULTI_POLICIES)
    fallback: str | None = option(None, "no face found: take a central box (for pre-cropped sets such as LFW)",
                                  choices=FALLBACKS)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "decompression-bomb guard: refuse images with more pixels",
                             metavar="N")
    decoder: str = option("dlib", "JPEG decoder (default dlib's, for chips identical to dlib's pipeline)",
                          choices=DECODERS)
    landmarks_upsampled: bool = option(False, "predict the 5 landmarks on the photo upsampled as the detector saw it "
                                       "(--upsample >= 1), the chip cut from the photo with dlib's geometry: on ~30 px "
                                       "faces ~37%% less landmark error, descriptors no nearer the clean photo's "
                                       "(docs/benchmarks.md); not dlib's own chips", action="store_true")

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise AlignError(f"detector must be one of {DETECTORS}, not {self.detector!r}")
        if self.cnn_precision not in CNN_PRECISIONS:
            raise AlignError(f"cnn_precision must be one of {CNN_PRECISIONS}, not {self.cnn_precision!r}")
        if self.cnn_precision != "float32" and self.detector != "cnn":
            raise AlignError(f"cnn_precision {self.cnn_precision} applies to the cnn detector only")
        if self.detector_model is not None and self.detector != "cnn":
            raise AlignError("detector_model is a CNN detector's file: it needs detector cnn")
        if self.detector_model is not None and not Path(self.detector_model).is_file():
            raise AlignError(f"detector_model {self.detector_model}: no such file")
        if not (isinstance(self.upsample, int) and 0 <= self.upsample <= 8):
            raise AlignError(f"upsample must be an integer 0..8, not {self.upsample!r}")
        if self.multi is not None and self.multi not in MULTI_POLICIES:
            raise AlignError(f"multi must be one of {MULTI_POLICIES}, not {self.multi!r}")
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise AlignError(f"fallback must be one of {FALLBACKS} or None, not {self.fallback!r}")
        if self.max_pixels < 1:
            raise AlignError("max_pixels must be positive")
        if self.decoder not in DECODERS:
            raise AlignError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")

    @classmethod
    def for_camera(cls, camera: str | os.PathLike, **given) -> "AlignSettings":
        """The detector and upsampling ``dlibbridge camera`` found this camera's faces with
        (its profile's ``detection.setting``), under whatever is ``given`` explicitly."""
        from .camera import load_camera
        profile = load_camera(camera)
        setting = (profile.detection or {}).get("setting")
        if not setting:
            why = ("no setting found a face" if profile.detection else
                   "it has no detection measurement (made from chips, or by an older dlibbridge)")
            raise AlignError(f"{camera}: no detection setting in the camera profile ({why}); "
                             "rerun dlibbridge camera on the camera's photos")
        return cls(**{"detector": setting["detector"], "upsample": setting["upsample"], **given})


# --------------------------------------------------------------------------------------------
# One photo
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Face:
    """A detection: box (left, top, right, bottom, inclusive as dlib), score (None for the
    fallback box) and, once located, the 5 landmarks as a dlib ``full_object_detection``."""

    box: tuple[int, int, int, int]
    score: float | None
    shape: object = None
    #: where the chip is cut when the landmarks were predicted on the upsampled photo (dlib's
    #: ``chip_details``, mapped to the photo's coordinates); None: ``get_face_chip`` of ``shape``
    chip_details: object = None

    @property
    def area(self) -> int:
        l, t, r, b = self.box
        return (r - l + 1) * (b - t + 1)


_HOG_PICKLE: bytes | None = None


def frontal_face_detector():
    """``dlib.get_frontal_face_detector()``, fast after the first call in a process tree.

    Building it decodes the model embedded in dlib (3-4 s of CPU here); its pickle (dlib's own
    serialization) loads in ~10 ms.  The pickle is made once and handed to worker processes,
    so N workers do not each pay those seconds."""
    return pickle.loads(hog_detector_pickle())


def hog_detector_pickle() -> bytes:
    """The pickle :func:`frontal_face_detector` loads, made on the first call in this process;
    hand it to a worker process's :func:`use_hog_detector_pickle`."""
    global _HOG_PICKLE
    if _HOG_PICKLE is None:
        import dlib
        _HOG_PICKLE = pickle.dumps(dlib.get_frontal_face_detector())
    return _HOG_PICKLE


def use_hog_detector_pickle(data: bytes | None) -> None:
    """Make :func:`frontal_face_detector` load ``data`` (from :func:`hog_detector_pickle` in
    the parent process) instead of rebuilding dlib's model; a pool initializer."""
    global _HOG_PICKLE
    if data is not None:
        _HOG_PICKLE = data


class FaceAligner:
    """dlib's detector + 5-point landmarks + ``get_face_chip``, loaded once per process."""

    def __init__(self, detector: str = "hog", upsample: int = 1, cnn_factory=None, cnn_model=None,
                 landmarks_upsampled: bool = False):
        """``cnn_factory``: a picklable zero-argument callable returning a detector with
        ``det(images, upsample)`` → [[(l, t, r, b, confidence)]] (the torch port of dlib's CNN
        detector, handed down by the CLI: this package sits below the torch port); without
        it ``cnn`` runs dlib's own ``cnn_face_detection_model_v1`` on ``cnn_model`` (default
        dlib's face detector file).  ``landmarks_upsampled``: see :meth:`locate`."""
        import dlib

        self._dlib = dlib
        self.detector, self.upsample = detector, upsample
        self.landmarks_upsampled = landmarks_upsampled and upsample > 0
        self._upsampled_photo: tuple | None = None      # (photo, its upsampled copy), see _upsampled
        self._torch_cnn = None
        if detector == "hog":
            self._hog = frontal_face_detector()
        elif cnn_factory is not None:
            self._torch_cnn = cnn_factory()
        else:
            self._cnn = dlib.cnn_face_detection_model_v1(str(cnn_model or assets.cnn_face_detector_path()))
        self._landmarks = dlib.shape_predictor(str(assets.landmarks5_path()))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces dlib's detector finds, with its scores (threshold 0, dlib's default)."""
        if self.detector == "hog":
            rects, scores, _ = self._hog.run(rgb, self.upsample, 0.0)
            found = zip(rects, scores)
        elif self._torch_cnn is not None:
            return [Face((l, t, r, b), float(s)) for l, t, r, b, s in self._torch_cnn([rgb], self.upsample)[0]]
        else:
            found = ((d.rect, d.confidence) for d in self._cnn(rgb, self.upsample))
        return [Face((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in found]

    def locate(self, rgb: np.ndarray, face: Face) -> Face:
        """The 5 landmarks in ``face.box``.  With ``landmarks_upsampled`` they are predicted on
        the photo upsampled ``upsample`` times (dlib's ``pyramid_up``), in the box where the
        detector found the face there (``rect_up`` of the returned one): the shape predictor
        samples single pixels, and on a face of ~30 px they are too coarse.  The chip region
        is then dlib's ``get_face_chip_details`` of those landmarks, moved to the photo by the
        resize's own pixel map (``resize_image`` to 2·nr+1 × 2·nc+2 maps x to
        x·(2·nc+1)/(nc−1)), so the chip is cut once, from the photo, with dlib's geometry;
        ``face.shape`` holds the landmarks moved to the photo (rounded, for the manifest)."""
        dlib = self._dlib
        if not self.landmarks_upsampled:
            face.shape = self._landmarks(rgb, dlib.rectangle(*face.box))
            return face
        big, (fx, fy) = self._upsampled(rgb)
        box = np.array(face.box, np.float64)
        for _ in range(self.upsample):
            box = (box + np.array([1.25, 0.75, 1.25, 0.75])) * 2
        shape = self._landmarks(big, dlib.rectangle(*(int(v) for v in np.floor(box + 0.5))))
        face.shape = dlib.full_object_detection(dlib.rectangle(*face.box), [
            dlib.point(round(shape.part(i).x * fx), round(shape.part(i).y * fy)) for i in range(shape.num_parts)])
        d = dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
        r = d.rect
        face.chip_details = dlib.chip_details(dlib.drectangle(r.left() * fx, r.top() * fy, r.right() * fx,
                                                              r.bottom() * fy), dlib.chip_dims(d.rows, d.cols), d.angle)
        return face

    def _upsampled(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """``rgb`` upsampled ``upsample`` times and the factors (x, y) that map its pixels back;
        kept for the photo's other faces."""
        if self._upsampled_photo is None or self._upsampled_photo[0] is not rgb:
            big, fx, fy = rgb, 1.0, 1.0
            for _ in range(self.upsample):
                nr, nc = big.shape[:2]
                fx, fy = fx * (nc - 1) / (2 * nc + 1), fy * (nr - 1) / (2 * nr)
                big = pyramid_up(big)
            self._upsampled_photo = (rgb, big, (fx, fy))
        return self._upsampled_photo[1], self._upsampled_photo[2]

    def chip(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        if face.chip_details is not None:
            return self._dlib.extract_image_chip(rgb, face.chip_details)
        return self._dlib.get_face_chip(rgb, face.shape, size=CHIP_SIZE, padding=CHIP_PADDING)


def pyramid_up(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img, pyramid_down<2>)`` of an RGB uint8 image: its bilinear
    ``resize_image`` to (2·nr + 1) × (2·nc + 2) (``rect_up`` of the image rectangle, rounded),
    run by the ``dlib`` package itself, so bit-identical by construction and ~3x faster than
    the same arithmetic in torch ops."""
    import dlib
    nr, nc = img.shape[:2]
    return dlib.resize_image(np.ascontiguousarray(img), 2 * nr + 1, 2 * nc + 2)


def center_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The ``--fallback center`` box: a centred square of CENTER_BOX_FRACTION·min(h, w)."""
    side = max(1, round(CENTER_BOX_FRACTION * min(height, width)))
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side - 1, top + side - 1)


def choose_faces(faces: list[Face], policy: str, height: int, width: int) -> list[Face]:
    """Apply the several-faces policy; ``skip`` gives [] for more than one face."""
    if len(faces) <= 1 or policy == "all":
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))
    if policy == "skip":
        return []
    if policy == "largest":
        return [max(faces, key=lambda f: (f.area, f.score))]
    cy, cx = (height - 1) / 2, (width - 1) / 2

    def distance(f: Face) -> float:
        l, t, r, b = f.box
        return ((l + r) / 2 - cx) ** 2 + ((t + b) / 2 - cy) ** 2
    return [min(faces, key=lambda f: (distance(f), -f.area))]


def _landmark_text(shape) -> str:
    return " ".join(f"{shape.part(i).x} {shape.part(i).y}" for i in range(shape.num_parts))


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file: ``rel`` (posix path under RAW_DIR), its identity ('' in a flat
    folder) and the chip path stem under OUT_DIR (mirrors ``rel``)."""

    rel: str
    identity: str
    chip_stem: str


def process_photo(aligner: FaceAligner, raw_dir: Path, out_dir: Path, src: Source,
                  settings: AlignSettings, policy: str, sha256: str) -> list[dict]:
    """Manifest rows for one photo, its chips written (atomically) under ``out_dir``."""
    base = {"source": src.rel, "identity": src.identity, "sha256": sha256}
    try:
        photo = read_image(raw_dir / src.rel, max_pixels=settings.max_pixels, decoder=settings.decoder)
    except ImageReadError as e:
        return [dict(base, status="error", reason=e.reason, note=e.detail)]
    rgb = photo.rgb
    h, w = rgb.shape[:2]
    base.update(width=w, height=h, orientation=photo.orientation, decoder=photo.decoder, note=photo.note)
    faces = aligner.detect(rgb)
    base["n_faces"] = len(faces)
    status = "ok"
    if not faces:
        if settings.fallback != "center":
            return [dict(base, status="no_face")]
        faces, status = [Face(center_box(h, w), None)], "fallback"
    chosen = choose_faces(faces, policy, h, w)
    if not chosen:
        return [dict(base, status="multiple_faces")]
    rows = []
    for k, face in enumerate(chosen):
        aligner.locate(rgb, face)
        chip_rel = src.chip_stem + (f".face{k}.png" if policy == "all" else ".png")
        path = out_dir / chip_rel
        chip = png_bytes(aligner.chip(rgb, face))
        try:
            if path.parent not in _MADE_DIRS:
                path.parent.mkdir(parents=True, exist_ok=True)
                _MADE_DIRS.add(path.parent)
            # a chip can always be remade from its photo; its temporary file goes to align's own
            # folder, the only place a later run removes leftovers from
            write_atomic(path, chip, fsync=False, tmp_dir=out_dir / STATE_DIR / _TMP)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e}") from None
        l, t, r, b = face.box
        rows.append(dict(base, status=status, chip=chip_rel, face=k,
                         score="" if face.score is None else repr(face.score),
                         left=l, top=t, right=r, bottom=b, landmarks=_landmark_text(face.shape)))
    return rows


def _rows_or_failure(aligner: FaceAligner, raw_dir: Path, out_dir: Path, src: Source, settings: AlignSettings,
                     policy: str, sha256: str) -> list[dict]:
    """:func:`process_photo`, with a failure inside dlib recorded as the photo's row (a bug or
    a dlib failure on one photo must not end a 10-hour run); chips that cannot be written
    stop the run (:class:`OutputError`)."""
    try:
        return process_photo(aligner, raw_dir, out_dir, src, settings, policy, sha256)
    except OutputError:
        raise
    except Exception as e:
        return [{"source": src.rel, "identity": src.identity, "sha256": sha256, "status": "error",
                 "reason": "processing_failed", "note": f"{type(e).__name__}: {e}"}]


# Worker-process state: one aligner per process, built by the pool initializer, and the
# chip folders this process already created (a mkdir per chip is measurable).
_WORKER: dict = {}
_MADE_DIRS: set = set()
_ALIGNERS: dict = {}     # (detector, upsample) → this process's aligner, for align_photo


def _init_worker(settings: AlignSettings, raw_dir: str, out_dir: str, policy: str,
                 hog_pickle: bytes | None = None, cnn_factory=None) -> None:
    use_hog_detector_pickle(hog_pickle)
    _WORKER.update(aligner=FaceAligner(settings.detector, settings.upsample, cnn_factory, settings.detector_model,
                                       settings.landmarks_upsampled),
                   settings=settings,
                   raw_dir=Path(raw_dir), out_dir=Path(out_dir), policy=policy)


def _work(task: tuple[Source, str]) -> tuple[Source, str, list[dict]]:
    src, sha = task
    w = _WORKER
    return src, sha, _rows_or_failure(w["aligner"], w["raw_dir"], w["out_dir"], src, w["settings"], w["policy"], sha)


def align_photo(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, src: Source, settings: AlignSettings,
                sha256: str) -> list[dict]:
    """One photo's manifest rows, its chips written under ``out_dir``: what :func:`align`'s
    workers do for each photo, for callers that hand photos to processes of their own
    (``evaluate`` aligns the next batches while the network embeds this one) and record the
    rows in a :class:`Journal`.  ``settings.multi`` must be set (the policy); the aligner
    (dlib's CNN detector, not the torch port, for ``cnn``) is built once per process."""
    key = (settings.detector, settings.upsample)
    if key not in _ALIGNERS:
        _ALIGNERS[key] = FaceAligner(*key)
    return _rows_or_failure(_ALIGNERS[key], Path(raw_dir), Path(out_dir), src, settings, settings.multi, sha256)


# --------------------------------------------------------------------------------------------
# A folder
# --------------------------------------------------------------------------------------------

def list_sources(raw_dir: str | os.PathLike) -> list[Source]:
    """Every file under ``raw_dir`` (hidden files and folders excluded), sorted, with its
    identity (first sub-folder) and a collision-free chip stem."""
    rels = walk_files(raw_dir)
    stems = Counter(r.rsplit(".", 1)[0] if "." in r.rsplit("/", 1)[-1] else r for r in rels)
    sources = []
    for rel in rels:
        parts = rel.split("/")
        stem = rel.rsplit(".", 1)[0] if "." in parts[-1] else rel
        # a.jpg and a.png in one folder would both become a.png: keep their full names.
        sources.append(Source(rel, parts[0] if len(parts) > 1 else "", stem if stems[stem] == 1 else rel))
    return sources


def default_jobs() -> int:
    """Alignment processes: one per core."""
    return cores()


class Journal:
    """``OUT_DIR/.align/journal.jsonl``: one JSON line per finished photo (its manifest rows,
    sha256, size and mtime), appended and flushed as each photo finishes, so an interrupted
    run keeps every photo it finished.  Opening it refuses an OUT_DIR whose chips were made
    with other settings and removes the temporaries of interrupted chip writes.  Kept by
    :func:`align`, and by callers that align photo by photo with :func:`align_photo`."""

    def __init__(self, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: AlignSettings,
                 redo: bool = False, command: str = "dlibbridge align"):
        self.raw, self.out = Path(raw_dir), Path(out_dir)
        state = self.out / STATE_DIR
        (state / _TMP).mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(folder_lock(self.out, command, lock_file=state / _LOCK))
        try:
            _check_settings(state, settings, redo)
            self.records: dict[str, dict] = {} if redo else _read_journal(state / _JOURNAL, self.raw, self.out)
            _remove_stale_temporaries(state / _TMP)
            self._file = open(state / _JOURNAL, "w" if redo else "a", encoding="utf-8")
        except BaseException:
            self._lock.close()
            raise

    def finished(self, rel: str, sha256: str) -> list[dict] | None:
        """The rows of ``rel`` if an earlier run finished these bytes and its chips are still
        there (failures that may not recur, :data:`RETRY_REASONS`, are not finished)."""
        rec = self.records.get(rel)
        return rec["rows"] if _is_done(rec, sha256, self.out) else None

    def record(self, src: Source, sha256: str, rows: list[dict]) -> None:
        path = self.raw / src.rel
        st = os.stat(path) if path.exists() else None
        rec = {"source": src.rel, "sha256": sha256, "rows": rows,
               "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None}
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[src.rel] = rec

    def close(self) -> None:
        self._file.close()
        self._lock.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def align(raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
          settings: AlignSettings | None = None, *, jobs: int | None = None, redo: bool = False,
          progress: bool = True, on_photo: Callable[[str], None] | None = None,
          cnn_factory: Callable | None = None, only: Iterable[str] | None = None) -> dict:
    """Align every photo under ``raw_dir`` into ``out_dir``; returns the summary (also saved
    as ``summary.json``).  ``jobs`` processes (default: all cores).  ``redo`` ignores what an
    earlier run in ``out_dir`` did.  ``on_photo(rel)`` is called in this process after each
    photo is recorded (an exception from it stops the run cleanly, resumable).  ``only``: the
    photos (paths relative to ``raw_dir``) to align, the others left alone and out of the
    manifest (evaluation aligns what its pairs name, not a whole data set)."""
    started = time.time()
    settings = settings or AlignSettings()
    if settings.cnn_precision != "float32" and cnn_factory is None:
        raise AlignError(f"cnn_precision {settings.cnn_precision} needs the torch port of the CNN detector "
                         "(cnn_factory); dlib's own runs in float32")
    raw, out = Path(raw_dir), Path(out_dir)
    _check_folders(raw, out)
    sources = list_sources(raw)
    if only is not None:
        wanted = set(only)
        sources = [s for s in sources if s.rel in wanted]
    layout = "identities" if any(s.identity for s in sources) else "flat"
    policy = settings.multi or ("largest" if layout == "identities" else "all")
    resolved = dataclasses.replace(settings, multi=policy)

    with Journal(raw, out, resolved, redo) as journal:
        summary = _align_sources(journal, sources, resolved, policy, layout, jobs, progress, on_photo, cnn_factory)
    summary["seconds"] = round(time.time() - started, 3)
    write_json(out / "summary.json", summary, indent=1, ensure_ascii=False)
    return summary


def _align_sources(journal: Journal, sources: list[Source], settings: AlignSettings, policy: str, layout: str,
                   jobs: int | None, progress: bool, on_photo: Callable[[str], None] | None,
                   cnn_factory: Callable | None) -> dict:
    """The body of :func:`align` once its journal is open: hash, find duplicates, align what
    is not finished, write manifest.csv; the summary without its time."""
    raw, out = journal.raw, journal.out
    hashes = _hash_sources(raw, sources, journal.records, progress)
    first_of: dict[str, str] = {}
    duplicate_of: dict[str, str] = {}
    for s in sources:
        sha = hashes[s.rel]
        if sha:
            original = first_of.setdefault(sha, s.rel)
            if original != s.rel:
                duplicate_of[s.rel] = original
    todo = [s for s in sources if s.rel not in duplicate_of and journal.finished(s.rel, hashes[s.rel]) is None]
    reused = sum(1 for s in sources if s.rel not in duplicate_of) - len(todo)

    for src, sha, rows in _run(todo, hashes, raw, out, settings, policy, jobs, progress, cnn_factory):
        journal.record(src, sha, rows)
        if on_photo is not None:
            on_photo(src.rel)

    rows = []
    for s in sources:
        if s.rel in duplicate_of:
            rows.append({"source": s.rel, "identity": s.identity, "status": "duplicate",
                         "sha256": hashes[s.rel], "duplicate_of": duplicate_of[s.rel]})
        else:
            rows.extend(journal.records[s.rel]["rows"])
    write_manifest(out, rows)
    return _summarize(rows, sources, raw, out, settings, layout, duplicate_of, processed=len(todo), reused=reused)


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    """``OUT_DIR/manifest.csv`` (atomically): the rows in :data:`MANIFEST_FIELDS` columns."""
    write_csv(Path(out_dir) / "manifest.csv", rows, list(MANIFEST_FIELDS))


def _check_folders(raw: Path, out: Path) -> None:
    check_link(raw, "RAW_DIR")
    if not raw.is_dir():
        raise AlignError(f"{raw} is not a folder")
    r, o = resolved(raw, "RAW_DIR"), resolved(out, "OUT_DIR")
    if r == o or r in o.parents or o in r.parents:
        raise AlignError(f"the output folder {out} must not be, contain or lie inside the input folder {raw}")


def _check_settings(state: Path, settings: AlignSettings, redo: bool) -> None:
    path = state / _SETTINGS
    wanted = dataclasses.asdict(settings)
    if path.is_file() and not redo:
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if isinstance(before, dict):    # a setting added since that run: it ran with the default
            before = {f.name: f.default for f in dataclasses.fields(AlignSettings) if f.name not in before} | before
        if before != wanted:
            diff = ", ".join(f"{k}: {before.get(k)!r} → {v!r}" for k, v in wanted.items()
                             if isinstance(before, dict) and before.get(k) != v) or "unreadable settings"
            raise AlignError(f"{state.parent} holds chips made with other settings ({diff}); "
                             "use another output folder or --redo")
    write_json(path, wanted, indent=None, newline=False)


def _read_journal(path: Path, raw: Path, out: Path) -> dict[str, dict]:
    """source → last record.  A line cut short by an interruption is ignored; a record naming
    a photo or a chip outside its folder is refused (:func:`~dlibbridge._paths.confined`)."""
    records = {}
    folders = {"source": Folder(raw, path, links=False), "duplicate_of": Folder(raw, path, links=False),
               "chip": Folder(out, path)}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    rows = rec["rows"]
                    source = rec["source"]
                except (ValueError, KeyError, TypeError):
                    continue
                folders["source"].path(source, n)
                for row in rows:
                    for key, folder in folders.items():
                        if row.get(key):
                            folder.path(row[key], n)
                records[source] = rec
    return records


def _remove_stale_temporaries(tmp: Path) -> None:
    """Temporary files of chips whose write was interrupted (never renamed into place): only in
    align's own temporary folder, and only files named as this tool names them."""
    for entry in os.scandir(tmp):
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _hash_sources(raw: Path, sources: list[Source], journal: dict, progress: bool) -> dict[str, str]:
    """SHA-256 of every file ('' when unreadable or empty: never a duplicate); reused from
    the journal when size and mtime are unchanged."""
    from tqdm import tqdm

    hashes = {}
    for s in tqdm(sources, desc="hashing", unit="file", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, leave=False):
        path = raw / s.rel
        try:
            st = os.stat(path)
        except OSError:
            hashes[s.rel] = ""
            continue
        rec = journal.get(s.rel)
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            hashes[s.rel] = rec["sha256"]
            continue
        try:
            hashes[s.rel] = sha256_file(path) if st.st_size else ""
        except OSError:
            hashes[s.rel] = ""
    return hashes


def _is_done(record: dict | None, sha: str, out: Path) -> bool:
    if not record or not sha or record.get("sha256") != sha:
        return False
    if any(r.get("reason") in RETRY_REASONS for r in record["rows"]):
        return False
    return all(_nonempty_file(out / r["chip"]) for r in record["rows"] if r.get("chip"))


def _nonempty_file(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _run(todo: list[Source], hashes: dict, raw: Path, out: Path, settings: AlignSettings,
         policy: str, jobs: int | None, progress: bool,
         cnn_factory: Callable | None = None) -> Iterator[tuple[Source, str, list[dict]]]:
    from tqdm import tqdm

    if not todo:
        return
    jobs = max(1, min(jobs or default_jobs(), len(todo)))
    tasks = [(s, hashes[s.rel]) for s in todo]
    counts = Counter()
    bar = tqdm(total=len(todo), desc=f"aligning ({jobs} proc)", unit="photo", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    results: Iterable = ()
    try:
        if jobs == 1:
            _init_worker(settings, str(raw), str(out), policy, None, cnn_factory)
            results: Iterable = map(_work, tasks)
        else:
            hog = hog_detector_pickle() if settings.detector == "hog" else None
            pool = worker_pool(jobs, _init_worker, (settings, str(raw), str(out), policy, hog, cnn_factory))
            results = _unordered(pool, _work, tasks, window=4 * jobs)
        for src, sha, rows in results:
            for r in rows:
                counts["chips"] += bool(r.get("chip"))
            counts["failed"] += not any(r.get("chip") for r in rows)
            bar.update(1)
            bar.set_postfix(chips=counts["chips"], no_chip=counts["failed"], refresh=False)
            yield src, sha, rows
    finally:
        if hasattr(results, "close"):
            results.close()   # shuts the pool down now, not when garbage-collected
        bar.close()
        _WORKER.clear()
        _MADE_DIRS.clear()


def _unordered(pool: ProcessPoolExecutor, fn, items: list, window: int) -> Iterator:
    """Results of ``fn`` over the ``(Source, sha256)`` tasks as they finish, with at most
    ``window`` tasks queued (memory stays flat on a million photos); the pool is shut down
    however the consumer stops."""
    it = iter(items)
    pending: dict = {}   # future → its item
    try:
        with children_ignore_sigint():   # the first submissions start the workers
            for item in it:
                pending[pool.submit(fn, item)] = item
                if len(pending) >= window:
                    break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is None:
                    del pending[fut]
                    nxt = next(it, None)
                    if nxt is not None:
                        pending[pool.submit(fn, nxt)] = nxt
                yield fut.result()
    except BrokenProcessPool:
        # A worker was killed (a crash inside dlib, or the OOM killer): say which photos were
        # in flight, since rerunning will hit the same one.
        raise AlignError("a worker process died while processing one of: "
                         + ", ".join(task[0].rel for task in pending.values())
                         + "; finished photos are kept — move the culprit away (find it with "
                           "--jobs 1) and rerun to continue") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``manifest.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _summarize(rows: list[dict], sources: list[Source], raw: Path, out: Path, settings: AlignSettings,
               layout: str, duplicate_of: dict, *, processed: int, reused: int) -> dict:
    per_source: dict[str, list[dict]] = {}
    for r in rows:
        per_source.setdefault(r["source"], []).append(r)
    status_counts = Counter(r["status"] for r in rows)
    problems = Counter()
    for rs in per_source.values():
        r = rs[0]
        if r["status"] == "error":
            problems[r["reason"]] += 1
        elif r["status"] in ("no_face", "multiple_faces", "duplicate"):
            problems[r["status"]] += 1
    chips_per_identity = Counter(r["identity"] for r in rows if r.get("chip") and r["identity"])
    identities = sorted({s.identity for s in sources if s.identity})
    return {
        "raw_dir": str(raw), "out_dir": str(out), "layout": layout,
        "settings": dataclasses.asdict(settings),
        "files": len(sources),
        "photos_with_chips": sum(1 for rs in per_source.values() if any(r.get("chip") for r in rs)),
        "chips": sum(1 for r in rows if r.get("chip")),
        "faces_detected": sum(int(rs[0].get("n_faces") or 0) for rs in per_source.values()),
        "status_counts": dict(sorted(status_counts.items())),
        "failures_by_reason": dict(sorted(problems.items())),
        "identities": len(identities),
        "identities_with_chips": len(chips_per_identity),
        "identities_under_2_chips": [i for i in identities if chips_per_identity[i] < 2],
        "duplicates": [[d, o] for d, o in sorted(duplicate_of.items())],
        "processed_this_run": processed, "reused_from_earlier_runs": reused,
    }


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines (what the CLI prints)."""
    s = summary
    lines = [
        f"{s['files']} files ({s['layout']}): {s['chips']} chips from {s['photos_with_chips']} photos, "
        f"{s['faces_detected']} faces detected; {s['processed_this_run']} processed now, "
        f"{s['reused_from_earlier_runs']} from earlier runs, {s['seconds']:.1f} s",
        "status: " + (", ".join(f"{k} {v}" for k, v in s["status_counts"].items()) or "nothing processed"),
    ]
    if s["failures_by_reason"]:
        lines.append("no chip: " + ", ".join(f"{k} {v}" for k, v in s["failures_by_reason"].items()))
    if s["layout"] == "identities":
        under = s["identities_under_2_chips"]
        lines.append(f"identities: {s['identities']} ({s['identities_with_chips']} with chips); "
                     f"{len(under)} with < 2 chips" + (f": {', '.join(under[:10])}" + (" …" if len(under) > 10 else "")
                                                       if under else ""))
    if s["duplicates"]:
        lines.append(f"exact duplicates: {len(s['duplicates'])} (e.g. {s['duplicates'][0][0]} = {s['duplicates'][0][1]})")
    lines.append(f"manifest: {Path(s['out_dir']) / 'manifest.csv'}")
    return "\n".join(lines)
