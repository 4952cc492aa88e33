"""dlib's face ResNet file ⇄ :class:`~dlibbridge.port.arch.FaceResNet`, and onward to ONNX/TorchScript.

The bytes of a dlib file say nothing about which tag a skip jumps to (dlib-format.md §5), so
the converter brings the architecture: :func:`parse_structure` matches the file's record
sequence against the face-ResNet template (stem, ``ares``/``ares_down`` blocks, global pool,
``fc_no_bias``, ``loss_metric``) and yields one :class:`Binding` per record that carries
numbers.  Weights then move through an explicit, named mapping (``_record_to_state`` and
``_state_to_record``) that fails loudly on any tensor left unused, any torch parameter left
unfilled and any shape mismatch.

Both dlib normalisation records are understood: ``affine_``/``affine_2`` (the deployed
form) and ``bn_con2`` (files written by ``dlibbridge unfreeze`` and by dlib's trainer,
alongside ``con_6``/``relu_2``/``fc_3``).  Either can become either torch form:

* frozen  (:class:`~dlibbridge.port.arch.DlibAffine`): a bn record is folded exactly as dlib's
  bn→affine conversion does (:func:`dlibbridge.codec.records.fold`);
* trainable (:class:`~dlibbridge.port.arch.DlibBatchNorm2d`): an affine record becomes a
  batch-norm with running mean 0 and running variance float32(1 − eps), whose inference
  output is bit-identical (dlib-format.md §6.7).

Export (:func:`to_dlib`) starts from the original file's tree, which the module keeps as
``dlib_source`` bytes: a record whose numbers did not change is written back as it was, so
dat → torch → dat is byte-identical.  A module without a source gets a freshly built tree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._dlib import face_descriptors
from .._io import replace_verified, write_atomic
from ..assets import resolve_model
from ..codec import records
from ..codec import tree as fmt
from ..codec.records import DLIB_BN_EPS, DLIB_BN_WINDOW, affine_as_bn_variance, fold
from ..codec.tree import AddLayer, Details, InputLayer, Loss, Model, TagOrSkip
from ..errors import DlibbridgeError
from .arch import DlibBatchNorm2d, FaceResNet, dlib_padding


class ConversionError(DlibbridgeError, ValueError):
    """A dlib file or module that cannot be mapped exactly; the message names the dlib
    layer (``layer<i>``) and/or the torch module concerned."""


class ExportCheckError(DlibbridgeError, RuntimeError):
    """An exported artefact that does not reproduce the torch module within tolerance."""


# ---------------------------------------------------------------------------------------
# Structure: the record sequence of a dlib file ⇄ the module names of FaceResNet


@dataclass(frozen=True)
class Binding:
    """One dlib record that carries numbers, and the torch module that holds them."""

    module: str   # torch module name, e.g. "level3.0.branch1.norm"
    path: str     # dlib LayerEntry.path of the record's wrapper, e.g. "layer<100>"
    kind: str     # "input" | "con" | "norm" | "fc"


@dataclass
class Structure:
    config: dict                      # FaceResNet config (plain data), "trainable" unset
    bindings: list[Binding]
    records: dict[str, Any] = field(default_factory=dict)   # Binding.module → LayerEntry
    meta: dict = field(default_factory=dict)                # loss record values


_NORM_TYPES = ("affine", "bn_con")


class _Cursor:
    """Forward-order stream of (type, LayerEntry, Details) with template-matching errors."""

    def __init__(self, model: Model):
        self.items: list[tuple[str, Any, Details | None]] = []
        for e in model.layers():
            node = e.node
            if isinstance(node, InputLayer):
                if node.input is None:
                    raise ConversionError(f"{e.path}: a repeat group; not dlib's face ResNet")
                self.items.append(("input", e, node.input))
                self.items.append((node.details.layer_type, e, node.details))
            elif isinstance(node, AddLayer):
                self.items.append((node.details.layer_type, e, node.details))
            elif isinstance(node, TagOrSkip):
                self.items.append(("tag", e, None))
            elif isinstance(node, Loss):
                self.items.append(("loss", e, node.details))
            else:
                raise ConversionError(f"{e.path}: {e.kind} layers do not occur in dlib's face ResNet")
        self.i = 0

    def peek(self) -> str | None:
        return self.items[self.i][0] if self.i < len(self.items) else None

    def take(self, types: tuple[str, ...] | str, what: str):
        types = (types,) if isinstance(types, str) else types
        if self.i >= len(self.items):
            raise ConversionError(f"not dlib's face ResNet: the file ends where {what} was expected")
        t, e, d = self.items[self.i]
        if t not in types:
            found = d.version if d is not None else "a tag/skip"
            raise ConversionError(f"not dlib's face ResNet: expected {what} at {e.path}, found {found}")
        self.i += 1
        return e, d


def _conv_geometry(e, d: Details) -> tuple[int, int, int, int, int]:
    """(cin, cout, kernel, stride, padding) of a con_ record, checking what the port supports."""
    f, c, kh, kw = d["filters"]
    if (kh, kw) != (d["nr"], d["nc"]) or f != d["num_filters"]:
        raise ConversionError(f"{e.path} {d.version}: filters alias {d['filters']} disagrees with "
                              f"num_filters={d['num_filters']} nr={d['nr']} nc={d['nc']}")
    if kh != kw or d["stride_y"] != d["stride_x"] or d["padding_y"] != d["padding_x"]:
        raise ConversionError(f"{e.path} {d.version}: only square kernels/strides/paddings are supported")
    if d.get("use_relu", False):
        raise ConversionError(f"{e.path} {d.version}: fused relu (use_relu) is not part of the face ResNet")
    if not d.get("use_bias", True) or tuple(d["biases"]) != (1, f, 1, 1):
        raise ConversionError(f"{e.path} {d.version}: the face ResNet's convolutions have a bias "
                              f"(biases alias {d['biases']})")
    return c, f, kh, d["stride_y"], d["padding_y"]


def _check_norm(e, d: Details, channels: int) -> None:
    if d.layer_type == "affine":
        if d["mode"] != 0:
            raise ConversionError(f"{e.path} {d.version}: FC_MODE affine in a convolutional network")
        if d.get("disabled", False):
            raise ConversionError(f"{e.path} {d.version}: a disabled affine is not supported")
    g = d["gamma"]
    if tuple(g) != (1, channels, 1, 1):
        raise ConversionError(f"{e.path} {d.version}: gamma alias {g} does not match {channels} channels")


def _check_relu(e, d: Details) -> None:
    if d.get("disabled", False):
        raise ConversionError(f"{e.path} {d.version}: a disabled relu is not supported")


def _pool_geometry(e, d: Details) -> tuple[int, int, int]:
    if d["nr"] != d["nc"] or d["stride_y"] != d["stride_x"] or d["padding_y"] != d["padding_x"]:
        raise ConversionError(f"{e.path} {d.version}: only square pooling is supported")
    return d["nr"], d["stride_y"], d["padding_y"]


def parse_structure(model: Model) -> Structure:
    """Match a parsed dlib file against the face-ResNet template.

    Returns the FaceResNet config and the record ⇄ module bindings in forward order.
    Raises :class:`ConversionError` naming the first layer that does not fit.
    """
    cur = _Cursor(model)
    bindings: list[Binding] = []
    records: dict[str, Any] = {}

    def bind(module: str, e, kind: str) -> None:
        bindings.append(Binding(module, e.path, kind))
        records[module] = e

    e, d = cur.take("input", "an input_rgb_image layer")
    if d.version == "input_rgb_image_sized":
        size = [d["nr"], d["nc"]]
    elif d.version == "input_rgb_image":
        size = [150, 150]
    else:
        raise ConversionError(f"not dlib's face ResNet: {e.path} has input {d.version}, not input_rgb_image(_sized)")
    bind("input", e, "input")

    # stem: con → norm → relu → max_pool
    e, d = cur.take("con", "the stem convolution")
    cin, stem_ch, k, s, p = _conv_geometry(e, d)
    if cin != 3:
        raise ConversionError(f"{e.path}: the stem convolution reads {cin} channels, not RGB")
    bind("stem.unit.conv", e, "con")
    e, d = cur.take(_NORM_TYPES, "the stem's affine/bn_con")
    _check_norm(e, d, stem_ch)
    bind("stem.unit.norm", e, "norm")
    _check_relu(*cur.take("relu", "the stem's relu"))
    pool = list(_pool_geometry(*cur.take("max_pool", "the stem's max_pool")))
    stem = {"channels": stem_ch, "kernel": k, "stride": s, "padding": p, "pool": pool}

    # residual blocks: each starts with a tag1
    blocks: list[tuple[int, bool, list]] = []   # (channels, down, [(suffix, entry, kind)])
    ch = stem_ch
    while cur.peek() == "tag":
        cur.take("tag", "tag1")
        e1, d1 = cur.take("con", "a block's first convolution")
        c_in, c_out, k1, s1, p1 = _conv_geometry(e1, d1)
        if c_in != ch or k1 != 3 or s1 not in (1, 2) or p1 != dlib_padding(3, s1):
            raise ConversionError(f"{e1.path} {d1.version}: expected a 3x3 convolution from {ch} channels "
                                  f"with stride 1 (pad 1) or 2 (pad 0), found {c_in} ch, {k1}x{k1} "
                                  f"stride {s1} pad {p1}")
        en1, dn1 = cur.take(_NORM_TYPES, "a block's first affine/bn_con")
        _check_norm(en1, dn1, c_out)
        _check_relu(*cur.take("relu", "a block's relu"))
        e2, d2 = cur.take("con", "a block's second convolution")
        if _conv_geometry(e2, d2) != (c_out, c_out, 3, 1, 1):
            raise ConversionError(f"{e2.path} {d2.version}: expected a 3x3 stride-1 pad-1 {c_out}→{c_out} "
                                  f"convolution")
        en2, dn2 = cur.take(_NORM_TYPES, "a block's second affine/bn_con")
        _check_norm(en2, dn2, c_out)
        down = s1 == 2
        if down:
            cur.take("tag", "tag2 of a down block")
            cur.take("tag", "skip1 of a down block")
            ep, dp = cur.take("avg_pool", "the shortcut avg_pool of a down block")
            if _pool_geometry(ep, dp) != (2, 2, 0):
                raise ConversionError(f"{ep.path}: the shortcut pool must be 2x2 stride 2 pad 0")
        elif c_in != c_out:
            raise ConversionError(f"{e1.path}: a stride-1 block cannot change channels ({c_in}→{c_out})")
        cur.take("add_prev", "add_prev")
        _check_relu(*cur.take("relu", "the block's output relu"))
        parts = [("branch1.conv", e1, "con"), ("branch1.norm", en1, "norm"),
                 ("branch2.conv", e2, "con"), ("branch2.norm", en2, "norm")]
        blocks.append((c_out, down, parts))
        ch = c_out
    if not blocks:
        raise ConversionError("not dlib's face ResNet: no residual blocks after the stem")

    # group blocks into levels: a new level starts at every down block
    levels: list[list] = []
    for c_out, down, parts in blocks:
        if down or not levels:
            levels.append([c_out, 0, down, []])
        levels[-1][1] += 1
        levels[-1][3].append(parts)
    for li, (_, _, _, lv_blocks) in enumerate(levels):
        name = f"level{len(levels) - 1 - li}"
        for bi, parts in enumerate(lv_blocks):
            for suffix, e, kind in parts:
                bind(f"{name}.{bi}.{suffix}", e, kind)

    ep, dp = cur.take("avg_pool", "avg_pool_everything")
    if _pool_geometry(ep, dp) != (0, 1, 0):
        raise ConversionError(f"{ep.path}: expected avg_pool_everything (0x0 window, stride 1, pad 0)")
    e, d = cur.take("fc", "the fc_no_bias output layer")
    if d["bias_mode"] == 0 and d.get("use_bias", True):
        raise ConversionError(f"{e.path} {d.version}: the face ResNet's fc has no bias (fc_no_bias)")
    if d["num_inputs"] != ch or tuple(d["weights"]) != (ch, d["num_outputs"], 1, 1):
        raise ConversionError(f"{e.path} {d.version}: fc reads {d['num_inputs']} inputs "
                              f"(weights alias {d['weights']}), the network gives {ch}")
    bind("fc", e, "fc")
    embed_dim = d["num_outputs"]

    meta: dict = {}
    if cur.peek() == "loss":
        e, d = cur.take("loss", "loss_metric")
        if d.layer_type != "loss_metric":
            raise ConversionError(f"{e.path}: {d.version} is not the face ResNet's loss_metric")
        # The old string 'loss_metric_' stores nothing; dlib then uses margin 0.1, threshold 0.75.
        meta["loss"] = {"version": d.version, "margin": d.get("margin", 0.1),
                        "dist_thresh": d.get("dist_thresh", 0.75)}
    if cur.peek() is not None:
        _, e, d = cur.items[cur.i]
        raise ConversionError(f"not dlib's face ResNet: unexpected {d.version if d else 'tag/skip'} at {e.path}")

    config = {"input_size": size, "stem": stem,
              "levels": [[c, n, down] for c, n, down, _ in levels], "embed_dim": embed_dim}
    return Structure(config, bindings, records, meta)


def _record(entry, kind: str) -> Details:
    return entry.node.input if kind == "input" else entry.node.details


# ---------------------------------------------------------------------------------------
# Named weight mapping: one dlib record ⇄ the state entries of one torch module

# Tensor fields of a record that are not weights: dlib's batch statistics from its last
# training forward (overwritten by the next one, never read in inference).  They stay in
# the kept source record and are written back unchanged.
_RUNTIME_TENSORS = {"bn_con": {"means", "invstds"}}


def _split(params: np.ndarray, sizes: list[int], e, d: Details) -> list[np.ndarray]:
    flat = params.reshape(-1)
    if flat.size != sum(sizes):
        raise ConversionError(f"{e.path} {d.version}: params holds {flat.size} floats, its aliases "
                              f"account for {sum(sizes)}")
    out, o = [], 0
    for n in sizes:
        out.append(flat[o:o + n].copy())
        o += n
    return out


def _record_to_state(b: Binding, e, d: Details, trainable: bool) -> tuple[dict[str, Any], set[str]]:
    """State entries (key relative to ``b.module`` → value) for one record, and the names of
    the record's tensor fields consumed."""
    if b.kind == "input":
        return {"mean": np.array([d["avg_red"], d["avg_green"], d["avg_blue"]],
                                 np.float32).reshape(1, 3, 1, 1)}, set()
    if b.kind == "con":
        f, c, kh, kw = d["filters"]
        w, bias = _split(d["params"], [f * c * kh * kw, f], e, d)
        return {"weight": w.reshape(f, c, kh, kw), "bias": bias}, {"params"}
    if b.kind == "fc":
        nin, nout = d["num_inputs"], d["num_outputs"]
        (w,) = _split(d["params"], [nin * nout], e, d)
        return {"weight": np.ascontiguousarray(w.reshape(nin, nout).T)}, {"params"}
    # norm
    c = d["gamma"][1]
    g, beta = _split(d["params"], [c, c], e, d)
    if d.layer_type == "affine":
        if not trainable:
            return {"scale": g, "shift": beta}, {"params"}
        return {"weight": g, "bias": beta, "running_mean": np.zeros(c, np.float32),
                "running_var": np.full(c, affine_as_bn_variance(), np.float32),
                "num_batches_tracked": np.array(DLIB_BN_WINDOW, np.int64),
                "_extra_state": {"eps": DLIB_BN_EPS, "window": DLIB_BN_WINDOW}}, {"params"}
    rm = d["running_means"].reshape(-1)
    rv = d["running_variances"].reshape(-1)
    if rm.size != c or rv.size != c:
        raise ConversionError(f"{e.path} {d.version}: running stats have {rm.size}/{rv.size} values for "
                              f"{c} channels")
    used = {"params", "running_means", "running_variances"}
    if not trainable:
        sg, sb = fold(g, beta, rm, rv, d["eps"])
        return {"scale": sg, "shift": sb}, used
    return {"weight": g, "bias": beta, "running_mean": rm.copy(), "running_var": rv.copy(),
            "num_batches_tracked": np.array(d["num_updates"], np.int64),
            "_extra_state": {"eps": float(d["eps"]), "window": int(d["running_stats_window_size"])}}, used


def _load_weights(module: FaceResNet, struct: Structure, trainable: bool) -> None:
    sd = module.state_dict()
    filled: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for b in struct.bindings:
        e = struct.records[b.module]
        d = _record(e, b.kind)
        state, used = _record_to_state(b, e, d, trainable)
        extra = {n for n, f in d.items() if f.type == "tensor" and f.value.size}
        unused = extra - used - _RUNTIME_TENSORS.get(d.layer_type, set())
        if unused:
            raise ConversionError(f"{b.path} {d.version}: tensor field(s) {sorted(unused)} have no "
                                  f"counterpart in {b.module}")
        for key, value in state.items():
            full = f"{b.module}.{key}"
            if full not in sd:
                raise ConversionError(f"{b.path} {d.version}: {full} is not a parameter of the module")
            if full in filled:
                raise ConversionError(f"{full} filled twice ({origin[full]} and {b.path})")
            if key != "_extra_state" and tuple(sd[full].shape) != tuple(np.shape(value)):
                raise ConversionError(f"{b.path} {d.version}: {key} shaped {tuple(np.shape(value))} "
                                      f"but {full} is {tuple(sd[full].shape)}")
            filled[full] = value if key == "_extra_state" else torch.from_numpy(np.array(value))
            origin[full] = b.path
    missing = sorted(set(sd) - set(filled))
    if missing:
        raise ConversionError(f"torch state left unfilled by the dlib file: {missing}")
    module.load_state_dict(filled, strict=True)


# ---------------------------------------------------------------------------------------
# dlib → torch


def _as_model(src) -> tuple[Model, bytes | None]:
    if isinstance(src, Model):
        return src, fmt.dumps(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return fmt.loads(data), data
    data = resolve_model(src).read_bytes()      # "default" = dlib's installed face model
    return fmt.loads(data), data


def to_torch(path_or_tree, trainable: bool = False) -> nn.Module:
    """dlib face-ResNet file (path, bytes or parsed :class:`~dlibbridge.codec.tree.Model`) →
    :class:`FaceResNet` in eval mode; any other network →
    :class:`~dlibbridge.port.generic.DlibNet` (frozen form only).

    ``trainable=False`` gives the frozen inference form (affine scale/shift);
    ``trainable=True`` gives ``DlibBatchNorm2d`` layers for fine-tuning.  The original bytes
    are kept on the module (``dlib_source``) so :func:`to_dlib` can write unchanged records
    back byte for byte.
    """
    model, data = _as_model(path_or_tree)
    try:
        struct = parse_structure(model)
    except ConversionError:
        if trainable:
            raise
        # Not the face ResNet: every other network goes through the generic converter.
        from . import generic
        net = generic.build(model)
        net.dlib_source = data
        return net
    config = dict(struct.config, trainable=bool(trainable))
    module = FaceResNet(config)
    _load_weights(module, struct, bool(trainable))
    module.dlib_meta = struct.meta
    module.dlib_source = data
    return _channels_last(module).eval()


def _channels_last(module: FaceResNet) -> FaceResNet:
    """NHWC convolution weights: 10–40% faster on CPU (oneDNN) and what GPUs prefer; the
    values, the state dict and every export are unchanged (tools/bench_embed.py)."""
    return module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------
# torch → dlib


def _unwrap(module: nn.Module) -> FaceResNet:
    m = getattr(module, "_orig_mod", module)   # torch.compile wrapper
    if not isinstance(m, FaceResNet):
        raise TypeError(f"expected a dlibbridge FaceResNet, got {type(module).__name__}")
    return m


def _module_state(module: FaceResNet) -> dict[str, Any]:
    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu")
            v = v.numpy().copy() if v.dtype == torch.int64 else v.to(torch.float32).numpy().copy()
        out[k] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _affine_record(g: np.ndarray, b: np.ndarray, like: Details | None) -> Details:
    if like is not None and like.layer_type == "affine":
        d = like.copy()
        d["params"] = np.concatenate([g, b]).astype(np.float32).reshape(2 * g.size, 1, 1, 1)
        return d
    return records.affine_record(g, b, (1, g.size, 1, 1))


def _bn_record(gamma, beta, rm, rv, num_updates: int, window: int, eps: float, like: Details | None) -> Details:
    c = gamma.size
    means, invstds = np.zeros((1, c, 1, 1), np.float32), np.ones((1, c, 1, 1), np.float32)
    if like is not None and like.layer_type == "bn_con" and like["means"].size == c and like["invstds"].size == c:
        # dlib's last-batch statistics: runtime state, carried over (see _RUNTIME_TENSORS).
        means, invstds = like["means"], like["invstds"]
    multipliers = {name: like[name] for name, _ in records.BN_MULTIPLIERS
                   if like is not None and like.layer_type == "bn_con" and name in like}
    return records.bn_record("bn_con2", gamma, beta, (1, c, 1, 1), means=means, invstds=invstds,
                             running_means=np.reshape(rm, (1, c, 1, 1)), running_variances=np.reshape(rv, (1, c, 1, 1)),
                             num_updates=num_updates, window=window, eps=eps, multipliers=multipliers)


def _norm_record(b: Binding, e, src: Details, state: dict, module_trainable: bool, to_bn: bool) -> Details:
    """The record for one normalisation layer; see the module docstring for the rules."""
    p = b.module + "."
    unchanged = all(_same(state[p + k], v) for k, v in
                    _record_to_state(b, e, src, module_trainable)[0].items())
    src_is_bn = src.layer_type == "bn_con"
    if unchanged and src_is_bn == to_bn:
        return src
    if module_trainable:
        gamma, beta = state[p + "weight"], state[p + "bias"]
        rm, rv = state[p + "running_mean"], state[p + "running_var"]
        extra = state[p + "_extra_state"]
        if not to_bn:
            return _affine_record(*fold(gamma, beta, rm, rv, extra["eps"]), src)
        return _bn_record(gamma, beta, rm, rv, int(state[p + "num_batches_tracked"]), extra["window"],
                          extra["eps"], src)
    g, sh = state[p + "scale"], state[p + "shift"]
    if not to_bn:
        return _affine_record(g, sh, src)
    # affine → bn_con2 with identical inference output (dlib-format.md §6.7).
    c = g.size
    return _bn_record(g, sh, np.zeros(c, np.float32), np.full(c, affine_as_bn_variance(), np.float32),
                      DLIB_BN_WINDOW, DLIB_BN_WINDOW, DLIB_BN_EPS, None)


def _plain_record(b: Binding, e, src: Details, state: dict) -> Details:
    """con / fc / input: same record, numbers replaced only where they changed."""
    p = b.module + "."
    if b.kind == "input":
        mean = state[p + "mean"].reshape(-1)
        d = src.copy() if src.version == "input_rgb_image_sized" else records.input_rgb_image_sized(150, 150, mean)
        for name, v in zip(("avg_red", "avg_green", "avg_blue"), mean):
            d[name] = float(v)
        if src.version == "input_rgb_image_sized" and d == src:
            return src
        return d
    if b.kind == "con":
        params = np.concatenate([state[p + "weight"].reshape(-1), state[p + "bias"].reshape(-1)])
    else:
        w = state[p + "weight"]
        params = np.ascontiguousarray(w.T).reshape(w.shape[1], w.shape[0], 1, 1)
    params = params.astype(np.float32).reshape(src["params"].shape)
    if _same(params, src["params"]):
        return src
    d = src.copy()
    d["params"] = params
    return d


def to_dlib_tree(module: nn.Module, trainable: bool = False) -> Model:
    """The dlib tree for a FaceResNet: the deployed affine form, or ``bn_con2`` records when
    ``trainable``.  Starts from the module's source file when it has one."""
    module = _unwrap(module)
    if module.dlib_source is not None:
        model = fmt.loads(module.dlib_source)
    else:
        model = build_tree(module.config, trainable)
    struct = parse_structure(model)
    if struct.config != {k: v for k, v in module.config.items() if k != "trainable"}:
        raise ConversionError(f"the module's architecture {module.config} differs from its dlib source "
                              f"{struct.config}")
    state = _module_state(module)
    for b in struct.bindings:
        e = struct.records[b.module]
        src = _record(e, b.kind)
        if b.kind == "norm":
            new = _norm_record(b, e, src, state, module.trainable, trainable)
        else:
            new = _plain_record(b, e, src, state)
        if new is src:
            continue
        if b.kind == "input":
            e.node.input = new
        else:
            e.node.details = new
    if not isinstance(model.net, Loss):
        model.net = Loss(records.loss_metric_2(), model.net)
    return model


def to_dlib(module: nn.Module, path: str | os.PathLike, trainable: bool = False, check: bool = False,
            atol: float = 1e-5) -> float | None:
    """Write a FaceResNet as a dlib file that ``dlib.face_recognition_model_v1`` loads
    (``trainable=True``: ``bn_con2`` records for dlib's trainer).  Written atomically.

    ``check=True`` first loads the new file with the ``dlib`` package itself and compares its
    descriptors with the module's on :func:`check_chips`; the file only replaces ``path``
    when max |Δ| ≤ ``atol`` (returned), else :class:`ExportCheckError`.
    """
    from .generic import DlibNet
    generic_net = isinstance(getattr(module, "_orig_mod", module), DlibNet)
    if generic_net:
        from . import generic
        data = fmt.dumps(generic.to_dlib_tree(module))
    else:
        data = fmt.dumps(to_dlib_tree(module, trainable))
    if not check:
        write_atomic(path, data)
        return None

    def verify(tmp) -> float:
        # Python dlib loads only the face ResNet and the face detector by name; any other
        # network's file is checked by re-reading it and comparing the network output.
        diff = generic.reload_check(tmp, module) if generic_net else dlib_check(tmp, module)
        if not diff <= atol:
            raise ExportCheckError(f"dlib computes descriptors {diff:.3g} away from the torch module "
                                   f"with the exported file (> {atol})")
        return diff

    return replace_verified(path, data, verify)


def dlib_check(path: str | os.PathLike, module: nn.Module, n: int = 3, chips: np.ndarray | None = None) -> float:
    """max |Δ| between ``dlib.face_recognition_model_v1(path)`` and the module (fp32, CPU)
    on uint8 RGB ``chips`` (N,150,150,3), by default ``n`` :func:`check_chips`."""
    m = _export_copy(module)
    if chips is None:
        chips = check_chips(n, 0, tuple(m.config["input_size"])).numpy()
    got = face_descriptors(path, chips)
    if got is None:
        raise ExportCheckError(f"dlib cannot load {path} as a face recognition network")
    with torch.inference_mode():
        want = m(torch.from_numpy(np.ascontiguousarray(chips)))
    return _max_diff(got, want)


# ---------------------------------------------------------------------------------------
# A fresh dlib tree for a module that has no source file


def _con_record(cin: int, cout: int, k: int, s: int, p: int) -> Details:
    n = cout * cin * k * k + cout
    return Details.build(
        "con_4", ("params", "tensor", np.zeros((n, 1, 1, 1), np.float32)), ("num_filters", "int", cout),
        ("nr", "int", k), ("nc", "int", k), ("stride_y", "int", s), ("stride_x", "int", s),
        ("padding_y", "int", p), ("padding_x", "int", p), ("filters", "alias", (cout, cin, k, k)),
        ("biases", "alias", (1, cout, 1, 1)), ("learning_rate_multiplier", "f64", 1.0),
        ("weight_decay_multiplier", "f64", 1.0), ("bias_learning_rate_multiplier", "f64", 1.0),
        ("bias_weight_decay_multiplier", "f64", 0.0))


def _pool_record(version: str, k: int, s: int, p: int) -> Details:
    return Details.build(version, ("nr", "int", k), ("nc", "int", k), ("stride_y", "int", s),
                         ("stride_x", "int", s), ("padding_y", "int", p), ("padding_x", "int", p))


def build_tree(config: dict, trainable: bool = False) -> Model:
    """A complete dlib tree of the face-ResNet family described by ``config`` (zero weights),
    with the record versions of the shipped model (``con_4``, ``affine_`` or ``bn_con2``,
    ``relu_``, ``fc_2``) and wrapper flags dlib accepts (setup done, nothing disabled)."""

    def norm(c: int) -> Details:
        z, o = np.zeros(c, np.float32), np.ones(c, np.float32)
        if trainable:
            return _bn_record(o, z, z, np.full(c, affine_as_bn_variance(), np.float32),
                              DLIB_BN_WINDOW, DLIB_BN_WINDOW, DLIB_BN_EPS, None)
        return _affine_record(o, z, None)

    relu = lambda: Details.build("relu_")  # noqa: E731
    h, w = config["input_size"]
    st = config["stem"]
    inp = records.input_rgb_image_sized(h, w)
    node: Any = InputLayer(inp, _con_record(3, st["channels"], st["kernel"], st["stride"], st["padding"]))

    def add(d: Details) -> None:
        nonlocal node
        node = AddLayer(d, node)

    def tag() -> None:
        nonlocal node
        node = TagOrSkip(node)

    add(norm(st["channels"]))
    add(relu())
    add(_pool_record("max_pool_2", *st["pool"]))
    ch = st["channels"]
    for c, nblocks, down in config["levels"]:
        for bi in range(nblocks):
            s = 2 if (bi == 0 and down) else 1
            tag()
            add(_con_record(ch, c, 3, s, dlib_padding(3, s)))
            add(norm(c))
            add(relu())
            add(_con_record(c, c, 3, 1, 1))
            add(norm(c))
            if s == 2:
                tag()
                tag()
                add(_pool_record("avg_pool_2", 2, 2, 0))
            add(Details.build("add_prev_"))
            add(relu())
            ch = c
    add(_pool_record("avg_pool_2", 0, 1, 0))
    e = config["embed_dim"]
    add(Details.build("fc_2", ("num_outputs", "uint", e), ("num_inputs", "uint", ch),
                      ("params", "tensor", np.zeros((ch, e, 1, 1), np.float32)),
                      ("weights", "alias", (ch, e, 1, 1)), ("biases", "alias", (0, 0, 0, 0)),
                      ("bias_mode", "int", 1), ("learning_rate_multiplier", "f64", 1.0),
                      ("weight_decay_multiplier", "f64", 1.0), ("bias_learning_rate_multiplier", "f64", 1.0),
                      ("bias_weight_decay_multiplier", "f64", 0.0)))
    return Model(Loss(records.loss_metric_2(), node))


# ---------------------------------------------------------------------------------------
# Hooks for calibration / per-layer work


def layer_bindings(module: nn.Module) -> list[Binding]:
    """Every record ⇄ module binding of a FaceResNet, in forward order (input, convs,
    norms, fc), with the dlib ``LayerEntry.path`` of each record."""
    module = _unwrap(module)
    model = fmt.loads(module.dlib_source) if module.dlib_source is not None else build_tree(
        module.config, module.trainable)
    return parse_structure(model).bindings


def affine_layers(module: nn.Module) -> list[tuple[str, str]]:
    """``[(module_name, dlib_layer_path), …]`` for every affine/bn_con record, in forward order.

    ``module.get_submodule(name)`` is the :class:`DlibAffine` or :class:`DlibBatchNorm2d`
    that computes that record, so a forward pre-hook on it sees exactly the tensor dlib's
    layer receives (what calibrating bn statistics needs).
    """
    return [(b.module, b.path) for b in layer_bindings(module) if b.kind == "norm"]


# ---------------------------------------------------------------------------------------
# Check chips and traceable copies for the export checks (port.export)


def check_chips(n: int = 3, seed: int = 0, size: tuple[int, int] = (150, 150)) -> torch.Tensor:
    """Deterministic pseudo-random RGB chips (uint8, NHWC: what the module and every export
    take) for export checks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size[0], size[1], 3), generator=g, dtype=torch.uint8)


def _export_copy(module: nn.Module) -> FaceResNet:
    """A clean eval-mode copy to trace.  A trainable module is exported in its deployed form
    (batch-norms folded exactly as dlib folds them): that is the graph to ship, and the
    tracer cannot follow DlibBatchNorm2d's extra state."""
    module = _unwrap(module)
    if any(isinstance(x, DlibBatchNorm2d) for x in module.modules()):
        return to_torch(to_dlib_tree(module)).eval()
    m = FaceResNet(module.config)
    m.load_state_dict(module.state_dict())
    return m.eval()


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


__all__ = [
    "ConversionError", "ExportCheckError", "Binding", "Structure", "parse_structure",
    "to_torch", "to_dlib", "dlib_check", "to_dlib_tree", "build_tree", "layer_bindings", "affine_layers",
    "check_chips",
]
