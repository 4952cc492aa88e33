"""Deployment exports of a FaceResNet beside dlib's own format: ONNX and TorchScript.

Every export is reloaded and compared with the torch module on check chips before it is
written (atomically); the .dat export and its dlib parity check are :mod:`dlibbridge.port.convert`.
"""
from __future__ import annotations

import io
import os
import warnings

import torch
from torch import nn

from ..codec import tree as fmt
from .convert import ExportCheckError, _export_copy, _max_diff, check_chips


def export_onnx(module: nn.Module, path: str | os.PathLike, atol: float = 1e-5) -> float:
    """ONNX graph with a dynamic batch: input ``chips`` float32 (N,3,H,W) RGB 0–255, output
    ``descriptors`` (N,128).  Checked with onnxruntime on a batch of 3 (the trace used 2);
    returns max |Δ| vs the torch module, raising :class:`ExportCheckError` above ``atol``."""
    import onnxruntime as ort

    m = _export_copy(module)
    size = tuple(m.config["input_size"])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation/tracer notices
        torch.onnx.export(m, (check_chips(2, 1, size),), buf, dynamo=False, opset_version=17,
                          input_names=["chips"], output_names=["descriptors"],
                          dynamic_axes={"chips": {0: "batch"}, "descriptors": {0: "batch"}})
    data = buf.getvalue()
    x = check_chips(3, 0, size)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"chips": x.numpy()})[0]
    with torch.inference_mode():
        want = m(x)
    diff = _max_diff(got, want)
    if not diff <= atol:
        raise ExportCheckError(f"ONNX export differs from the torch module by {diff:.3g} (> {atol})")
    fmt.write_atomic(path, data)
    return diff


def export_torchscript(module: nn.Module, path: str | os.PathLike, atol: float = 1e-5) -> float:
    """Traced TorchScript module with the same input/output as :func:`export_onnx`,
    reloaded and checked on a batch of 3; returns max |Δ| vs the torch module."""
    m = _export_copy(module)
    size = tuple(m.config["input_size"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (check_chips(2, 1, size),), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    data = buf.getvalue()
    loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    x = check_chips(3, 0, size)
    with torch.inference_mode():
        diff = _max_diff(loaded(x), m(x))
    if not diff <= atol:
        raise ExportCheckError(f"TorchScript export differs from the torch module by {diff:.3g} (> {atol})")
    fmt.write_atomic(path, data)
    return diff


__all__ = ['export_onnx', 'export_torchscript']
