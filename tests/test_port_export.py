"""port.export: ONNX and TorchScript exports give dlib's descriptors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dlibbridge.port import convert, export
from dlibbridge.port.checkpoint import load_torchscript
from parity import ATOL, same_decisions


@pytest.fixture(scope="module")
def onnx_file(frozen, tmp_path_factory):
    p = tmp_path_factory.mktemp("onnx") / "face.onnx"
    diff = export.export_onnx(frozen, p)
    assert diff <= ATOL
    return p


def test_onnx_dynamic_batch_matches_dlib(onnx_file, face_chips, dlib_descriptors):
    import onnx
    import onnxruntime as ort
    graph = onnx.load(str(onnx_file)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(face_chips.transpose(0, 3, 1, 2), dtype=np.float32)
    got = np.concatenate([sess.run(None, {"chips": x[:1]})[0], sess.run(None, {"chips": x[1:]})[0]])
    diff = np.abs(got - dlib_descriptors).max()
    print(f"ONNX (onnxruntime), {len(x)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL and same_decisions(got.astype(np.float64), dlib_descriptors)


def test_torchscript_matches_dlib(frozen, face_chips, dlib_descriptors, tmp_path):
    p = tmp_path / "face.pt"
    assert export.export_torchscript(frozen, p) <= ATOL
    ts = load_torchscript(p)
    x = torch.from_numpy(np.ascontiguousarray(face_chips.transpose(0, 3, 1, 2))).float()
    with torch.inference_mode():
        got = torch.cat([ts(x[:7]), ts(x[7:])]).numpy().astype(np.float64)
    diff = np.abs(got - dlib_descriptors).max()
    print(f"TorchScript, {len(x)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL and same_decisions(got, dlib_descriptors)


def test_torch_export_program_matches_dlib(frozen, face_chips, dlib_descriptors, tmp_path):
    p = tmp_path / "face.pt2"
    assert export.export_pt2(frozen, p) <= ATOL
    program = torch.export.load(str(p)).module()
    x = torch.from_numpy(np.ascontiguousarray(face_chips.transpose(0, 3, 1, 2))).float()
    with torch.inference_mode():
        got = torch.cat([program(x[:7]), program(x[7:])]).numpy().astype(np.float64)   # batch is dynamic
    diff = np.abs(got - dlib_descriptors).max()
    print(f"torch.export, {len(x)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL and same_decisions(got, dlib_descriptors)


def test_torchscript_export_and_reload_raise_no_deprecation_warning(frozen, tmp_path):
    import warnings
    from dlibbridge.port.checkpoint import open_model
    p = tmp_path / "face.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.export_torchscript(frozen, p)
        open_model(p)


def test_trainable_module_exports_its_deployed_form_to_onnx(trainable, frozen, tmp_path):
    """A batch-norm (fine-tuning) module is exported folded, as dlib would deploy it."""
    import onnxruntime as ort
    diff = export.export_onnx(trainable, tmp_path / "t.onnx")
    assert diff <= 1e-5
    x = convert.check_chips(4, 7, (150, 150))
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"chips": x.numpy()})[0]
    with torch.inference_mode():
        want = frozen(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
