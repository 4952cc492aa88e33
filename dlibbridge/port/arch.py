"""PyTorch modules that compute exactly what dlib's face ResNet computes.

Every quirk here is one of dlib's, documented in ../shared/docs/dlib-format.md §6–7:

* :class:`DlibInput` — RGB pixels → ``(x − mean_c)/256`` (dlib divides by 256, not 255,
  and does not divide by a std); it refuses input it would have to guess about
  (:class:`InputSpecError`) and states what it takes (``input_spec``).
* :func:`dlib_padding` — dlib's default padding: ``k//2`` at stride 1, **0** at any other
  stride (so the stride-2 3×3 convolutions of the down blocks are unpadded).
* :func:`add_prev` — dlib's ``add_prev`` zero-pads the *smaller* operand at the *end* of
  every dimension (extra channels appended, spatial gap bottom/right).  The face ResNet's
  shortcuts are parameter-free and rely on it: 32→64 channels, and 3×3 + 4×4 → 4×4.
* :class:`DlibAffine` — the deployed form of a batch-norm: a frozen per-channel
  ``scale·x + shift``.  :class:`DlibBatchNorm2d` — the trainable form, a ``BatchNorm2d``
  with dlib's eps, dlib's running-average schedule (cumulative while the window fills, then
  ``1/(window+1)``) and dlib's rule that a one-sample batch always runs on running stats.
* global average pooling and a bias-free ``Linear`` head.

The network is assembled from small blocks (:class:`ResBlock`, :class:`ResDownBlock`)
named after dlib's own source (``level4`` … ``level0``), so a parity failure names the
block; :meth:`FaceResNet.forward_intermediates` returns every block's output.

This module knows nothing about dlib files; ``convert`` maps records to these modules.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codec.records import DLIB_BN_EPS, DLIB_BN_WINDOW, DLIB_RGB_MEAN
from ..errors import DlibbridgeError
from . import onednn


def dlib_padding(kernel: int, stride: int) -> int:
    """dlib's template default padding for con_/max_pool_/avg_pool_: ``k//2`` at stride 1,
    otherwise 0 (not PyTorch's usual 'same'-style ``k//2`` for every stride)."""
    return kernel // 2 if stride == 1 else 0


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the output takes the larger size in every dimension; each operand
    is zero-padded at the end (channels appended, rows/columns at the bottom/right)."""
    if a.shape == b.shape:
        return a + b
    if a.shape[0] != b.shape[0]:
        # dlib pads samples too, but a residual network never mixes batch sizes.
        raise ValueError(f"add_prev: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])
    return _pad_end(a, c, h, w) + _pad_end(b, c, h, w)


def _pad_end(t: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    if t.shape[1:] == (c, h, w):
        return t
    return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))


class InputSpecError(DlibbridgeError, ValueError):
    """Input the network cannot take as it is — wrong rank, channel count or size, or a
    floating batch in the 0–1 range; the message says what it expects (``input_spec``)."""


class DlibInput(nn.Module):
    """uint8 (or 0–255 float) RGB chips → dlib's normalised NCHW float tensor.

    Accepts ``(N,H,W,3)`` (the layout of an image array), ``(N,3,H,W)``, or a single chip
    without the batch dimension; :attr:`input_spec` states it.  Anything else is refused with
    :class:`InputSpecError` rather than guessed at:

    * a size other than the network's: dlib's ``input_rgb_image_sized`` refuses it too, and a
      resized chip would silently give a different descriptor;
    * a channel count other than 3 (grayscale, RGBA);
    * a floating batch whose values all lie within [0, 1] with at least one strictly between
      0 and 1 — torchvision's ``ToTensor`` range, which dlib's means would turn into
      descriptors ~0.2 from dlib's.  Pixels converted from 8-bit images are whole numbers, so
      the rule never fires on a real 0–255 batch, however dark (a 0–255 batch that does match
      it is black: every pixel below 1).

    The checks run in eager mode only: a traced or exported graph takes its input as the trace
    did (the exports take uint8, where no range is ambiguous).
    """

    def __init__(self, size: tuple[int, int] | None = (150, 150), mean: Sequence[float] = DLIB_RGB_MEAN):
        super().__init__()
        # None: dlib's input_rgb_image, which takes any size (the generic port's detectors).
        self.size = None if size is None else (int(size[0]), int(size[1]))
        # float32, like dlib's avg_red/avg_green/avg_blue fields.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def input_spec(self) -> dict:
        """What the network takes, in the manner of timm's ``pretrained_cfg``: ``input_size``
        (C, H, W; H and W None for a network that takes any size), the accepted ``layouts``
        and ``dtypes``, the value ``range``, the ``channel_order``, and the normalisation dlib
        applies — ``(x − mean) / std`` on the 0–255 scale (dlib divides by 256, not 255)."""
        h, w = self.size or (None, None)
        return {"input_size": (3, h, w), "layouts": ("NHWC", "NCHW", "HWC", "CHW"),
                "dtypes": ("uint8", "float 0-255"), "range": (0, 255), "channel_order": "RGB",
                "mean": tuple(float(f"{m:.6g}") for m in self.mean.flatten().tolist()), "std": (256.0, 256.0, 256.0)}

    def _expects(self) -> str:
        size = f"{self.size[0]}x{self.size[1]} " if self.size else ""
        return f"the network takes {size}RGB chips, (N,H,W,3) or (N,3,H,W), uint8 or float 0-255"

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the means (122.782 is 122.75 in fp16): they stay
        # float32, only their device follows the module.
        mean = self.mean
        out = super()._apply(fn, recurse)
        self.mean = mean.to(device=self.mean.device)
        return out

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, np.ndarray):          # chips as dlib and OpenCV hand them out
            x = torch.from_numpy(np.ascontiguousarray(x)).to(self.mean.device)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise InputSpecError(f"{self._expects()}; got shape {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[3] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise InputSpecError(f"{self._expects()}; got shape {tuple(x.shape)}, which has no axis of 3 "
                                 "channels (grayscale or RGBA: convert to RGB)")
        if self.size is not None and (x.shape[2], x.shape[3]) != self.size:
            raise InputSpecError(f"{self._expects()}; got {x.shape[2]}x{x.shape[3]} (dlib's input_rgb_image_sized "
                                 f"needs exactly {self.size[0]}x{self.size[1]}: align with dlib.get_face_chip, "
                                 "never resize)")
        if x.is_floating_point() and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            lo, hi = torch.aminmax(x)
            if hi <= 1 and lo >= 0 and bool(((x > 0) & (x < 1)).any()):
                raise InputSpecError(f"{self._expects()}; got a {str(x.dtype).replace('torch.', '')} batch in the "
                                     "0-1 range (every value within [0, 1]): multiply it by 255, or pass the uint8 "
                                     "pixels")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_nchw(x)
        # Subtract in float32 first (as dlib does), then ×2⁻⁸ (= /256 bit for bit), in place
        # on the one new tensor.  Image-layout chips (N,H,W,3) are normalised as flat rows
        # against the means tiled per pixel: broadcasting a 3-long innermost dimension ran
        # 2–4× slower, ~6% of a CPU forward (tools/bench_embed.py).
        n, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            rows = x.permute(0, 2, 3, 1).reshape(n, h * w * c)           # a view: no copy
            y = torch.sub(rows.to(torch.float32), self.mean.view(c).repeat(h * w)).mul_(1.0 / 256.0)
            return y.view(n, h, w, c).permute(0, 3, 1, 2)
        return torch.sub(x.to(torch.float32), self.mean).mul_(1.0 / 256.0)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class DlibAffine(nn.Module):
    """dlib's ``affine_`` in CONV_MODE: ``y = scale_c·x + shift_c`` with frozen buffers.

    dlib never trains an affine layer (it is the deployed form of a batch-norm), so these
    are buffers, not parameters: an optimiser over ``parameters()`` cannot move them.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("shift", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.view(1, -1, 1, 1).to(x.dtype)
        b = self.shift.view(1, -1, 1, 1).to(x.dtype)
        # One fused pass (b + x·s) instead of two; never in place: hooks may hold x.
        return torch.addcmul(b, x, s)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class DlibBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` with dlib's ``bn_con`` semantics, so fine-tuning behaves as in dlib.

    * eps comes from the file (1e-4, not PyTorch's 1e-5);
    * running stats: decay ``1/(n+1)`` with ``n = num_batches_tracked`` capped at ``window``
      — a cumulative mean while the window fills, then a fixed ``1/(window+1)``;
    * a batch of one sample always uses the running stats, even in ``train()`` (dlib's
      ``bn_`` switches on ``num_samples > 1``, it has no train/eval flag).

    ``eps`` and ``window`` travel in the state dict as extra state (they are per-record
    values of the dlib file).
    """

    def __init__(self, num_features: int, eps: float = DLIB_BN_EPS, window: int = DLIB_BN_WINDOW):
        super().__init__(num_features, eps=eps, momentum=None, affine=True, track_running_stats=True)
        self.window = int(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        n = int(self.num_batches_tracked.item())
        decay = 1.0 / (min(n, self.window) + 1.0)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         True, decay, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.fill_(min(n + 1, self.window))
        return y

    def get_extra_state(self):
        return {"eps": float(self.eps), "window": int(self.window)}

    def set_extra_state(self, state) -> None:
        self.eps = float(state["eps"])
        self.window = int(state["window"])

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, window={self.window}"


NormFactory = Callable[[int], nn.Module]


def norm_factory(trainable: bool) -> NormFactory:
    """The per-channel normalisation of each form: frozen affine or trainable batch-norm."""
    return DlibBatchNorm2d if trainable else DlibAffine


class ConvNorm(nn.Sequential):
    """con_ → affine_/bn_con (+ relu_): the unit every dlib block is made of.

    Frozen form without autograd (inference): the affine is folded into the convolution,
    ``conv(x; w·g, b·g + s)``, one pass over the activations instead of two (the affine pass
    was ~18% of a CPU forward), and on CPU the relu, or a residual block's add-then-relu,
    runs as a post-op of the convolution on weights reordered once per input shape
    (:mod:`.onednn`).  The folded and reordered weights are cached (a copy of the conv
    weights, 22 MB for the face net, and one per input shape for the last few shapes) and
    rebuilt when any of the four tensors changes (in-place updates bump their version;
    ``.to()`` replaces them).  Rounding differs from conv-then-affine in the last bits only:
    descriptors stay within 1e-6 of dlib (tests/test_port_arch.py).  With autograd, under
    forward hooks on the unit's layers (calibration), under tracing/compiling (exports keep
    dlib's layer structure) and in the trainable form, the layers run as written.
    """

    #: Input shapes whose reordered weights are kept: a batch loop sees its chunk size and
    #: the last, smaller batch.
    packed_shapes = 3

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, norm: NormFactory,
                 relu: bool, padding: int | None = None):
        pad = dlib_padding(kernel, stride) if padding is None else padding
        layers = [("conv", nn.Conv2d(cin, cout, kernel, stride, pad, bias=True)), ("norm", norm(cout))]
        if relu:
            layers.append(("relu", nn.ReLU(inplace=True)))
        super().__init__(OrderedDict(layers))
        self._folded: tuple | None = None
        self._packed: OrderedDict = OrderedDict()

    def __getstate__(self):
        # Caches are rebuilt on demand; reordered oneDNN tensors cannot be pickled.
        state = dict(super().__getstate__())
        state["_folded"], state["_packed"] = None, OrderedDict()
        return state

    def runs_folded(self) -> bool:
        """Whether :meth:`folded` computes this unit now (see the class docstring)."""
        return not (not isinstance(self.norm, DlibAffine) or torch.is_grad_enabled() or _hooked(self)
                    or torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.jit.is_scripting())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_folded():
            return super().forward(x)
        return self.folded(x)

    def folded(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The unit with its affine folded in (only when :meth:`runs_folded`); with
        ``residual``, ``relu(unit(x) + residual)``: the tail of a residual block, in one op."""
        w, b = self._folded_params(x)
        if residual is not None:
            return onednn.conv_add_relu(x, residual, w, b, self.conv)
        return onednn.conv(x, w, b, self.conv, relu=len(self) > 2)

    def _folded_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv, norm = self.conv, self.norm
        tensors = (conv.weight, conv.bias, norm.scale, norm.shift)
        # Inference tensors (made under torch.inference_mode) carry no version counter, so a
        # cached fold could not notice an edit: fold them afresh on every call.
        if any(t.is_inference() for t in tensors):
            return self._fold(x.dtype)
        key = (x.dtype,) + tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *self._fold(x.dtype))
            self._packed.clear()
        w, b = self._folded[1], self._folded[2]
        if not onednn.applies(x):
            return w, b
        shape = tuple(x.shape)
        if shape not in self._packed:
            self._packed[shape] = onednn.pack(w, conv, x.shape)
            while len(self._packed) > self.packed_shapes:
                self._packed.popitem(last=False)
        self._packed.move_to_end(shape)
        return self._packed[shape], b

    def _fold(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        conv, norm = self.conv, self.norm
        g, s = norm.scale.to(dtype), norm.shift.to(dtype)
        w = conv.weight * g.view(-1, 1, 1, 1)     # keeps the weight's memory format
        return w.to(dtype), torch.addcmul(s, conv.bias.to(dtype), g)


def _hooked(unit: nn.Module) -> bool:
    """Whether a forward hook would see the unit's layers (module or global hooks): then they
    must run as written, so hooks on the affines (calibration, parity probes) see their inputs."""
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in unit.children())


class ResBlock(nn.Module):
    """dlib's ``ares<N>``: ``relu(block(x) + x)``, block = conv-norm-relu-conv-norm, 3×3 s1."""

    def __init__(self, channels: int, norm: NormFactory):
        super().__init__()
        self.branch1 = ConvNorm(channels, channels, 3, 1, norm, relu=True)
        self.branch2 = ConvNorm(channels, channels, 3, 1, norm, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branch1(x)
        if self.branch2.runs_folded():
            return self.branch2.folded(h, residual=x)
        return (self.branch2(h) + x).relu_()


class ResDownBlock(nn.Module):
    """dlib's ``ares_down<N>``: ``relu(add_prev(block_s2(x), avg_pool2x2_s2(x)))``.

    The shortcut has no projection: fewer channels and (at two levels) a larger spatial
    size than the main path, reconciled by :func:`add_prev`'s zero padding at the end.
    """

    def __init__(self, cin: int, cout: int, norm: NormFactory):
        super().__init__()
        self.branch1 = ConvNorm(cin, cout, 3, 2, norm, relu=True)      # 3×3 stride 2, pad 0
        self.branch2 = ConvNorm(cout, cout, 3, 1, norm, relu=False)
        self.shortcut = nn.AvgPool2d(2, 2, 0, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_prev(self.branch2(self.branch1(x)), self.shortcut(x)).relu_()


class Stem(nn.Module):
    """con 7×7 s2 → norm → relu → max_pool 3×3 s2 (paddings as stored in the file)."""

    def __init__(self, channels: int, norm: NormFactory, kernel: int = 7, stride: int = 2,
                 padding: int = 0, pool: tuple[int, int, int] = (3, 2, 0)):
        super().__init__()
        self.unit = ConvNorm(3, channels, kernel, stride, norm, relu=True, padding=padding)
        k, s, p = pool
        # dlib's max pool takes the max of the window clipped to the image = -inf padding.
        self.pool = nn.MaxPool2d(k, s, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.unit(x))


# dlib's face ResNet (anet_type in dlib/examples/dnn_face_recognition_ex.cpp):
# levels from the input side; each entry is (channels, blocks, first block downsamples).
FACE_RESNET_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


def default_config() -> dict:
    """Plain-data description of the shipped face ResNet (what ``FaceResNet`` builds)."""
    return {
        "input_size": [150, 150],
        "stem": {"channels": 32, "kernel": 7, "stride": 2, "padding": 0, "pool": [3, 2, 0]},
        "levels": [list(lv) for lv in FACE_RESNET_LEVELS],
        "embed_dim": 128,
        "trainable": False,
    }


class FaceResNet(nn.Module):
    """dlib's face-recognition ResNet: RGB chips → 128-d descriptors, exactly as dlib.

    ``config`` is plain data (see :func:`default_config`) so a model can be rebuilt from a
    ``weights_only`` checkpoint.  Levels are named like dlib's source: ``level4`` is next to
    the input, ``level0`` next to the head.  ``trainable`` picks the normalisation form.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = default_config() if config is None else config
        self.config = cfg
        norm = norm_factory(bool(cfg["trainable"]))
        st = cfg["stem"]
        self.input = DlibInput(tuple(cfg["input_size"]))
        self.stem = Stem(st["channels"], norm, st["kernel"], st["stride"], st["padding"], tuple(st["pool"]))
        cin = st["channels"]
        nlev = len(cfg["levels"])
        for i, (ch, nblocks, down) in enumerate(cfg["levels"]):
            blocks = []
            for b in range(nblocks):
                if b == 0 and down:
                    blocks.append(ResDownBlock(cin, ch, norm))
                else:
                    if cin != ch:
                        raise ValueError(f"level{nlev - 1 - i}: a non-down block cannot change "
                                         f"channels ({cin}→{ch})")
                    blocks.append(ResBlock(ch, norm))
                cin = ch
            self.add_module(f"level{nlev - 1 - i}", nn.Sequential(*blocks))
        self.level_names = [f"level{nlev - 1 - i}" for i in range(nlev)]
        self.fc = nn.Linear(cin, cfg["embed_dim"], bias=False)   # dlib's fc_no_bias
        # Metadata of the source dlib file (loss margins, etc.), not used by forward.
        self.dlib_meta: dict = {}
        # Original dlib file bytes, kept so that export of unchanged weights is byte-identical.
        self.dlib_source: bytes | None = None

    @property
    def trainable(self) -> bool:
        return bool(self.config["trainable"])

    @property
    def input_spec(self) -> dict:
        """What ``forward`` takes: :attr:`DlibInput.input_spec`."""
        return self.input.input_spec

    def levels(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.level_names]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input tensor → descriptors (no layout handling)."""
        x = self.stem(x)
        for lv in self.levels():
            x = lv(x)
        return self.fc(torch.flatten(x.mean((2, 3)), 1))

    #: CPU inference (eval, no autograd) runs large batches this many chips at a time, so a
    #: chunk's activations stay in cache: ~30% faster at batch 256 on a 2-core AVX2 machine
    #: (tools/bench_embed.py).  Samples are independent in eval, so results do not change.
    cpu_chunk = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        w = self.fc.weight
        if x.dtype != w.dtype:
            x = x.to(w.dtype)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # One graph for every batch size: tested first, so that tracing and torch.export
            # never see (and guard on) the batch size below.  Traced/compiled callers set the
            # TF32 flags themselves: the toggle is not traced.
            return self.embed(x)
        if (x.device.type == "cpu" and x.shape[0] > self.cpu_chunk and not torch.is_grad_enabled()
                and not any(m.training for m in self.modules())):   # a norm in train() couples the batch
            return torch.cat([self.embed(c) for c in x.split(self.cpu_chunk)])
        if x.is_cuda and x.dtype == torch.float32:
            with _ieee_fp32():
                return self.embed(x)
        return self.embed(x)

    @torch.no_grad()
    def forward_intermediates(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Every stage's output, input to output, keyed by module name: ``input``, ``stem``,
        ``level4.0`` … ``level0.0``, ``pool``, ``fc``.  For layer-by-layer parity checks."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.input(x).to(self.fc.weight.dtype)
        out["input"] = x
        x = self.stem(x)
        out["stem"] = x
        for name, lv in zip(self.level_names, self.levels()):
            for j, block in enumerate(lv):
                x = block(x)
                out[f"{name}.{j}"] = x
        x = torch.flatten(x.mean((2, 3)), 1)
        out["pool"] = x
        out["fc"] = self.fc(x)
        return out


@contextlib.contextmanager
def _ieee_fp32():
    """Plain fp32 convolutions/matmuls on CUDA for the duration (TF32 would cost ~1e-3)."""
    cudnn, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, mm


def gflops_per_face(model: FaceResNet) -> float:
    """Multiply-adds ×2 of all convolutions and the fc for one chip (0.54 for the face net)."""
    total = 0
    h, w = model.config["input_size"]
    x = torch.zeros(1, 3, h, w)
    hooks = []

    def conv_hook(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups

    def fc_hook(m, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(fc_hook))
    try:
        with torch.enable_grad():     # the unfolded path, where every Conv2d module runs (and hooks)
            model.embed(x.to(model.fc.weight.dtype))
    finally:
        for hk in hooks:
            hk.remove()
    return total / 1e9


__all__ = [
    "DLIB_RGB_MEAN", "DLIB_BN_EPS", "DLIB_BN_WINDOW", "dlib_padding", "add_prev", "InputSpecError", "DlibInput",
    "DlibAffine", "DlibBatchNorm2d", "norm_factory", "ConvNorm", "ResBlock", "ResDownBlock", "Stem",
    "FACE_RESNET_LEVELS", "default_config", "FaceResNet", "gflops_per_face",
]
