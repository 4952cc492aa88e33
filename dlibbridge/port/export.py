"""Deployment exports of a FaceResNet beside dlib's own format: ONNX, TorchScript and a
``torch.export`` program (``.pt2``).

All three take what the torch module takes by default — uint8 RGB chips (N,H,W,3), the layout
of an image array, with a dynamic batch N — and give (N,128) descriptors; the graph converts
to float and normalises inside (the eager module's other layouts and its input checks are
not traced: ``net.input_spec`` describes the module, the export's own spec is recorded in the
file: ONNX metadata ``input_spec``, ``input_spec.json`` in a TorchScript or ``.pt2``
archive).  Every export is reloaded and compared with the torch module on a batch of 3
check chips (the trace used 2) before it is written (atomically): :func:`_checked_write`.
The .dat export and its parity check in dlib itself are :mod:`dlibbridge.port.convert`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Callable

import torch
from torch import nn

from .._io import write_atomic
from .checkpoint import load_torchscript
from .convert import ExportCheckError, _export_copy, _max_diff, check_chips
from .generic import DlibNet


#: The name of the input specification inside a TorchScript or ``.pt2`` archive
#: (``torch.jit.load(path, _extra_files={INPUT_SPEC_FILE: ""})``) and the ONNX metadata key.
INPUT_SPEC_FILE = "input_spec.json"
INPUT_SPEC_KEY = "input_spec"


def export_input_spec(m: nn.Module) -> dict:
    """The input an export of ``m`` takes: the module's ``input_spec`` narrowed to what the
    trace fixed (uint8, NHWC with the batch; H and W dynamic where the network takes any
    size)."""
    return {**m.input_spec, "layouts": ("NHWC",), "dtypes": ("uint8",)}


def _generic_inputs(net: DlibNet, n: int, seed: int) -> torch.Tensor:
    """Random uint8 RGB images (N,H,W,3) of the size the network takes: its
    ``input_rgb_image_sized`` size, else 150×150 (any size works; the export's H and W are
    dynamic)."""
    h, w = net.input.size or (150, 150)
    return check_chips(n, seed, (h, w))


def _onnx_bytes(m: nn.Module, example: torch.Tensor, input_name: str, output_name: str, dims: dict) -> bytes:
    """The ``torch.export``-based ONNX exporter (``dynamo=True``, torch's supported one; the
    TorchScript-based exporter is deprecated), dimensions ``dims`` of the input dynamic, the
    export's input spec in the model's metadata.  Its notices (optional torchvision ops,
    pytree deprecations) are not the user's concern."""
    import logging
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(m, (example,), dynamo=True, input_names=[input_name],
                                        output_names=[output_name], dynamic_shapes=(dims,), verbose=False)
    finally:
        log.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = INPUT_SPEC_KEY, json.dumps(export_input_spec(m))
    return proto.SerializeToString()


def _export_onnx_generic(net: DlibNet, path, atol: float) -> float:
    import copy

    import onnxruntime as ort

    m = copy.deepcopy(net).to("cpu").eval()
    dims = {0: torch.export.Dim("batch", min=1)}
    if not net.input.size:
        dims.update({1: torch.export.Dim("height", min=32), 2: torch.export.Dim("width", min=32)})
    data = _onnx_bytes(m, _generic_inputs(m, 2, 1), "images", "output", dims)
    x = _generic_inputs(m, 3, 0)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        want = m(x)
    diff = _max_diff(got, want) / max(1.0, float(want.abs().max()))
    if not diff <= atol:
        raise ExportCheckError(f"ONNX export differs from the torch module by {diff:.3g} (> {atol}, relative)")
    write_atomic(path, data)
    return diff


def check_onnx_installed(option: str = "--onnx") -> None:
    """ONNX export needs the optional ``onnx`` extra (onnx, onnxscript for torch's exporter,
    onnxruntime for the check); say so before any work instead of failing deep inside torch."""
    import importlib
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportCheckError(f"{option} needs the package{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(missing)}: pip install 'dlibbridge[onnx]'")


def _checked_write(kind: str, data: bytes, run: Callable, m: nn.Module, path, atol: float) -> float:
    """Max |Δ| of ``run`` (the reloaded export) vs the module on 3 check chips; writes
    ``data`` to ``path`` only when it is ≤ ``atol``, else :class:`ExportCheckError`."""
    x = check_chips(3, 0, tuple(m.config["input_size"]))
    with torch.inference_mode():
        diff = _max_diff(run(x), m(x))
    if not diff <= atol:
        raise ExportCheckError(f"{kind} export differs from the torch module by {diff:.3g} (> {atol})")
    write_atomic(path, data)
    return diff


def export_onnx(module: nn.Module, path: str | os.PathLike, atol: float = 1e-5) -> float:
    """ONNX graph, input ``chips``, output ``descriptors``, checked with onnxruntime;
    returns max |Δ| vs the torch module."""
    if isinstance(getattr(module, "_orig_mod", module), DlibNet):
        # any other dlib network: input ``images`` (N,H,W,3) uint8 RGB, output the tensor
        # dlib's loss reads; the returned difference is relative to max(1, max |output|)
        return _export_onnx_generic(getattr(module, "_orig_mod", module), path, atol)
    import onnxruntime as ort

    m = _export_copy(module)
    data = _onnx_bytes(m, check_chips(2, 1, tuple(m.config["input_size"])), "chips", "descriptors",
                       {0: torch.export.Dim("batch", min=1)})
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return _checked_write("ONNX", data, lambda x: sess.run(None, {"chips": x.numpy()})[0], m, path, atol)


def export_torchscript(module: nn.Module, path: str | os.PathLike, atol: float = 1e-5) -> float:
    """Traced TorchScript module, reloaded and checked; returns max |Δ| vs the torch module.
    torch ≥ 2.13 marks TorchScript deprecated (its notices are silenced here); the archive
    still loads with ``torch.jit.load`` in every supported torch, and :func:`export_pt2` is
    the format that replaces it."""
    m = _export_copy(module)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (check_chips(2, 1, tuple(m.config["input_size"])),), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={INPUT_SPEC_FILE: json.dumps(export_input_spec(m))})
    data = buf.getvalue()
    loaded = load_torchscript(io.BytesIO(data))
    return _checked_write("TorchScript", data, loaded, m, path, atol)


def export_pt2(module: nn.Module, path: str | os.PathLike, atol: float = 1e-5) -> float:
    """``torch.export`` program (``torch.export.save``; load with ``torch.export.load(path)
    .module()``), dynamic batch, reloaded and checked; returns max |Δ| vs the torch module."""
    m = _export_copy(module)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(m, (check_chips(2, 1, tuple(m.config["input_size"])),),
                                      dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={INPUT_SPEC_FILE: json.dumps(export_input_spec(m))})
    data = buf.getvalue()
    loaded = torch.export.load(io.BytesIO(data)).module()
    return _checked_write("torch.export", data, loaded, m, path, atol)


__all__ = ["INPUT_SPEC_FILE", "INPUT_SPEC_KEY", "export_input_spec", "export_onnx", "export_torchscript", "export_pt2"]
