"""port.export: ONNX, TorchScript and torch.export programs take the module's uint8 NHWC
chips, record that in the file, and give dlib's descriptors."""
from __future__ import annotations

import json
import warnings

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
    x = np.ascontiguousarray(face_chips)                     # uint8 (N,150,150,3), as the module takes
    got = np.concatenate([sess.run(None, {"chips": x[:1]})[0], sess.run(None, {"chips": x[1:]})[0]])
    diff = np.abs(got - dlib_descriptors).max()
    print(f"ONNX (onnxruntime), {len(x)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL and same_decisions(got.astype(np.float64), dlib_descriptors)


def test_torchscript_matches_dlib(frozen, face_chips, dlib_descriptors, tmp_path):
    p = tmp_path / "face.pt"
    assert export.export_torchscript(frozen, p) <= ATOL
    ts = load_torchscript(p)
    x = torch.from_numpy(np.ascontiguousarray(face_chips))
    with torch.inference_mode():
        got = torch.cat([ts(x[:7]), ts(x[7:])]).numpy().astype(np.float64)
    diff = np.abs(got - dlib_descriptors).max()
    print(f"TorchScript, {len(x)} chips: max |Δ| vs dlib = {diff:.3g}")
    assert diff <= ATOL and same_decisions(got, dlib_descriptors)


def test_torch_export_program_matches_dlib(frozen, face_chips, dlib_descriptors, tmp_path):
    p = tmp_path / "face.pt2"
    assert export.export_pt2(frozen, p) <= ATOL
    program = torch.export.load(str(p)).module()
    x = torch.from_numpy(np.ascontiguousarray(face_chips))
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



def test_exports_take_the_modules_uint8_nhwc_batch_and_record_it(frozen, onnx_file, face_chips, tmp_path):
    """One array, unchanged, into the module and into each export; each file says what it takes."""
    import onnx
    import onnxruntime as ort
    export.export_torchscript(frozen, tmp_path / "face.pt")
    export.export_pt2(frozen, tmp_path / "face.pt2")
    ts_extra, pt2_extra = {export.INPUT_SPEC_FILE: ""}, {export.INPUT_SPEC_FILE: ""}
    with warnings.catch_warnings():          # torch ≥ 2.13 marks torch.jit.load deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(tmp_path / "face.pt"), _extra_files=ts_extra)
    program = torch.export.load(str(tmp_path / "face.pt2"), extra_files=pt2_extra).module()
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    want = json.loads(json.dumps({**frozen.input_spec, "layouts": ["NHWC"], "dtypes": ["uint8"]}))
    assert want["input_size"] == [3, 150, 150] and want["channel_order"] == "RGB"
    assert [json.loads(t) for t in (meta[export.INPUT_SPEC_KEY], ts_extra[export.INPUT_SPEC_FILE],
                                    pt2_extra[export.INPUT_SPEC_FILE])] == [want] * 3

    x = np.ascontiguousarray(face_chips[:5])
    with torch.inference_mode():
        want = frozen(x).numpy()
        got = {"torchscript": ts(torch.from_numpy(x)).numpy(), "pt2": program(torch.from_numpy(x)).numpy()}
    got["onnx"] = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"chips": x})[0]
    for name, g in got.items():
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-5, err_msg=name)
