"""``dlibbridge inspect``: what is inside a dlib DNN file, without dlib and without torch.

A listing in the spirit of dlib's ``cout << net`` (dlib's ``layer<i>`` index, the record's
version string, its hyper-parameters), plus what dlib does not print: parameter counts per
layer and in total, output shapes of every network (for its fixed input size, or a stated one), the version strings
found, the file's size and sha256.  The JSON form (``--json``) is documented in
docs/inspect-json.md and versioned by its ``schema`` key.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import assets
from .._io import sha256_file
from ..errors import DlibbridgeError
from . import graph
from .tree import InputLayer, Model, Repeat, TagOnInput, TagOrSkip, load, loads

JSON_SCHEMA = "dlibbridge.inspect/1"

NOMINAL_INPUT = (150, 150)   # shapes of a network that takes any size: a face chip's size, stated in the listing

FACE_RESNET = "dlib face ResNet (dlib_face_recognition_resnet_model_v1 architecture)"


class InspectError(DlibbridgeError, ValueError):
    """An input size the network cannot take."""


def count_params(details) -> int:
    """Learnable values of one record: the size of its ``params`` tensor."""
    if details is None or "params" not in details:
        return 0
    return int(details["params"].size)


def recognise(model: Model) -> str | None:
    """Name the architecture of a parsed file, or None.  The bytes carry no type name, so
    this matches the layer inventory against the networks dlib ships."""
    recs = model.details_records()
    versions = collections.Counter(d.layer_type for d in recs)
    loss = model.loss.layer_type if model.loss is not None else None
    inp = model.input
    n_tags = sum(isinstance(e.node, TagOrSkip) for e in model.layers())
    if (loss == "loss_metric" and inp is not None and inp.version == "input_rgb_image_sized"
            and inp["nr"] == 150 and versions["con"] == 29 and n_tags == 22 and versions["add_prev"] == 14):
        norms = {"affine": "deployed anet_type, affine", "bn_con": "trainable net_type, bn_con"}
        forms = [norms[k] for k in norms if versions[k]]
        if len(forms) == 1 and versions["affine"] + versions["bn_con"] == 29:
            return f"{FACE_RESNET}, {forms[0]}"
    if loss == "loss_metric" and versions["concat"] and any(isinstance(e.node, Repeat) for e in model.walk()):
        return "dlib DenseNet face embedding (face_recognition_densenet_model_v1 architecture)"
    if loss == "loss_mmod":
        opts = model.loss
        n = len(opts["detector_windows"]) if "detector_windows" in opts else 1
        return f"dlib MMOD CNN object detector ({n} detector window{'s' * (n != 1)})"
    if loss == "loss_multiclass_log" and inp is not None and inp.version == "input_rgb_image_sized":
        fc = [d for d in recs if d.layer_type == "fc"]
        classes = fc[-1]["num_outputs"] if fc else "?"
        return f"dlib {classes}-class image classifier ({inp['nr']}x{inp['nc']} RGB input)"
    return None


def output_shapes(model: Model, size: tuple[int, int] | None = None) -> tuple[dict[str, tuple[int, int, int]], tuple[int, int] | None]:
    """Per-sample output shape (k, nr, nc) of each layer, keyed by layer path, and the input
    (nr, nc) they are for: ``size``, else the size a sized input layer fixes, else
    :data:`NOMINAL_INPUT`.  The wiring is the generic port's (:mod:`.graph`); a network it
    cannot wire is listed without shapes ({}, None)."""
    fixed = graph.input_size(model)
    if size is not None and fixed is not None and tuple(size) != fixed:
        raise InspectError(f"this network takes {fixed[0]}x{fixed[1]} images only, not {size[0]}x{size[1]}")
    size = tuple(size or fixed or NOMINAL_INPUT)
    try:
        steps = graph.output_shapes(model, *size)
    except graph.WiringError as exc:
        if size != (fixed or NOMINAL_INPUT):
            raise InspectError(f"no shapes for a {size[0]}x{size[1]} input: {exc}") from None
        return {}, None
    return {s.path: shape for s, shape in steps}, size


def _scalar_fields(d) -> dict[str, Any]:
    out = {}
    for name, f in d.items():
        if f.type in ("tensor",):
            out[name] = list(f.value.shape)
        elif f.type == "alias":
            out[name] = list(f.value)
        elif f.type == "records":
            out[name] = [{k: x.value for k, x in r.items()} for r in f.value]
        elif isinstance(f.value, float) and not np.isfinite(f.value):
            out[name] = str(f.value)
        else:
            out[name] = f.value
    return out


def _summary(d) -> str:
    """dlib-like one-line summary of a record's hyper-parameters."""
    t = d.layer_type
    if t == "con":
        return (f"num_filters={d['num_filters']} nr={d['nr']} nc={d['nc']} stride=({d['stride_y']},{d['stride_x']})"
                f" padding=({d['padding_y']},{d['padding_x']})")
    if t in ("max_pool", "avg_pool"):
        if d["nr"] == 0 and d["nc"] == 0:
            return "everything"
        return f"nr={d['nr']} nc={d['nc']} stride=({d['stride_y']},{d['stride_x']}) padding=({d['padding_y']},{d['padding_x']})"
    if t == "fc":
        return f"num_outputs={d['num_outputs']} num_inputs={d['num_inputs']} " + (
            "no bias" if d["bias_mode"] == 1 else "bias")
    if t in ("bn_con", "bn_fc"):
        return f"channels={d['gamma'][1]} eps={d['eps']:g} num_updates={d['num_updates']} window={d['running_stats_window_size']}"
    if t == "affine":
        return f"channels={d['gamma'][1]} mode={'fc' if d['mode'] else 'conv'}"
    parts = []
    for name, f in d.items():
        if f.type in ("tensor", "records", "alias"):
            continue
        v = f.value
        parts.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(parts)


def describe(path: str | os.PathLike, input_size: tuple[int, int] | None = None,
             data: bytes | None = None) -> dict[str, Any]:
    """Everything ``inspect`` reports, as the JSON-ready dict of docs/inspect-json.md;
    ``input_size`` (nr, nc) is the image the output shapes are computed for; ``data``: the
    dlib bytes to describe in place of the file's (a model.pt's dlib form)."""
    path = Path(path)
    if data is not None:
        model, size, sha = loads(data), len(data), hashlib.sha256(data).hexdigest()
    elif path.is_file():
        model, size, sha = load(path), path.stat().st_size, sha256_file(path)
    else:                      # a pipe or stream ("-" = stdin): read once, describe the bytes
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        model, size, sha = loads(data), len(data), hashlib.sha256(data).hexdigest()
    arch = recognise(model)
    shapes, shape_input = output_shapes(model, input_size)
    versions: collections.Counter = collections.Counter()
    wrappers: collections.Counter = collections.Counter()
    layers = []
    for e in model.walk():
        node = e.node
        kind = type(node).__name__
        wrappers[kind] += 1
        for rec in (getattr(node, "input", None), getattr(node, "details", None)):
            if rec is not None:
                versions[rec.version] += 1
        entry = {
            "index": e.index,
            "path": e.path,
            "wrapper": kind,
            "record": e.details.version if e.details is not None else None,
            "summary": _summary(e.details) if e.details is not None else e.kind,
            "fields": _scalar_fields(e.details) if e.details is not None else {},
            "params": count_params(e.details),
            "output_shape": list(shapes[e.path]) if e.path in shapes else None,
        }
        if isinstance(node, Repeat):
            entry["groups"] = len(node.groups)
        if isinstance(node, (InputLayer, TagOnInput)) and node.input is not None:
            entry["input"] = {"record": node.input.version, "fields": _scalar_fields(node.input)}
        layers.append(entry)
    trailers = [{"kind": "shape_predictor", "cascades": len(t.forests),
                 "trees": sum(len(f) for f in t.forests)} for t in model.trailers]
    return {
        "schema": JSON_SCHEMA,
        "file": str(path),
        "size": size,
        "sha256": sha,
        "architecture": arch,
        "total_params": sum(x["params"] for x in layers),
        "input_size": list(shape_input) if shape_input else None,
        "input_size_fixed": graph.input_size(model) is not None,
        "versions": dict(sorted(versions.items())),
        "wrappers": dict(sorted(wrappers.items())),
        "layers": layers,
        "trailers": trailers,
    }


def format_listing(info: dict[str, Any]) -> str:
    lines = [
        f"file:         {info['file']}",
        f"size:         {info['size']:,} bytes",
        f"sha256:       {info['sha256']}",
        f"architecture: {info['architecture'] or 'not recognised'}",
        f"parameters:   {info['total_params']:,}",
        "versions:     " + ", ".join(f"{k} x{v}" for k, v in info["versions"].items()),
        "wrappers:     " + ", ".join(f"{k} x{v}" for k, v in info["wrappers"].items()),
    ]
    if info["input_size"]:
        h, w = info["input_size"]
        lines.append(f"shapes for:   a 3x{h}x{w} input" + ("" if info["input_size_fixed"] else
                     "  (the network takes any size; choose with --input-size HxW)"))
    for t in info["trailers"]:
        lines.append(f"trailer:      {t['kind']} ({t['cascades']} cascades, {t['trees']} trees)")
    lines.append("")
    width = max(len(x["path"]) for x in info["layers"])
    lines.append(f"{'layer':<{width}}  {'record':<22} {'output':>14} {'params':>10}  details")
    for x in info["layers"]:
        shape = "x".join(map(str, x["output_shape"])) if x["output_shape"] else ""
        rec = x["record"] or x["summary"]
        summary = x["summary"] if x["record"] else ""
        if "input" in x:
            summary = (summary + f"  <- {x['input']['record']}").strip()
        lines.append(f"{x['path']:<{width}}  {rec:<22} {shape:>14} {x['params']:>10,}  {summary}")
    return "\n".join(lines)


def main(file: str | None, as_json: bool = False, input_size: tuple[int, int] | None = None,
         data: bytes | None = None) -> int:
    path = assets.resolve_model(file)
    info = describe(path, input_size, data)
    if as_json:
        json.dump(info, sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(format_listing(info))
    return 0
