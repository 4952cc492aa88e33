"""Photos in: any image a user is likely to have → the 8-bit RGB array dlib's detector and ``get_face_chip`` expect.

:func:`read_image` raises :class:`ImageReadError` whose ``reason`` is one of the stable codes in
:data:`REASONS`: a data set of thousands of photos always holds a few broken ones, and callers
record the reason and move on.  The decoding decisions are listed in :mod:`dlibbridge.data.store`'s
predecessor notes below (each keeps chips identical to what dlib computes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import warnings

import numpy as np
from ..errors import DlibbridgeError


#: Why a file was not turned into an image.  Codes are stable (they go into manifests).
REASONS = {
    "zero_size": "the file has 0 bytes",
    "empty": "the file holds only NUL bytes or whitespace",
    "unreadable": "the file could not be read (permissions, not a regular file, I/O error)",
    "not_an_image": "not an image file",
    "unsupported_format": "an image format outside JPEG/PNG/BMP/WebP/TIFF/PNM/GIF",
    "too_large": "more pixels than the decompression-bomb limit (max_pixels)",
    "truncated": "the image data ends early",
    "corrupt": "the header or the compressed data is damaged",
    "unsupported_mode": "a pixel type with no defined 8-bit RGB rendering (e.g. float)",
}

#: Pillow format names we decode.  PPM covers PBM/PGM/PPM; MPO is the multi-picture JPEG that
#: many cameras write (first frame used).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "DIB", "WEBP", "TIFF", "PPM", "GIF"})

#: Default decompression-bomb guard: 40 megapixels (a 48 MP phone photo must be allowed
#: explicitly).  Checked from the header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000

DECODERS = ("dlib", "pillow")

# Leading bytes of the formats we accept: a file that starts like an image but that Pillow
# cannot even identify is damaged, not "not an image".
_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*",
               b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


class ImageReadError(DlibbridgeError, ValueError):
    """A file that could not be read as an image; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str, path: str | os.PathLike | None = None):
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{reason}: {detail}" + (f" ({self.path})" if self.path else ""))


@dataclasses.dataclass
class Photo:
    """A decoded image: ``rgb`` is (H, W, 3) uint8, already EXIF-oriented."""

    rgb: np.ndarray
    format: str           # Pillow's format name, e.g. 'JPEG'
    mode: str             # Pillow's mode of the stored pixels, e.g. 'CMYK', 'I;16'
    orientation: int      # EXIF orientation that was applied (1 = none)
    decoder: str          # 'dlib' or 'pillow'
    note: str = ""        # harmless decoder warnings, e.g. extraneous bytes in a JPEG


@contextlib.contextmanager
def _truncation_is_an_error():
    """Pillow reads truncation as an error only while its process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False, and ``import face_recognition`` sets it True
    for the whole process: a truncated photo would then decode with grey rows, silently.  The
    flag is held False for our decode and put back as it was."""
    from PIL import ImageFile
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               decoder: str = "dlib") -> Photo:
    """Decode ``path`` to 8-bit RGB, or raise :class:`ImageReadError` (never anything else
    for a bad file: callers process thousands of files and must not die on one)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    from PIL import Image

    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
        if not os.path.isfile(path):
            raise ImageReadError("unreadable", "not a regular file", path)
        if size == 0:
            raise ImageReadError("zero_size", REASONS["zero_size"], path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ImageReadError("unreadable", f"{type(e).__name__}: {e.strerror or e}", path) from None

    with warnings.catch_warnings(), _truncation_is_an_error():
        # Our own max_pixels check replaces Pillow's global limit (a process-wide setting we
        # must not change); its warning below 2x the limit would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageReadError("too_large", str(e), path) from None
        except Exception as e:  # Pillow raises many types for bad headers
            raise _unidentified(path, head, e) from None
        with im:
            return _decode(im, path, max_pixels, decoder)


def _unidentified(path: str, head: bytes, err: Exception) -> ImageReadError:
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        detail = f"image header not readable ({type(err).__name__}: {err})"
        return ImageReadError("truncated" if "truncated" in detail.lower() else "corrupt", detail, path)
    if _only_filler(path):
        return ImageReadError("empty", REASONS["empty"], path)
    return ImageReadError("not_an_image", "no known image format recognised", path)


def _only_filler(path: str) -> bool:
    filler = b"\x00 \t\r\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if block.strip(filler):
                return False
    return True


def _decode(im, path: str, max_pixels: int, decoder: str) -> Photo:
    from PIL import Image

    fmt = im.format or "?"
    if fmt not in SUPPORTED_FORMATS:
        raise ImageReadError("unsupported_format", f"{fmt} images are not supported", path)
    w, h = im.size
    if w * h > max_pixels:
        raise ImageReadError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}", path)
    orientation = _exif_orientation(im)
    note = ""
    rgb = None
    used = "pillow"
    if decoder == "dlib" and fmt in ("JPEG", "MPO"):
        rgb, note = _decode_jpeg_with_dlib(path, (h, w))
        used = "dlib" if rgb is not None else "pillow"
    if rgb is None:
        try:
            im.seek(0)
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageReadError("too_large", str(e), path) from None
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            reason = "truncated" if "truncated" in msg.lower() else "corrupt"
            raise ImageReadError(reason, msg, path) from None
        rgb = _to_rgb8(im, path)
        if note:
            note = f"decoded by Pillow after dlib failed: {note}"
    rgb = np.ascontiguousarray(_orient(rgb, orientation))
    return Photo(rgb, fmt, im.mode, orientation, used, note)


def _exif_orientation(im) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # damaged EXIF must not cost the photo; it is just not rotated
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W, C) array: the same pixels Pillow's
    ``ImageOps.exif_transpose`` gives, done on numpy so dlib-decoded arrays get it too."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(a, 1)
    return a


# libjpeg warnings that leave a correct image: junk between segments, common in camera files.
_HARMLESS_JPEG_WARNINGS = ("extraneous bytes before marker",)


def _decode_jpeg_with_dlib(path: str, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """dlib's decoder, with libjpeg's warnings (printed to fd 2) captured and classified.
    Returns (None, why) when dlib cannot decode the file at all, so Pillow gets a try."""
    import dlib

    with _captured_stderr() as captured:
        try:
            rgb = dlib.load_rgb_image(path)
            failure = ""
        except Exception as e:
            rgb, failure = None, f"{type(e).__name__}: {e}"
    messages = [m.strip() for m in captured[0].splitlines() if m.strip()]
    if rgb is None:
        return None, failure or "; ".join(messages)
    serious = [m for m in messages if not any(h in m for h in _HARMLESS_JPEG_WARNINGS)]
    if serious:
        text = "; ".join(serious)
        reason = "truncated" if "premature end of jpeg file" in text.lower() else "corrupt"
        raise ImageReadError(reason, f"libjpeg: {text}", path)
    if rgb.shape != (*shape, 3):
        raise ImageReadError("corrupt", f"decoded {rgb.shape}, header says {shape}", path)
    return rgb, "; ".join(messages)


@contextlib.contextmanager
def _captured_stderr():
    """Capture what C code writes to file descriptor 2 (libjpeg's warnings) while the block
    runs; yields a one-element list that holds the text afterwards."""
    out = [""]
    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield out
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                out[0] = tmp.read().decode("utf-8", "replace")
    finally:
        os.close(saved)


def _to_rgb8(im, path: str) -> np.ndarray:
    """Pillow image of any mode → (H, W, 3) uint8 following the module's decoding rules."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode == "L":
        return np.repeat(np.asarray(im)[:, :, None], 3, axis=2)
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, and I (Pillow's 16-bit PGM)
        v = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8
        return np.repeat(v.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA"):
        a = np.asarray(im).astype(np.uint32)
        alpha = a[:, :, -1:]
        color = a[:, :, :3] if mode == "RGBA" else np.repeat(a[:, :, :1], 3, axis=2)
        return ((color * ((alpha << 8) // 255)) >> 8).astype(np.uint8)
    if mode == "F":
        raise ImageReadError("unsupported_mode", "floating-point pixels have no defined 8-bit range", path)
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa: Pillow knows the formula
        return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ImageReadError("unsupported_mode", f"mode {mode}: {e}", path) from None


# --------------------------------------------------------------------------------------------
# Folders of images
# --------------------------------------------------------------------------------------------

#: File names taken for images where a folder is scanned by name (what :func:`read_image` decodes).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".pnm", ".gif"})

#: dlib's face ResNet input: input_rgb_image_sized<150>, the chip compute_face_descriptor makes.
CHIP_SIZE = 150
CHIP_SHAPE = (CHIP_SIZE, CHIP_SIZE, 3)


def is_chip_sized(path: str | os.PathLike) -> bool:
    """A 150x150 image, which ``evaluate`` and the face jobs take as an aligned chip rather than
    a photo to detect faces in (only the header is read)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size == (CHIP_SIZE, CHIP_SIZE)
    except Exception:                  # unreadable: the alignment pipeline reports why
        return False


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def walk_files(root: str | os.PathLike) -> list[str]:
    """Every file below ``root``, hidden files and folders left out, as sorted POSIX paths
    relative to ``root`` (the one folder walk of align, pack and embed)."""
    root = os.fspath(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rels.extend(os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/")
                    for n in filenames if not n.startswith("."))
    return sorted(rels)
