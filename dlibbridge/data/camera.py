"""Describe a deployment camera from its unlabeled photos, and degrade clean chips to match it.

dlib's face network was trained on sharp, colour, well-lit web photos with large faces.  A
user's camera (a door bell, a low-light CCTV, an IR sensor) differs in ways that can be
measured without knowing who is in the pictures.  :func:`measure_folder` measures, per face:

* ``face_px`` — the side, in source pixels, of the region ``get_face_chip(…, 150, 0.25)`` cuts
  (``get_face_chip_details(shape).rect.width()``): the 150×150 chip is an up-sampling of that
  many pixels, exactly what :func:`dlibbridge.data.augment.down_up` with that side simulates.  Known
  for photos; for already-aligned chips the source is gone, so it is ``None`` and only
* ``effective_px`` is known — the resolution the chip's content shows: the frequency where its
  radial power spectrum falls :data:`CUTOFF_DB` below that of clean dlib chips, scaled by
  :data:`SIDE_PER_CYCLE` (calibrated: clean chips shrunk by ``down_up`` to a known side cross
  it at side / 2.6 cycles per chip).  It folds blur and low resolution together.
* ``blur_sigma`` — the Gaussian sigma, in chip pixels, that explains the part of the content's
  resolution loss that ``face_px`` does not (a Gaussian of sigma s moves the cutoff to
  :data:`BLUR_CYCLES` / s cycles; losses add as 1/f²).  For chips it is 0: blur and resolution
  cannot be told apart there, ``effective_px`` carries both.
* ``channels`` — ``color``, ``gray`` (one stored channel, or three equal ones) or ``ir_like``
  (three channels that are nearly but not exactly equal: the faint tint of IR cameras).
* ``jpeg_quality`` — the IJG quality whose scaled standard luminance table is closest to the
  file's own (read from its DQT markers); for a chip stored losslessly, the quality it was
  compressed with on its own grid, if any (:func:`jpeg_ghost_quality`); else ``None``.
* ``noise`` — grey levels per channel, in the photo's own pixels around the face (for chips:
  in the chip): median absolute response to a second-difference kernel
  (robust to edges), as a Gaussian sigma, less the :data:`NOISE_FLOOR` that clean chips show
  (in quadrature).  A chip JPEG-compressed on its own grid after the noise (a file's quality,
  or the ghost's) has lost that fine noise: :func:`jpeg_noise` reads what survives, the
  residual in its flattest regions, through a table calibrated per quality.
* ``brightness`` / ``contrast`` — mean and standard deviation of the luma in the chip's central
  half (the face, not the background).

The profile keeps every face's record (so the sampler draws joint, not independent, values:
small faces of a CCTV are also its blurry ones) and, for reading, quantiles of each field.
:meth:`CameraProfile.sample` draws one :class:`CameraSample`, whose ``apply`` degrades a clean
chip; :class:`CameraDegradations` is the training-time callable (like
:class:`dlibbridge.data.augment.Degradations`).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from . import augment
from .._io import write_atomic, write_json
from .._paths import resolved
from ..errors import DlibbridgeError
from ..options import option
from .images import CHIP_SIZE as CHIP, IMAGE_EXTENSIONS, is_image_file, walk_files

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "FIELDS", "CameraError", "jpeg_quality", "ijg_luma_table", "jpeg_ghost_quality",
           "channel_kind", "noise_sigma", "channel_noise", "flat_residual", "jpeg_noise", "band_spectrum_db", "spectral_cutoff", "measure_chip", "measure_folder",
           "CameraSample", "CameraProfile", "CameraDegradations", "load_camera", "write_camera",
           "DetectionSearch", "measure_detection", "choose_detection", "degrade_photo"]

PROFILE_FORMAT = "dlibbridge-camera"
PROFILE_VERSION = 1

#: Continuous per-face fields, with their units (the profile's quantiles are of these).
FIELDS = {"face_px": "source pixels across the chip", "effective_px": "pixels of resolution the chip shows",
          "blur_sigma": "Gaussian sigma, chip pixels", "jpeg_quality": "IJG quality 1-100",
          "noise": "grey levels (sigma)", "brightness": "mean luma 0-255", "contrast": "luma std"}
CHANNELS = ("color", "gray", "ir_like")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_RECORDS = 5000

# ---- calibration: the 55 johns chips (../shared/data/johns), by tools/calibrate_camera.py ----
#: Radial power spectrum of clean chips (dB, relative to the lowest band), bands of 3 cycles per
#: chip: the median over the johns after removing their noise floor.
REFERENCE_SPECTRUM_DB = np.array([
    0.0, -8.9, -14.4, -19.6, -21.9, -24.4, -27.6, -31.0, -33.9, -35.4, -37.7, -40.2, -41.8, -43.4,
    -45.2, -46.8, -48.6, -49.3, -49.9, -51.6, -52.9, -53.5, -54.3, -55.0, -55.6])
BAND = 3.0
CUTOFF_DB = 6.0
#: down_up(chip, side) puts the 6 dB cutoff at side / 2.6 cycles per chip (median over the johns
#: for sides 32-120: 2.58-2.79; 2.3 at 16-24).
SIDE_PER_CYCLE = 2.6
#: blur(chip, s) puts it at 30 / s cycles (29.5, 28.4, 29.2, 31.4 for s = 1, 1.5, 2, 3).
BLUR_CYCLES = 30.0
#: Median per-channel noise estimate of the clean johns chips: texture and JPEG, not noise.
NOISE_FLOOR = 0.74
#: JPEG removes most of the noise a second-difference kernel sees; what survives is coarser.
#: :func:`flat_residual` of the gray johns chips with luma noise of sigma RESIDUAL_SIGMAS added,
#: then JPEG-compressed at RESIDUAL_QUALITIES (rows): median over the chips, grey levels.
#: :func:`jpeg_noise` inverts it.
RESIDUAL_SIGMAS = (0.0, 3.0, 6.0, 10.0, 16.0)
RESIDUAL_QUALITIES = (10, 25, 40, 60, 80, 95)
RESIDUAL_TABLE = np.array([
    [2.80, 2.86, 3.03, 3.40, 5.30],
    [2.44, 2.59, 3.17, 5.05, 9.04],
    [2.40, 2.63, 3.61, 6.04, 11.10],
    [2.31, 2.72, 4.05, 7.19, 14.04],
    [2.22, 2.92, 5.12, 9.87, 16.46],
    [2.27, 3.82, 6.40, 9.89, 15.34]])
#: Luma noise per grey level of independent noise in each of R, G, B (BT.601 weights).
LUMA_NOISE = math.sqrt(0.299 ** 2 + 0.587 ** 2 + 0.114 ** 2)


class CameraError(DlibbridgeError, ValueError):
    """Bad input or output for ``dlibbridge camera``: one line for the user."""


# --------------------------------------------------------------------------------------------
# JPEG quality from the quantisation tables
# --------------------------------------------------------------------------------------------

# Annex K.1 luminance table, natural (row-major) order.
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def _zigzag() -> np.ndarray:
    """Natural index of the k-th coefficient in zig-zag order (how DQT stores a table)."""
    order = sorted(((r, c) for r in range(8) for c in range(8)),
                   key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else rc[1]))
    return np.array([r * 8 + c for r, c in order])


_ZIGZAG = _zigzag()


def ijg_luma_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg (cjpeg, Pillow, OpenCV) writes at ``quality``, natural order."""
    q = min(100, max(1, int(quality)))
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((_STD_LUMA * scale + 50) // 100, 1, 255)


def _dqt_tables(data: bytes) -> dict[int, np.ndarray]:
    """Quantisation tables (id → 64 values, natural order) from a JPEG's DQT segments, read up
    to the first scan.  Raises ValueError on a malformed marker stream."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    tables, pos = {}, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"bad marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:                      # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        seg = data[pos + 4:pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            raise ValueError("truncated segment")
        if marker == 0xDB:
            i = 0
            while i < len(seg):
                precision, tid = seg[i] >> 4, seg[i] & 15
                n = 128 if precision else 64
                raw = seg[i + 1:i + 1 + n]
                if len(raw) != n:
                    raise ValueError("truncated DQT")
                vals = np.frombuffer(raw, ">u2" if precision else "u1").astype(np.int64)
                table = np.empty(64, np.int64)
                table[_ZIGZAG] = vals
                tables[tid] = table
                i += 1 + n
        if marker in (0xDA, 0xD9):              # start of scan / end of image
            break
        pos += 2 + length
    return tables


def jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) whose luminance table best matches the file's table 0 (least
    absolute difference; a camera's own tables give the nearest equivalent).  ``None`` when
    ``data`` is not a JPEG or has no table."""
    try:
        tables = _dqt_tables(data)
    except (ValueError, struct.error):
        return None
    if not tables:
        return None
    luma = tables.get(0, next(iter(tables.values())))
    errors = [np.abs(ijg_luma_table(q) - luma).sum() for q in range(1, 101)]
    return int(np.argmin(errors)) + 1


#: A chip JPEG-compressed at chip resolution changes far less when compressed again at its own
#: quality than at the qualities just below (the "JPEG ghost"): measured ratio 0.00-0.16 for
#: qualities 10-95 (photo chips after down_up(48), the johns at their 93), >= 0.68 for photo
#: chips never compressed on their grid.  Above 95 the curve itself falls this steeply.
GHOST_RATIO = 0.4
_GHOST_QUALITIES = np.arange(5, 97)


def jpeg_ghost_quality(chip: np.ndarray) -> int | None:
    """The quality (9-95) a chip was JPEG-compressed with on its own 8×8 grid (a chip saved
    losslessly after compression, e.g. a degraded chip written as PNG), or ``None`` when no
    quality stands out.  Each quality q is tried by compressing the luma again (its table is
    the luminance one): at the original quality the change drops below :data:`GHOST_RATIO` of
    the mean change at the four qualities below.  The central 96×96 pixels (grid-aligned,
    the face) are enough, at a quarter of the cost."""
    import cv2
    y = np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(chip), cv2.COLOR_RGB2GRAY)[24:120, 24:120])
    x = y.astype(np.int16)
    e = np.empty(len(_GHOST_QUALITIES))
    for k, q in enumerate(_GHOST_QUALITIES):
        ok, buf = cv2.imencode(".jpg", y, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
        e[k] = np.abs(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.int16) - x).mean()
    ratio = np.array([e[i] / max(e[i - 4:i].mean(), 1e-9) for i in range(4, len(e) - 1)])
    i = int(np.argmin(ratio))
    return int(_GHOST_QUALITIES[i + 4]) if ratio[i] < GHOST_RATIO else None


# --------------------------------------------------------------------------------------------
# Pixel measurements
# --------------------------------------------------------------------------------------------

def _luma(rgb: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float64)


def channel_kind(rgb: np.ndarray, mode: str = "RGB") -> str:
    """``gray`` for a one-channel file or three equal channels (JPEG's chroma rounding allows a
    difference of 1 level), ``ir_like`` when the channels differ by under 4 levels on average
    (a tinted monochrome sensor), otherwise ``color``."""
    if mode.startswith(("L", "1", "I", "F")) or rgb.ndim == 2:
        return "gray"
    x = rgb.astype(np.int16)
    d = np.maximum(np.abs(x[..., 0] - x[..., 1]), np.abs(x[..., 1] - x[..., 2]))
    if np.percentile(d, 99) <= 1:
        return "gray"
    return "ir_like" if d.mean() < 4.0 else "color"


_SECOND_DIFF = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def noise_sigma(gray: np.ndarray) -> float:
    """Gaussian noise sigma (grey levels) from the median |response| of a kernel that cancels
    locally planar image content (Immerkær's), so edges and shading count little.  For white
    noise of sigma s the response has sigma 6 s."""
    import cv2
    h = cv2.filter2D(gray, cv2.CV_64F, _SECOND_DIFF)[2:-2, 2:-2]
    return float(np.median(np.abs(h)) / (0.6745 * 6.0))


def channel_noise(chip: np.ndarray) -> float:
    """Median over the three channels of :func:`noise_sigma`: per channel, as a sensor (and
    ``augment.add_noise``) makes it; luma would average independent noise down by a third."""
    return float(np.median([noise_sigma(chip[..., c].astype(np.float64)) for c in range(3)]))


def flat_residual(gray: np.ndarray) -> float:
    """RMS of the luma minus its Gaussian smoothing (sigma 1.5) over the flattest 40 % of the
    chip (least smoothed gradient, 8-pixel border left out): the noise that JPEG leaves, which
    is spread over its 8×8 blocks instead of pixel to pixel, plus a floor of skin texture."""
    import cv2
    smooth = cv2.GaussianBlur(gray, (0, 0), 1.5)
    grad = np.hypot(cv2.Sobel(smooth, cv2.CV_64F, 1, 0), cv2.Sobel(smooth, cv2.CV_64F, 0, 1))
    grad = cv2.GaussianBlur(grad, (0, 0), 3.0)[8:-8, 8:-8]
    r = (gray - smooth)[8:-8, 8:-8]
    flat = grad <= np.percentile(grad, 40)
    return float(np.sqrt(np.mean(r[flat] ** 2)))


def jpeg_noise(chip: np.ndarray, quality: int, channels: str) -> float:
    """Sensor noise (grey levels per channel, as :func:`dlibbridge.data.augment.add_noise`
    adds it) of a chip JPEG-compressed at ``quality`` on its own grid after the noise: its
    :func:`flat_residual` looked up in :data:`RESIDUAL_TABLE` (linear in quality and sigma).
    Independent colour noise shows in the luma divided by :data:`LUMA_NOISE`."""
    q = float(np.clip(quality, RESIDUAL_QUALITIES[0], RESIDUAL_QUALITIES[-1]))
    row = np.array([np.interp(q, RESIDUAL_QUALITIES, RESIDUAL_TABLE[:, j]) for j in range(len(RESIDUAL_SIGMAS))])
    luma = float(np.interp(flat_residual(_luma(chip)), row, RESIDUAL_SIGMAS))
    return luma if channels != "color" else luma / LUMA_NOISE


_WINDOW = np.outer(np.hanning(CHIP), np.hanning(CHIP))
_f = np.fft.fftfreq(CHIP) * CHIP
_BANDS = np.minimum((np.hypot(*np.meshgrid(_f, _f, indexing="ij")) / BAND).astype(int),
                    len(REFERENCE_SPECTRUM_DB))
_BAND_COUNT = np.bincount(_BANDS.ravel(), minlength=len(REFERENCE_SPECTRUM_DB) + 1)


def band_spectrum_db(gray: np.ndarray, noise: float) -> np.ndarray:
    """Radial power spectrum of a Hann-windowed 150×150 luma image in bands of :data:`BAND`
    cycles per chip (dB), its white-noise floor (``noise`` sigma) removed: the content alone."""
    g = (gray - gray.mean()) * _WINDOW
    p = np.abs(np.fft.fft2(g)) ** 2
    n = len(REFERENCE_SPECTRUM_DB)
    p = np.bincount(_BANDS.ravel(), p.ravel(), n + 1)[:n] / _BAND_COUNT[:n]
    p = np.maximum(p - noise * noise * float((_WINDOW ** 2).sum()), p * 1e-3)
    return 10 * np.log10(np.maximum(p, 1e-12))


def spectral_cutoff(gray: np.ndarray, noise: float) -> float | None:
    """Cycles per chip where the chip's band spectrum falls :data:`CUTOFF_DB` below the clean
    reference, both aligned on the two lowest bands (linear between band centres); ``None``
    when it never does (a chip as sharp as dlib's own)."""
    d = band_spectrum_db(gray, noise) - REFERENCE_SPECTRUM_DB
    d -= d[:2].mean()
    below = np.nonzero(d < -CUTOFF_DB)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return BAND / 2
    return BAND / 2 + BAND * (i - 1) + BAND * (d[i - 1] + CUTOFF_DB) / (d[i - 1] - d[i])


def measure_chip(chip: np.ndarray, *, face_px: float | None = None, channels: str | None = None,
                 jpeg_q: int | None = None, source_noise: float | None = None) -> dict:
    """One face's record (the fields of :data:`FIELDS` plus ``channels``) from its aligned
    150×150 chip; ``face_px`` from the photo's geometry and ``source_noise`` (grey levels, in
    the photo's own pixels, where the camera made it) when known.  A chip (no ``face_px``)
    without a file's ``jpeg_q`` is searched for a JPEG grid of its own."""
    if chip.shape[:2] != (CHIP, CHIP):
        raise ValueError(f"expected a {CHIP}x{CHIP} chip, got {chip.shape}")
    gray = _luma(chip)
    raw_noise = channel_noise(chip) if source_noise is None else source_noise
    cutoff = spectral_cutoff(gray, noise_sigma(gray))
    effective = CHIP if cutoff is None else min(CHIP, SIDE_PER_CYCLE * cutoff)
    blur_sigma = 0.0
    if face_px is not None and cutoff is not None:
        geometric = face_px / SIDE_PER_CYCLE if face_px < CHIP else math.inf
        excess = 1.0 / cutoff ** 2 - 1.0 / geometric ** 2
        blur_sigma = BLUR_CYCLES * math.sqrt(excess) if excess > 0 else 0.0
    channels = channels or channel_kind(chip)
    noise = math.sqrt(max(0.0, raw_noise ** 2 - NOISE_FLOOR ** 2))
    if face_px is None:
        if jpeg_q is None:
            jpeg_q = jpeg_ghost_quality(chip)
        if jpeg_q is not None:             # compressed on the chip's grid, after the noise
            noise = jpeg_noise(chip, jpeg_q, channels)
    centre = gray[CHIP // 4:3 * CHIP // 4, CHIP // 4:3 * CHIP // 4]
    return {"face_px": None if face_px is None else round(float(face_px), 2),
            "effective_px": round(float(effective), 2),
            "blur_sigma": round(float(blur_sigma), 3),
            "jpeg_quality": jpeg_q,
            "noise": round(float(noise), 3),
            "brightness": round(float(centre.mean()), 2),
            "contrast": round(float(centre.std()), 2),
            "channels": channels}


def _list_images(folder: Path) -> list[Path]:
    return [folder / rel for rel in walk_files(folder) if is_image_file(rel)]


def measure_folder(folder: str | os.PathLike, *, progress: bool = False, upsample: int = 1,
                   max_images: int | None = None, search: "DetectionSearch | None" = None,
                   cnn_factory=None) -> "CameraProfile":
    """Measure every image under ``folder`` (any layout), or ``max_images`` of them evenly
    spread over the sorted list (a few hundred describe a camera; HOG takes ~0.15 s for a
    250×250 photo, more for larger ones).  A 150×150 image is taken as an aligned chip; any
    other is a photo: dlib's HOG detector (upsampled ``upsample`` times, more for a small
    photo without a find: :data:`_CLOSER_LOOKS`) and 5-point landmarks give each face's chip and
    ``face_px``.  Unreadable files and photos without a face are counted, not fatal.

    With ``search``, the detection settings are tried first (:func:`measure_detection`, the
    CNN through ``cnn_factory`` as in :class:`~dlibbridge.data.align.FaceAligner`) and the
    faces are found with the chosen one (:func:`choose_detection`), as ``align --camera`` will
    find them: the profile's face sizes are those of the faces the deployment sees."""
    import dlib

    from .align import CHIP_PADDING, FaceAligner
    from .images import ImageReadError, read_image

    root = Path(folder)
    if not root.exists():
        raise CameraError(f"{root}: no such folder")
    if not root.is_dir():
        raise CameraError(f"{root}: not a folder")
    files = _list_images(root)
    if not files:
        raise CameraError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if max_images is not None and len(files) > max_images:
        files = [files[i] for i in np.linspace(0, len(files) - 1, max_images).round().astype(int)]
    aligners: dict[int, FaceAligner] = {}
    detection = _search_detection(files, search, cnn_factory) if search is not None else None
    chosen = detection and detection["setting"]
    if chosen:
        chosen_aligner = FaceAligner(chosen["detector"], chosen["upsample"], cnn_factory=cnn_factory)
    records, skipped, kinds = [], Counter(), Counter()
    it: Iterable[Path] = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc="measuring", unit="img")
    for path in it:
        try:
            data = path.read_bytes()
            photo = read_image(path)
        except (ImageReadError, OSError) as e:
            skipped[getattr(e, "reason", "unreadable")] += 1
            continue
        q = jpeg_quality(data)
        channels = channel_kind(photo.rgb, photo.mode)
        h, w = photo.rgb.shape[:2]
        if (h, w) == (CHIP, CHIP):
            kinds["chip"] += 1
            records.append(measure_chip(photo.rgb, channels=channels, jpeg_q=q))
            continue
        kinds["photo"] += 1
        aligner = chosen_aligner if chosen else None
        faces = aligner.detect(photo.rgb) if chosen else []
        for extra, max_side in () if chosen else _CLOSER_LOOKS:   # small faces of a small photo: look closer
            if extra and max(h, w) > max_side:
                break
            if extra not in aligners:
                aligners[extra] = FaceAligner("hog", upsample + extra)
            aligner = aligners[extra]
            faces = aligner.detect(photo.rgb)
            if faces:
                break
        if not faces:
            skipped["no_face"] += 1
            continue
        for face in faces:
            aligner.locate(photo.rgb, face)
            details = dlib.get_face_chip_details(face.shape, CHIP, CHIP_PADDING)
            chip = aligner.chip(photo.rgb, face)
            records.append(measure_chip(chip, face_px=details.rect.width(), channels=channels, jpeg_q=q,
                                        source_noise=_face_noise(photo.rgb, details.rect)))
    if not records:
        raise CameraError(f"{root}: no face measured in {len(files)} images "
                          f"({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})")
    source = {"folder": str(root), "images": len(files), "photos": kinds["photo"], "chips": kinds["chip"],
              "faces": len(records), "skipped": dict(sorted(skipped.items()))}
    return CameraProfile(records=_cap(records), source=source, detection=detection)


#: (extra upsampling, largest photo side it is tried on) when no face is found: HOG finds faces
#: of ~80 px, so a 40 px chip region needs one more doubling, 30 px two (celeba-dev photos
#: shrunk to 75×75, faces of ~33 px: 32 of 40 found with one more, 34 with two).
_CLOSER_LOOKS = ((0, 0), (1, 1200), (2, 400))


def _face_noise(rgb: np.ndarray, rect) -> float | None:
    """:func:`channel_noise` of the photo's pixels in the central half of the chip region (the
    face, where the chip's noise comes from), or None when that is under 8 pixels."""
    c, half = rect.center(), rect.width() / 4
    h, w = rgb.shape[:2]
    x0, x1 = max(0, int(c.x - half)), min(w, int(c.x + half) + 1)
    y0, y1 = max(0, int(c.y - half)), min(h, int(c.y + half) + 1)
    if min(x1 - x0, y1 - y0) < 8:
        return None
    return channel_noise(rgb[y0:y1, x0:x1])


def _cap(records: list[dict]) -> list[dict]:
    """At most MAX_RECORDS, an evenly spaced (deterministic) subset."""
    if len(records) <= MAX_RECORDS:
        return records
    keep = np.linspace(0, len(records) - 1, MAX_RECORDS).round().astype(int)
    return [records[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Profile, sampler
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CameraSample:
    """One chip's degradation, applied in the camera's own order: colour loss and optics blur,
    sampling at ``side`` pixels, then at that resolution sensor noise, exposure and JPEG, and
    last the aligner's enlargement back to the chip.  A profile made of chips saw noise and
    JPEG at chip resolution (``at_source`` False): they are applied after the enlargement."""
    side: int | None              # source pixels across the chip; None = no resolution loss
    gray: bool
    blur_sigma: float             # chip pixels
    noise: float                  # grey levels (sigma) added at the source resolution
    brightness: float             # target mean luma of the face centre
    contrast: float               # target luma std of the face centre
    jpeg_quality: int | None
    at_source: bool = True

    def apply(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.gray:
            chip = augment.to_grayscale(chip)
        chip = augment.blur(chip, self.blur_sigma)
        # Exposure is matched on the chip's face centre, measured before the resampling.
        centre = _luma(chip)[CHIP // 4:3 * CHIP // 4, CHIP // 4:3 * CHIP // 4]
        gain = float(np.clip(self.contrast / max(centre.std(), 1.0), 0.25, 4.0))

        def camera(img: np.ndarray) -> np.ndarray:
            img = augment.brightness_contrast(img, gain=gain, mean_from=float(centre.mean()),
                                              mean_to=self.brightness)
            img = augment.add_noise(img, self.noise, rng)
            return augment.jpeg(img, self.jpeg_quality) if self.jpeg_quality else img

        if self.at_source:
            return augment.down_up(chip, self.side or CHIP, at_low_res=camera)
        return camera(augment.down_up(chip, self.side or CHIP))


def degrade_photo(sample: CameraSample, rgb: np.ndarray, face_px: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A whole clean photo as the camera of ``sample`` would take it, for training a detector on
    it: shrunk so that a face whose chip region is ``face_px`` pixels across becomes
    ``sample.side`` (area averaging; never enlarged), then, as :meth:`CameraSample.apply` does
    for a chip, colour loss, optics blur (``blur_sigma`` is in chip pixels: scaled to the
    photo's), exposure matched on the photo's central half, sensor noise and JPEG.  Returns the
    photo and the scale its coordinates were multiplied by."""
    import cv2
    scale = min(1.0, (sample.side or face_px) / max(face_px, 1.0))
    h, w = rgb.shape[:2]
    img = rgb
    if scale < 1.0:
        img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if sample.gray:
        img = augment.to_grayscale(img)
    img = augment.blur(img, sample.blur_sigma * (sample.side or CHIP) / CHIP)
    ih, iw = img.shape[:2]
    centre = _luma(img)[ih // 4:3 * ih // 4 + 1, iw // 4:3 * iw // 4 + 1]
    img = augment.brightness_contrast(img, gain=float(np.clip(sample.contrast / max(centre.std(), 1.0), 0.25, 4.0)),
                                      mean_from=float(centre.mean()), mean_to=sample.brightness)
    img = augment.add_noise(img, sample.noise, rng)
    return (augment.jpeg(img, sample.jpeg_quality) if sample.jpeg_quality else img), img.shape[1] / w


def _valid_record(r) -> bool:
    def number(v, required):
        return (v is None and not required) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) and v >= 0)
    return (isinstance(r, dict) and r.get("channels") in CHANNELS
            and all(number(r.get(k, "missing"), k in _REQUIRED) for k in FIELDS))


#: Fields every record has (the others are null where not measured).
_REQUIRED = ("effective_px", "blur_sigma", "noise", "brightness", "contrast")


@dataclass
class CameraProfile:
    """Per-face records measured by :func:`measure_folder` (``records``: list of dicts with the
    keys of :data:`FIELDS` and ``channels``) and where they came from (``source``)."""
    records: list[dict]
    source: dict = field(default_factory=dict)
    #: what :func:`measure_detection` found and the setting chosen (None: not measured)
    detection: dict | None = None

    def values(self, name: str) -> np.ndarray:
        return np.array([r[name] for r in self.records if r.get(name) is not None], np.float64)

    def side(self, r: dict) -> float:
        """The record's resolution: the photo's geometry, else the chip's content."""
        return r["face_px"] if r.get("face_px") is not None else r["effective_px"]

    def channel_fractions(self) -> dict[str, float]:
        c = Counter(r["channels"] for r in self.records)
        return {k: c.get(k, 0) / len(self.records) for k in CHANNELS}

    def sample(self, rng: np.random.Generator) -> CameraSample:
        """A degradation drawn from the profile: one measured face's record (so the fields keep
        their joint distribution), its continuous values smoothed by a few per cent so that a
        small profile still gives a continuum."""
        r = self.records[int(rng.integers(len(self.records)))]
        z = rng.normal(size=5)
        side = self.side(r) * math.exp(0.05 * z[0])
        q = r.get("jpeg_quality")
        # A photo's noise was measured in its own pixels; a face larger than the chip is
        # averaged down into it (area resampling divides white noise by the scale).
        noise = r["noise"] * (min(1.0, CHIP / max(side, 1.0)) if r.get("face_px") is not None else 1.0)
        return CameraSample(
            side=int(round(side)) if side < CHIP else None,
            gray=r["channels"] != "color",
            blur_sigma=max(0.0, r["blur_sigma"] * math.exp(0.1 * z[1])),
            noise=max(0.0, noise * math.exp(0.1 * z[2])),
            brightness=float(np.clip(r["brightness"] + 2.0 * z[3], 1, 254)),
            contrast=max(1.0, r["contrast"] * math.exp(0.05 * z[4])),
            jpeg_quality=None if q is None else int(np.clip(q + rng.integers(-2, 3), 1, 100)),
            at_source=r.get("face_px") is not None)

    def degradations(self, prob: float = 1.0) -> "CameraDegradations":
        return CameraDegradations(self, prob)

    def summary_stats(self) -> dict:
        out = {}
        for name in FIELDS:
            v = self.values(name)
            out[name] = {"unit": FIELDS[name], "count": int(len(v))}
            if len(v):
                out[name].update(mean=round(float(v.mean()), 3),
                                 quantiles={f"p{int(q * 100):02d}": round(float(np.quantile(v, q)), 3)
                                            for q in QUANTILES})
        return out

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "source": self.source,
                "channels": self.channel_fractions(), "fields": self.summary_stats(),
                "records": self.records} | ({"detection": self.detection} if self.detection else {})

    @classmethod
    def from_json(cls, obj: dict) -> "CameraProfile":
        if not isinstance(obj, dict) or obj.get("format") != PROFILE_FORMAT:
            raise CameraError("not a dlibbridge camera profile (no \"format\": \"dlibbridge-camera\")")
        if obj.get("version") != PROFILE_VERSION:
            raise CameraError(f"camera profile version {obj.get('version')!r} is not supported "
                              f"(this dlibbridge reads version {PROFILE_VERSION})")
        records = obj.get("records")
        if not isinstance(records, list) or not records:
            raise CameraError("camera profile has no records")
        for i, r in enumerate(records):
            if not _valid_record(r):
                raise CameraError(f"camera profile record {i} is not a face record "
                                  f"(needs {', '.join(FIELDS)}: numbers or null; channels: {', '.join(CHANNELS)})")
        return cls(records=list(records), source=dict(obj.get("source", {})),
                   detection=_valid_detection(obj.get("detection")))

    def summary(self) -> str:
        s = self.source
        lines = [f"camera profile: {s.get('faces', len(self.records))} faces from {s.get('images', '?')} images "
                 f"({s.get('photos', 0)} photos, {s.get('chips', 0)} chips)"
                 + (f"; skipped {s['skipped']}" if s.get("skipped") else "")]
        ch = self.channel_fractions()
        lines.append("  channels      " + ", ".join(f"{k} {v:.0%}" for k, v in ch.items()))
        stats = self.summary_stats()
        for name, st in stats.items():
            if not st["count"]:
                why = "no JPEG files" if name == "jpeg_quality" else "aligned chips: the source size is unknown"
                lines.append(f"  {name:<13} not measured ({why})")
                continue
            q = st["quantiles"]
            lines.append(f"  {name:<13} median {q['p50']:g}  [5%-95%: {q['p05']:g} - {q['p95']:g}]  "
                         f"({st['unit']}, n={st['count']})")
        if self.detection:
            lines.extend(format_detection(self.detection))
        return "\n".join(lines)


@dataclass(frozen=True)
class CameraDegradations:
    """Training-time degradation matching a camera profile: with probability ``prob`` a chip
    gets one :meth:`CameraProfile.sample` applied, otherwise stays clean.  Same call and
    ``enabled``/``describe`` as :class:`dlibbridge.data.augment.Degradations`."""
    profile: CameraProfile
    prob: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.prob > 0

    def __call__(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random()                       # drawn first, always: the sample does not shift
        sample = self.profile.sample(rng)
        return sample.apply(chip, rng) if u < self.prob else chip

    def describe(self) -> dict:
        """For a run's config.json: the distributions (not the records)."""
        return {"camera": {"prob": self.prob, "source": self.profile.source,
                           "channels": self.profile.channel_fractions(),
                           "fields": self.profile.summary_stats()}}


# --------------------------------------------------------------------------------------------
# Detection settings: which detector and upsampling find this camera's faces
# --------------------------------------------------------------------------------------------

#: The settings tried, cheapest first within each detector: dlib's HOG detector and its CNN
#: (MMOD) detector, each on the photo upsampled 0-3 times (each doubling finds faces half as
#: large, HOG's ~80 px and the CNN's ~40 px smallest, at ~4x the cost).
DETECTORS_TRIED = ("hog", "cnn")
UPSAMPLES_TRIED = (0, 1, 2, 3)
#: Share of the most photos with a face that a cheaper setting must reach to be preferred:
#: the last few faces are not worth a several-fold slower detector.
FOUND_SHARE = 0.97
#: Photos timed before a setting over the budget is abandoned (its larger upsamplings too).
TIMED_BEFORE_ABANDON = 3


@dataclass(frozen=True)
class DetectionSearch:
    """How ``dlibbridge camera`` chooses the detection setting (:func:`choose_detection`)."""
    detect_photos: int = option(24, "photos (spread over the folder) each detector and upsampling is tried on",
                                metavar="N")
    detect_budget: float = option(1.0, "most seconds per photo a detection setting may cost on this machine",
                                  metavar="SECONDS")

    def __post_init__(self):
        if not (isinstance(self.detect_photos, int) and self.detect_photos >= 1):
            raise CameraError(f"detect_photos must be a whole number >= 1, not {self.detect_photos!r}")
        if not (isinstance(self.detect_budget, (int, float)) and self.detect_budget > 0):
            raise CameraError(f"detect_budget must be a positive number of seconds, not {self.detect_budget!r}")


def measure_detection(photos: list[np.ndarray], aligner_for, budget: float) -> list[dict]:
    """Every setting of :data:`DETECTORS_TRIED` × :data:`UPSAMPLES_TRIED` run on ``photos`` (RGB
    arrays): per setting the photos with a face, the faces, and the detector's seconds per photo
    (the first photo is run once untimed: model and buffer set-up).  ``aligner_for(detector,
    upsample)`` gives a :class:`~dlibbridge.data.align.FaceAligner` (this layer cannot build the
    torch CNN itself).  A setting slower than ``budget`` after :data:`TIMED_BEFORE_ABANDON`
    photos is abandoned (``complete`` False) and its detector's larger upsamplings skipped."""
    import time

    trials = []
    for detector in DETECTORS_TRIED:
        for upsample in UPSAMPLES_TRIED:
            aligner = aligner_for(detector, upsample)
            aligner.detect(photos[0])
            with_face = faces = 0
            seconds = 0.0
            for n, rgb in enumerate(photos, 1):
                start = time.perf_counter()
                found = len(aligner.detect(rgb))
                seconds += time.perf_counter() - start
                with_face, faces = with_face + (found > 0), faces + found
                if n >= TIMED_BEFORE_ABANDON and seconds / n > budget:
                    break
            per_photo = seconds / n
            trials.append({"detector": detector, "upsample": upsample, "photos": n, "photos_with_face": with_face,
                           "faces": faces, "seconds_per_photo": round(per_photo, 4),
                           "photos_per_s": round(1 / max(per_photo, 1e-9), 2), "complete": n == len(photos)})
            if per_photo > budget:
                break
    return trials


def choose_detection(trials: list[dict], budget: float) -> dict | None:
    """The rule: among the settings that ran on every photo within ``budget`` seconds per photo,
    the cheapest whose photos with a face reach :data:`FOUND_SHARE` of the most any of them
    found (more faces first, then cost); None when none found a face."""
    ok = [t for t in trials if t["complete"] and t["seconds_per_photo"] <= budget]
    best = max((t["photos_with_face"] for t in ok), default=0)
    if best == 0:
        return None
    good = [t for t in ok if t["photos_with_face"] >= FOUND_SHARE * best]
    t = min(good, key=lambda t: t["seconds_per_photo"])
    return {"detector": t["detector"], "upsample": t["upsample"]}


def _search_detection(files: list[Path], search: DetectionSearch, cnn_factory) -> dict | None:
    """:func:`measure_detection` on ``search.detect_photos`` readable photos (not chips) spread
    over ``files``, and its choice; None when there is no photo."""
    from .align import FaceAligner
    from .images import ImageReadError, read_image

    photos = []      # a few more candidates than needed, spread over the folder: some are chips
    for i in np.unique(np.linspace(0, len(files) - 1, min(len(files), 4 * search.detect_photos)).round().astype(int)):
        try:
            rgb = read_image(files[i]).rgb
        except (ImageReadError, OSError):
            continue
        if rgb.shape[:2] != (CHIP, CHIP):
            photos.append(rgb)
    if not photos:
        return None
    if len(photos) > search.detect_photos:
        photos = [photos[i] for i in np.linspace(0, len(photos) - 1, search.detect_photos).round().astype(int)]
    trials = measure_detection(photos, lambda d, u: FaceAligner(d, u, cnn_factory=cnn_factory), search.detect_budget)
    return {"setting": choose_detection(trials, search.detect_budget), "budget_s": search.detect_budget,
            "rule": f"cheapest setting within the budget whose photos with a face reach {FOUND_SHARE:.0%} of the most",
            "trials": trials}


def _valid_detection(obj) -> dict | None:
    """A profile's ``detection`` entry, checked where ``align --camera`` will use it."""
    if obj is None:
        return None
    setting = obj.get("setting") if isinstance(obj, dict) else "missing"
    if setting is not None and not (isinstance(setting, dict) and setting.get("detector") in DETECTORS_TRIED
                                    and isinstance(setting.get("upsample"), int)
                                    and not isinstance(setting.get("upsample"), bool) and 0 <= setting["upsample"] <= 8):
        raise CameraError(f"camera profile's detection setting is not {{\"detector\": {'|'.join(DETECTORS_TRIED)}, "
                          f"\"upsample\": 0..8}}: {setting!r}")
    return obj


def format_detection(detection: dict) -> list[str]:
    """The detection search as a few lines of the profile's summary."""
    trials = detection.get("trials", [])
    n = max((t["photos"] for t in trials), default=0)
    lines = [f"  detection     on {n} photos: " + ", ".join(
        f"{t['detector']}@{t['upsample']} {t['photos_with_face']}/{t['photos']} ({t['photos_per_s']:g}/s"
        + ("" if t["complete"] else ", over budget") + ")" for t in trials)]
    s = detection.get("setting")
    lines.append(f"  chosen        {s['detector']} upsample {s['upsample']} ({detection.get('rule')})" if s
                 else "  chosen        none: no setting found a face within the budget")
    return lines


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def load_camera(path: str | os.PathLike) -> CameraProfile:
    """Read a ``camera.json``; :class:`CameraError` (one line) for anything else."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise CameraError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CameraError(f"{p}: not a readable camera profile ({e.__class__.__name__})") from None
    return CameraProfile.from_json(obj)


_PNG_TITLE = "dlibbridge camera profile"


def _is_our_png(path: Path) -> bool:
    """The PNG carries our title in a text chunk (within its first few hundred bytes)."""
    try:
        with open(path, "rb") as f:
            return _PNG_TITLE.encode() in f.read(4096)
    except OSError:
        return False


def _is_our_profile(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == PROFILE_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_output(out: str | os.PathLike, photos_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output inside the input folder (it would be measured next time), and an
    existing JSON or PNG unless ``overwrite`` and it is one we wrote (the JSON's format tag,
    the PNG's title chunk)."""
    if not Path(photos_dir).exists():
        raise CameraError(f"{photos_dir}: no such folder")
    if not Path(photos_dir).is_dir():
        raise CameraError(f"{photos_dir}: not a folder")
    out, src = resolved(out, "-o"), resolved(photos_dir, "PHOTOS_DIR")
    if out.suffix.lower() == ".png":
        raise CameraError(f"{out}: the profile is JSON (its plot goes beside it as .png); name it e.g. camera.json")
    if out.is_relative_to(src):
        raise CameraError(f"{out}: the output must not be inside the photos folder {src}")
    for p in (out, out.with_suffix(".png")):
        if p.is_dir():
            raise CameraError(f"{p}: is a folder")
    if out.exists():
        if not overwrite:
            raise CameraError(f"{out} exists; pass --overwrite to replace it")
        if not _is_our_profile(out):
            raise CameraError(f"{out} exists and is not a camera profile; not replacing it")
    png = out.with_suffix(".png")
    if png.exists():
        if not overwrite:
            raise CameraError(f"{png} exists; pass --overwrite to replace it")
        if not _is_our_png(png):
            raise CameraError(f"{png} exists and is not a camera profile's plot; not replacing it")
    if not out.parent.is_dir():
        raise CameraError(f"{out.parent}: no such folder")


def write_camera(profile: CameraProfile, out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` (the JSON) and the PNG of the distributions beside it, each written atomically."""
    out = Path(out)
    png = out.with_suffix(".png")
    _plot(profile, png)
    write_json(out, profile.to_json(), indent=1)
    return out, png


def _plot(profile: CameraProfile, path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(FIELDS)
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, name in zip(axes.flat, names):
        v = profile.values(name)
        if len(v):
            ax.hist(v, bins=min(40, max(5, len(v) // 3)), color="#4477aa")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name}\n({FIELDS[name]})", fontsize=9)
    ax = axes.flat[len(names)]
    ch = profile.channel_fractions()
    ax.bar(list(ch), list(ch.values()), color="#aa7744")
    ax.set_ylim(0, 1)
    ax.set_title("channels (fraction of faces)", fontsize=9)
    fig.suptitle(f"camera profile: {len(profile.records)} faces from {profile.source.get('folder', '?')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Title": _PNG_TITLE})
    plt.close(fig)
    write_atomic(path, buf.getvalue())
