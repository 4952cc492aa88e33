"""Any dlib DNN file in the codec's vocabulary → a PyTorch module that computes what dlib does.

The face ResNet has its own named port (:mod:`dlibbridge.arch`); this module covers every other
network — the MMOD detectors, the gender classifier, the DenseNet — from the record sequence
alone, layer by layer, with dlib's semantics (dlib-format.md §6):

* ``con_``: cross-correlation with the *stored* padding (dlib's default padding rule is already
  resolved in the file); a fused ``use_relu`` becomes a relu after it.
* ``bn_con2``/``bn_fc2``: folded into an affine in float32, exactly as dlib's inference types
  load them (``affine_(const bn_&)``); ``affine_`` per channel (CONV_MODE) or per element
  (FC_MODE); a disabled affine or relu is the identity.
* pooling: the clipped window of dlib (max: implicit −inf padding; average: padding
  excluded from the count); ``nr = nc = 0`` pools the whole input (``*_pool_everything``).
* ``fc_``: per-sample flatten in (k, nr, nc) order, ``W`` stored (in, out).
* ``add_prev_``/``mult_prev_``: operands zero-padded at the end of every dimension.
* ``dropout_`` runs as dlib's ``multiply_`` built from it (``val = 1 − drop_rate``), the
  layer dlib's inference types put there; ``multiply_``: ``x·val``.
* ``l2normalize_``: ``x / sqrt(Σx² + eps)`` per sample.

**Tags.** The bytes store no tag ids; the wiring by dlib's idioms lives in
:mod:`dlibbridge.codec.graph` (shared with ``inspect``'s shapes).  A network those rules cannot
wire raises :class:`~dlibbridge.convert.ConversionError`; the face ResNet (both residual idioms)
and the DenseNet (``concat2`` over repeat groups) are checked against dlib in the tests.

Export (:func:`to_dlib_tree`) starts from the source bytes the module keeps: an unchanged
record is written back as it was (byte-identical round trip); a changed one gets the module's
numbers (a folded bn as the exact bn_con2 form of an affine, §6.7).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codec import graph, tree as fmt
from .arch import DlibAffine, DlibInput, add_prev
from ..codec.records import affine_as_bn_variance, fold
from ..codec.tree import AddLayer, Details, InputLayer, Model, TagOnInput

INPUT_TYPES = ("input_rgb_image", "input_rgb_image_sized", "input_rgb_image_pyramid",
               "input_rgb_image_pyramid2")
LOSS_OUTPUTS = {          # loss record → what forward returns (the tensor dlib's loss reads)
    "loss_metric_": "rows", "loss_metric_2": "rows",
    "loss_multiclass_log_": "rows",
    "loss_mmod_": "map",
}


def _conversion_error(msg: str) -> Exception:
    from .convert import ConversionError   # one error class for every converter
    return ConversionError(msg)


# ---------------------------------------------------------------------------------------
# Layers without a counterpart in torch.nn


class ElementAffine(nn.Module):
    """dlib's FC_MODE affine: one scale and shift per element of a (k, nr, nc) sample."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.register_buffer("scale", torch.ones(1, *shape))
        self.register_buffer("shift", torch.zeros(1, *shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class Multiply(nn.Module):
    def __init__(self, val: float):
        super().__init__()
        self.val = float(np.float32(val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.val

    def extra_repr(self) -> str:
        return f"{self.val}"


class PRelu(nn.Module):
    """dlib's prelu_: one learned slope for the whole tensor, ``x > 0 ? x : p·x``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.weight * x)


class L2Normalize(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).pow(2).sum(1) + self.eps
        return x * torch.rsqrt(s).view(-1, *([1] * (x.dim() - 1)))


class GlobalPool(nn.Module):
    """``max_pool_everything`` / ``avg_pool_everything``: one window over the whole input."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return x.amax((2, 3), keepdim=True)
        return x.mean((2, 3), keepdim=True)

    def extra_repr(self) -> str:
        return self.kind


class Linear4d(nn.Linear):
    """dlib's fc_: flattens each sample in (k, nr, nc) order; the output is (N, out, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1)).view(x.shape[0], -1, 1, 1)


def mult_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``mult_prev``: like add_prev, each operand zero-padded at the end, so a product
    outside the overlap is 0."""
    if a.shape == b.shape:
        return a * b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
    pa = F.pad(a, (0, w - a.shape[3], 0, h - a.shape[2], 0, c - a.shape[1]))
    pb = F.pad(b, (0, w - b.shape[3], 0, h - b.shape[2], 0, c - b.shape[1]))
    return pa * pb


# ---------------------------------------------------------------------------------------
# The program: forward-order steps over modules and tag slots


@dataclass(frozen=True)
class Step:
    op: str                 # "layer" | "tag" | "skip" | "add_prev" | "mult_prev" | "concat"
    path: str               # dlib layer<i> path of the record
    module: str | None = None
    slots: tuple[int, ...] = ()
    free: tuple[int, ...] = ()   # slots never read again after this step


class DlibNet(nn.Module):
    """A dlib network as a sequence of steps; ``forward`` takes RGB images (uint8 NHWC or
    NCHW; for pyramid inputs, the already tiled pyramid image) and returns the tensor dlib's
    loss layer reads: (N, K) rows for loss_metric/multiclass_log, the (N, K, H, W) map for
    loss_mmod."""

    def __init__(self, input_layer: DlibInput, layers: dict[str, nn.Module], steps: list[Step],
                 output: str, meta: dict):
        super().__init__()
        self.input = input_layer
        self.layers = nn.ModuleDict(layers)
        self.steps = steps
        self.output = output
        self.dlib_meta = meta
        self.dlib_source: bytes | None = None

    def forward_normalized(self, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """The network on an already normalised tensor; ``trace`` collects (step, output
        shape) for :func:`output_shapes`."""
        saved: dict[int, torch.Tensor] = {}
        for s in self.steps:
            if s.op == "layer":
                x = self.layers[s.module](x)
            elif s.op == "tag":
                saved[s.slots[0]] = x
            elif s.op == "skip":
                x = saved[s.slots[0]]
            elif s.op == "add_prev":
                x = add_prev(x, saved[s.slots[0]])
            elif s.op == "mult_prev":
                x = mult_prev(x, saved[s.slots[0]])
            else:   # concat
                x = torch.cat([saved[i] for i in s.slots], 1)
            for i in s.free:
                del saved[i]
            if trace is not None:
                trace.append((s, tuple(x.shape[1:])))
        return x.flatten(1) if self.output == "rows" else x

    @property
    def input_spec(self) -> dict:
        """What ``forward`` takes: :attr:`~dlibbridge.port.arch.DlibInput.input_spec`."""
        return self.input.input_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.input(x))


# ---------------------------------------------------------------------------------------
# dlib records → modules


def _con(e, d: Details) -> list[nn.Module]:
    f, c, kh, kw = d["filters"]
    has_bias = d.get("use_bias", True) and tuple(d["biases"]) == (1, f, 1, 1)
    conv = nn.Conv2d(c, f, (kh, kw), (d["stride_y"], d["stride_x"]), (d["padding_y"], d["padding_x"]),
                     bias=has_bias)
    p = np.asarray(d["params"], np.float32).reshape(-1)
    nw = f * c * kh * kw
    if p.size != nw + (f if has_bias else 0):
        raise _conversion_error(f"{e.path} {d.version}: params hold {p.size} values, filters {d['filters']} "
                                f"and {'a' if has_bias else 'no'} bias need {nw + (f if has_bias else 0)}")
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(p[:nw].reshape(f, c, kh, kw)))
        if has_bias:
            conv.bias.copy_(torch.from_numpy(p[nw:nw + f]))
    return [conv, nn.ReLU()] if d.get("use_relu", False) else [conv]


def _gamma_beta(e, d: Details) -> tuple[np.ndarray, np.ndarray, tuple]:
    shape = tuple(d["gamma"])
    g = int(np.prod(shape))
    p = np.asarray(d["params"], np.float32).reshape(-1)
    if p.size != 2 * g:
        raise _conversion_error(f"{e.path} {d.version}: params hold {p.size} values, gamma {shape} needs {2 * g}")
    return p[:g], p[g:], shape


def _affine_module(conv_mode: bool, shape: tuple, scale: np.ndarray, shift: np.ndarray) -> nn.Module:
    if conv_mode:
        m = DlibAffine(shape[1])
        m.scale.copy_(torch.from_numpy(scale.reshape(-1)))
        m.shift.copy_(torch.from_numpy(shift.reshape(-1)))
    else:
        m = ElementAffine(shape[1:])
        m.scale.copy_(torch.from_numpy(scale.reshape(1, *shape[1:])))
        m.shift.copy_(torch.from_numpy(shift.reshape(1, *shape[1:])))
    return m


def _norm(e, d: Details) -> list[nn.Module]:
    if d.layer_type == "affine":
        if d.get("disabled", False):
            return [nn.Identity()]
        g, b, shape = _gamma_beta(e, d)
        return [_affine_module(d["mode"] == 0, shape, g, b)]
    g, b, shape = _gamma_beta(e, d)
    rm = np.asarray(d["running_means"], np.float32).reshape(-1)
    rv = np.asarray(d["running_variances"], np.float32).reshape(-1)
    scale, shift = fold(g, b, rm, rv, d["eps"])
    return [_affine_module(d.version == "bn_con2", shape, scale, shift)]


def _pool(e, d: Details) -> list[nn.Module]:
    kind = "max" if d.version.startswith("max") else "avg"
    if d["nr"] == 0 and d["nc"] == 0:
        return [GlobalPool(kind)]
    if d["nr"] == 0 or d["nc"] == 0:
        raise _conversion_error(f"{e.path} {d.version}: a window of the whole input in one dimension only")
    k, s, p = (d["nr"], d["nc"]), (d["stride_y"], d["stride_x"]), (d["padding_y"], d["padding_x"])
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise _conversion_error(f"{e.path} {d.version}: padding {p} wider than half the window {k}")
    if kind == "max":
        return [nn.MaxPool2d(k, s, p)]
    return [nn.AvgPool2d(k, s, p, count_include_pad=False)]


def _fc(e, d: Details) -> list[nn.Module]:
    n_in, n_out = d["num_inputs"], d["num_outputs"]
    has_bias = d["bias_mode"] == 0 and d.get("use_bias", True)
    p = np.asarray(d["params"], np.float32).reshape(-1)
    if p.size < (n_in + has_bias) * n_out:
        raise _conversion_error(f"{e.path} {d.version}: params hold {p.size} values, need {(n_in + has_bias) * n_out}")
    fc = Linear4d(n_in, n_out, bias=has_bias)
    w = p[:n_in * n_out].reshape(n_in, n_out)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        if has_bias:
            fc.bias.copy_(torch.from_numpy(p[n_in * n_out:(n_in + 1) * n_out]))
    return [fc]


def _prelu(e, d: Details) -> list[nn.Module]:
    m = PRelu()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.asarray(d["params"], np.float32).reshape(1)))
    return [m]


_ACTIVATIONS = {"sig_": nn.Sigmoid, "htan_": nn.Tanh}

_BUILDERS = {
    "con": _con, "bn_con": _norm, "bn_fc": _norm, "affine": _norm,
    "max_pool": _pool, "avg_pool": _pool, "fc": _fc, "prelu": _prelu,
}


def _layer_modules(e, d: Details) -> list[nn.Module]:
    t = d.layer_type
    if t in _BUILDERS:
        return _BUILDERS[t](e, d)
    if t == "relu":
        return [nn.Identity() if d.get("disabled", False) else nn.ReLU()]
    if d.version in _ACTIVATIONS:
        return [_ACTIVATIONS[d.version]()]
    if d.version == "dropout_":
        return [Multiply(np.float32(1) - np.float32(d["drop_rate"]))]
    if d.version == "multiply_":
        return [Multiply(d["val"])]
    if d.version == "l2normalize_":
        return [L2Normalize(d["eps"])]
    raise _conversion_error(f"{e.path}: layer {d.version!r} is not supported by the generic converter")


def _input_module(e, d: Details) -> DlibInput:
    if d.version not in INPUT_TYPES:
        raise _conversion_error(f"{e.path}: input layer {d.version!r} is not supported")
    mean = (d["avg_red"], d["avg_green"], d["avg_blue"])
    size = (d["nr"], d["nc"]) if d.version == "input_rgb_image_sized" else None
    return DlibInput(size, mean)


def _loss_output(model: Model) -> tuple[str, dict]:
    loss = model.loss
    if loss is None:
        return "map", {}
    if loss.version not in LOSS_OUTPUTS:
        raise _conversion_error(f"layer<0>: loss layer {loss.version!r} is not supported")
    meta = {k: f.value for k, f in loss.items() if f.type not in ("tensor", "records")}
    if "detector_windows" in loss:
        meta["detector_windows"] = [{k: f.value for k, f in w.items()} for w in loss["detector_windows"]]
    return LOSS_OUTPUTS[loss.version], {"loss": loss.version, **meta}


def build(model: Model) -> DlibNet:
    """The :class:`DlibNet` for a parsed file (weights loaded, eval mode), running the program
    :func:`dlibbridge.codec.graph.wire` derives from the records."""
    output, meta = _loss_output(model)
    try:
        program = graph.wire(model)
    except graph.WiringError as exc:
        raise _conversion_error(str(exc)) from None
    inputs = [e for e in model.layers() if isinstance(e.node, (InputLayer, TagOnInput)) and e.node.input is not None]
    if not inputs:
        raise _conversion_error("the network has no input_rgb_image* layer")
    input_layer = _input_module(inputs[0], inputs[0].node.input)
    layers: dict[str, nn.Module] = {}
    steps: list[Step] = []
    for s in program:
        if s.op != "layer":
            steps.append(Step(s.op, s.path, slots=s.slots))
            continue
        for j, m in enumerate(_layer_modules(s.entry, s.details)):
            name = f"{_module_name(s.path)}" + (f"_{j}" if j else "")
            layers[name] = m
            steps.append(Step("layer", s.path, name))
    net = DlibNet(input_layer, layers, _with_frees(steps), output, meta)
    return net.eval()


def _module_name(path: str) -> str:
    return path.replace("layer<", "l").replace(">", "").replace(".group<", "_g").replace(".", "_")


def _with_frees(steps: list[Step]) -> list[Step]:
    """Mark each tag slot free after its last reader, so a long network keeps only live tags."""
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s.op != "tag":
            for slot in s.slots:
                last[slot] = i
    out = []
    for i, s in enumerate(steps):
        free = tuple(sl for sl, j in last.items() if j == i)
        if s.op == "tag" and s.slots[0] not in last:
            free = free + s.slots           # a tag nobody reads
        out.append(Step(s.op, s.path, s.module, s.slots, free))
    return out


def _as_model(src) -> tuple[Model, bytes]:
    if isinstance(src, Model):
        return src, fmt.dumps(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        data = Path(src).read_bytes()
        if str(src).endswith(".bz2"):
            import bz2
            data = bz2.decompress(data)
    return fmt.loads(data), data


def to_torch(path_or_tree) -> DlibNet:
    """Any supported dlib file (path, bytes or parsed Model) → :class:`DlibNet` in eval mode,
    keeping the source bytes for :func:`to_dlib_tree`."""
    model, data = _as_model(path_or_tree)
    net = build(model)
    net.dlib_source = data
    return net


# ---------------------------------------------------------------------------------------
# torch → dlib


def _state(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().to(torch.float32).numpy() for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _new_params(e, d: Details, mods: list[nn.Module]) -> Details | None:
    """The record with the modules' numbers, or None when they equal what the record gives."""
    fresh = _layer_modules(e, d)
    if all(_same(_state(a), _state(b)) for a, b in zip(mods, fresh)):
        return None
    t = d.layer_type
    m = mods[0]
    new = d.copy()
    if t == "con":
        parts = [m.weight.detach().cpu().float().numpy().reshape(-1)]
        if m.bias is not None:
            parts.append(m.bias.detach().cpu().float().numpy())
        new["params"] = np.concatenate(parts).reshape(-1, 1, 1, 1).astype(np.float32)
    elif t == "fc":
        rows = [m.weight.detach().cpu().float().numpy().T]
        if m.bias is not None:
            rows.append(m.bias.detach().cpu().float().numpy()[None])
        p = np.ascontiguousarray(np.concatenate(rows)).astype(np.float32)
        new["params"] = p.reshape(p.shape[0], p.shape[1], 1, 1)
    elif t in ("affine", "bn_con", "bn_fc"):
        g = m.scale.detach().cpu().float().numpy().reshape(-1)
        b = m.shift.detach().cpu().float().numpy().reshape(-1)
        new["params"] = np.concatenate([g, b]).reshape(-1, 1, 1, 1).astype(np.float32)
        if t != "affine":
            # The exact bn form of an affine: running mean 0, variance float32(1 − eps).
            eps = d["eps"]
            shape = np.asarray(d["running_means"]).shape
            new["running_means"] = np.zeros(shape, np.float32)
            new["running_variances"] = np.full(shape, affine_as_bn_variance(eps), np.float32)
    elif t == "prelu":
        new["params"] = m.weight.detach().cpu().float().numpy().reshape(1, 1, 1, 1)
    else:
        raise _conversion_error(f"{e.path} {d.version}: changed in torch, but has no numbers dlib stores")
    return new


def to_dlib_tree(net: DlibNet) -> Model:
    """The dlib tree for a :class:`DlibNet`: its source tree, with every record whose
    numbers changed in torch rewritten."""
    net = getattr(net, "_orig_mod", net)
    if not isinstance(net, DlibNet) or net.dlib_source is None:
        raise TypeError("expected a DlibNet built by dlibbridge.generic.to_torch")
    model = fmt.loads(net.dlib_source)
    for e in model.layers():
        node = e.node
        if not isinstance(node, (AddLayer, InputLayer)):
            continue
        d = node.details
        if d.version in ("add_prev_", "mult_prev_", "concat_"):
            continue
        base = _module_name(e.path)
        mods = [net.layers[k] for k in net.layers.keys() if k == base or k.startswith(base + "_")
                and k[len(base) + 1:].isdigit()]
        if not mods:
            continue
        new = _new_params(e, d, mods)
        if new is not None:
            node.details = new
    return model


def reload_check(path: str | os.PathLike, net: DlibNet) -> float:
    """max |Δ| / max(1, max |y|) between ``net`` and the network re-read from ``path``, on two
    random images of the size the network takes."""
    net = getattr(net, "_orig_mod", net)
    h, w = net.input.size or (150, 150)
    x = torch.randint(0, 256, (2, h, w, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    back = to_torch(path).to("cpu")
    with torch.no_grad():
        want = net.to("cpu")(x)
        got = back(x)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def output_shapes(net: DlibNet, height: int, width: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(dlib path, step, output shape) of every step for one ``height``×``width`` image."""
    trace: list = []
    with torch.no_grad():
        net.forward_normalized(torch.zeros(1, 3, height, width), trace)
    return [(s.path, type(net.layers[s.module]).__name__ if s.op == "layer" else s.op, shape)
            for s, shape in trace]
