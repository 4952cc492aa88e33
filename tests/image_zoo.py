"""A folder of every kind of image file a real data set contains, built at test time.

Each entry says what ``read_image`` must do with it: the failure reason, or the exact RGB
array it must return — computed here independently of ``dlibbridge.data`` (dlib's own
decoder, numpy arithmetic, or Pillow's documented conversion where that is the definition).
The face in the good files is a 180×180 crop of dlib's example photo ``2009_004587.jpg``
(HOG finds it at upsample 1), so ``align`` must produce a chip from each of them.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Expect:
    reason: str | None = None            # ImageReadError.reason, or None for a good file
    rgb: np.ndarray | None = None        # what read_image must return exactly
    face: bool | None = None             # align must find the face (None: no claim)
    note: str = ""                       # substring of Photo.note


def face_crop(shared_dir: Path) -> np.ndarray:
    import dlib
    img = dlib.load_rgb_image(str(shared_dir / "data" / "faces" / "2009_004587.jpg"))
    return np.ascontiguousarray(img[0:180, 100:280])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims ``width``×``height`` but holds a few bytes of data: a
    decompression bomb must be refused from its header, before decoding."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def build_zoo(folder: Path, face: np.ndarray) -> dict[str, Expect]:
    """Write the files into ``folder``; returns file name → expectation."""
    import cv2
    import dlib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    zoo: dict[str, Expect] = {}
    pil = Image.fromarray(face)

    def path(name: str) -> str:
        return str(folder / name)

    def save(name: str, im, expect: Expect, **kw) -> None:
        im.save(path(name), **kw)
        zoo[name] = expect

    def dlib_decoded(name: str) -> np.ndarray:
        return dlib.load_rgb_image(path(name))

    # ---- good files, lossless: the pixels come back exactly ----
    for name, kw in [("photo.png", {}), ("photo.bmp", {}), ("photo.tif", {}),
                     ("photo.webp", {"lossless": True}), ("photo.ppm", {})]:
        save(name, pil, Expect(rgb=face, face=True), **kw)
    gray = pil.convert("L")
    save("photo_gray.pgm", gray, Expect(rgb=np.repeat(np.asarray(gray)[:, :, None], 3, 2), face=True))
    # ---- JPEG: dlib's own decoder is the reference ----
    for name, im, kw in [("photo.jpg", pil, {"quality": 95}),
                         ("photo_progressive.jpg", pil, {"quality": 90, "progressive": True}),
                         ("photo_gray.jpg", gray, {"quality": 95}),
                         ("photo_cmyk.jpg", pil.convert("CMYK"), {"quality": 95})]:
        im.save(path(name), **kw)
        zoo[name] = Expect(rgb=dlib_decoded(name), face=True)
    # ---- EXIF orientation 6 ("rotate 90° clockwise to display"): stored sideways ----
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(face, 1))).save(path("photo_exif6.jpg"), quality=95, exif=exif)
    zoo["photo_exif6.jpg"] = Expect(rgb=np.rot90(dlib_decoded("photo_exif6.jpg"), -1), face=True)
    # ---- junk bytes before the EOI marker: libjpeg warns, the image is intact ----
    data = open(path("photo.jpg"), "rb").read()
    open(path("photo_extra_bytes.jpg"), "wb").write(data[:-2] + b"\x00\x00\x00" + data[-2:])
    zoo["photo_extra_bytes.jpg"] = Expect(rgb=dlib_decoded("photo_extra_bytes.jpg"), face=True,
                                          note="extraneous bytes")
    # ---- 16-bit: the high byte is kept ----
    low = rng.integers(0, 256, face.shape, dtype=np.uint16)
    cv2.imwrite(path("photo_16bit.png"), np.ascontiguousarray(((face.astype(np.uint16) << 8) | low)[:, :, ::-1]))
    zoo["photo_16bit.png"] = Expect(rgb=face, face=True)
    g16 = (np.asarray(gray).astype(np.uint16) << 8) | low[:, :, 0]
    cv2.imwrite(path("photo_gray16.png"), g16)
    zoo["photo_gray16.png"] = Expect(rgb=np.repeat((g16 >> 8).astype(np.uint8)[:, :, None], 3, 2), face=True)
    with open(path("photo_gray16.pgm"), "wb") as f:
        f.write(b"P5\n%d %d\n65535\n" % (g16.shape[1], g16.shape[0]) + g16.astype(">u2").tobytes())
    zoo["photo_gray16.pgm"] = Expect(rgb=zoo["photo_gray16.png"].rgb, face=True)
    # ---- palette: the colours of the palette entries ----
    pal = pil.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    lut = np.array(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    save("photo_palette.png", pal, Expect(rgb=lut[np.asarray(pal)], face=True))
    save("photo.gif", pal, Expect(rgb=lut[np.asarray(pal)], face=True))
    # ---- transparency: composited onto black exactly as dlib's load_rgb_image does ----
    alpha = np.full(face.shape[:2], 255, np.uint8)
    alpha[:, :40] = np.linspace(0, 254, 40, dtype=np.uint8)   # a soft left edge, away from the face
    Image.fromarray(np.dstack([face, alpha]), "RGBA").save(path("photo_rgba.png"))
    zoo["photo_rgba.png"] = Expect(rgb=dlib_decoded("photo_rgba.png"), face=True)
    la = np.dstack([np.asarray(gray), alpha]).astype(np.uint32)
    Image.fromarray(la.astype(np.uint8), "LA").save(path("photo_la.png"))
    comp = ((la[:, :, 0] * ((la[:, :, 1] << 8) // 255)) >> 8).astype(np.uint8)
    zoo["photo_la.png"] = Expect(rgb=np.repeat(comp[:, :, None], 3, 2), face=True)
    # ---- CMYK TIFF: Pillow's CMYK→RGB conversion is the definition ----
    cmyk = pil.convert("CMYK")
    save("photo_cmyk.tif", cmyk, Expect(rgb=np.asarray(cmyk.convert("RGB")), face=True))
    # ---- bilevel PBM: 0 → black, 1 → white (a face may not survive dithering) ----
    bw = gray.convert("1")
    save("photo_bilevel.pbm", bw, Expect(rgb=np.repeat(np.asarray(bw, dtype=np.uint8)[:, :, None] * 255, 3, 2)))

    # ---- bad files ----
    jpeg = open(path("photo.jpg"), "rb").read()
    pngb = open(path("photo.png"), "rb").read()
    bad = {
        "zero_size.jpg": (b"", "zero_size"),
        "nul_bytes.jpg": (b"\0" * 4096, "empty"),
        "blank.png": (b"  \n\t\n", "empty"),
        "notes.txt": (b"photographer: unknown\n", "not_an_image"),
        "random.jpg": (b"RND" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_header.jpg": (jpeg[:200], "truncated"),
        "truncated.png": (pngb[: len(pngb) // 2], "truncated"),
        "corrupt_data.jpg": (jpeg[:1500] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + jpeg[4500:],
                             "corrupt"),
        "corrupt_header.png": (b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "corrupt"),
        "bomb.png": (_png_header_only(100_000, 100_000), "too_large"),
        "bomb_64mp.png": (_png_header_only(8000, 8000), "too_large"),
    }
    for name, (content, reason) in bad.items():
        with open(path(name), "wb") as f:
            f.write(content)
        zoo[name] = Expect(reason=reason)
    Image.new("RGB", (16, 16)).save(path("icon.ico"))
    zoo["icon.ico"] = Expect(reason="unsupported_format")
    Image.fromarray(np.ones((8, 8), np.float32)).save(path("float.tif"))
    zoo["float.tif"] = Expect(reason="unsupported_mode")
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling_link.jpg")
    zoo["dangling_link.jpg"] = Expect(reason="unreadable")
    return zoo
