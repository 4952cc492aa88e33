"""The generic converter: each layer against a NumPy reference written from dlib-format.md §6,
every real file round-tripped byte for byte, the face ResNet identical to the hand-written
FaceResNet, and each shipped network against dlib's own C++ (tools/dlib_oracle/zoo_oracle.cpp,
which declares each network type as its authors do)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from dlibbridge.codec import tree as fmt
from dlibbridge.port import generic
from dlibbridge.port.convert import ConversionError
from dlibbridge.codec.tree import Details

RNG = np.random.default_rng(0)
E = types.SimpleNamespace(path="layer<1>")


def run(details: Details, x: np.ndarray) -> np.ndarray:
    mods = generic._layer_modules(E, details)
    t = torch.from_numpy(x)
    with torch.no_grad():
        for m in mods:
            t = m(t)
    return t.numpy()


def t4(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ---- NumPy references (dlib's definitions, §6) ------------------------------------------

def ref_conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh, ow = 1 + (h + 2 * pad[0] - kh) // stride[0], 1 + (wd + 2 * pad[1] - kw) // stride[1]
    out = np.zeros((n, f, oh, ow), np.float64)
    for r in range(oh):
        for q in range(ow):
            win = xp[:, :, r * stride[0]:r * stride[0] + kh, q * stride[1]:q * stride[1] + kw]
            out[:, :, r, q] = np.einsum("nchw,fchw->nf", win, w)
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def ref_pool(x, k, stride, pad, kind):
    """dlib: output cell (r, c) covers rows r·s − p … r·s − p + k − 1, clipped to the image;
    max of the clipped window, mean over the clipped window only."""
    n, c, h, w = x.shape
    oh, ow = 1 + (h + 2 * pad[0] - k[0]) // stride[0], 1 + (w + 2 * pad[1] - k[1]) // stride[1]
    out = np.zeros((n, c, oh, ow), np.float64)
    for r in range(oh):
        for q in range(ow):
            r0, q0 = r * stride[0] - pad[0], q * stride[1] - pad[1]
            win = x[:, :, max(r0, 0):min(r0 + k[0], h), max(q0, 0):min(q0 + k[1], w)]
            out[:, :, r, q] = win.max((2, 3)) if kind == "max" else win.mean((2, 3))
    return out


def ref_add_prev(a, b, op=np.add):
    shape = [max(i, j) for i, j in zip(a.shape, b.shape)]
    pa, pb = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    pa[tuple(slice(0, s) for s in a.shape)] = a
    pb[tuple(slice(0, s) for s in b.shape)] = b
    return op(pa, pb)


def con_record(w, b, stride, pad, version="con_4"):
    f, c, kh, kw = w.shape
    params = np.concatenate([w.reshape(-1)] + ([b] if b is not None else [])).reshape(-1, 1, 1, 1)
    items = [("params", "tensor", params), ("num_filters", "int", f), ("nr", "int", kh), ("nc", "int", kw),
             ("stride_y", "int", stride[0]), ("stride_x", "int", stride[1]),
             ("padding_y", "int", pad[0]), ("padding_x", "int", pad[1]),
             ("filters", "alias", (f, c, kh, kw)), ("biases", "alias", (1, f, 1, 1) if b is not None else (0, 0, 0, 0))]
    if version == "con_5":
        items.append(("use_bias", "bool", b is not None))
    return Details.build(version, *items)


def pool_record(kind, k, stride, pad):
    return Details.build(f"{kind}_pool_2", ("nr", "int", k[0]), ("nc", "int", k[1]), ("stride_y", "int", stride[0]),
                         ("stride_x", "int", stride[1]), ("padding_y", "int", pad[0]), ("padding_x", "int", pad[1]))


# ---- layer by layer ---------------------------------------------------------------------

@pytest.mark.parametrize("k,stride,pad,bias", [((3, 3), (1, 1), (1, 1), True), ((5, 5), (2, 2), (0, 0), True),
                                               ((7, 7), (2, 2), (3, 3), False), ((1, 3), (1, 2), (0, 1), True)])
def test_con_matches_numpy(k, stride, pad, bias):
    x, w = t4(2, 3, 11, 12), t4(4, 3, *k)
    b = t4(4) if bias else None
    got = run(con_record(w, b, stride, pad, "con_4" if bias else "con_5"), x)
    np.testing.assert_allclose(got, ref_conv(x, w, b, stride, pad), atol=2e-5)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("k,stride,pad", [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)),
                                          ((5, 3), (2, 1), (2, 1))])
def test_pool_matches_numpy(kind, k, stride, pad):
    x = t4(2, 3, 9, 10)
    got = run(pool_record(kind, k, stride, pad), x)
    np.testing.assert_allclose(got, ref_pool(x, k, stride, pad, kind), atol=1e-6)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_everything_is_one_window(kind):
    x = t4(2, 5, 7, 6)
    got = run(pool_record(kind, (0, 0), (1, 1), (0, 0)), x)
    want = x.max((2, 3), keepdims=True) if kind == "max" else x.mean((2, 3), keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("bias_mode", [0, 1])
def test_fc_flattens_k_nr_nc_and_stores_w_in_by_out(bias_mode):
    x = t4(3, 2, 3, 4)
    w, b = t4(24, 5), t4(5)
    params = np.concatenate([w, b[None]] if bias_mode == 0 else [w]).reshape(-1, 5, 1, 1)
    d = Details.build("fc_2", ("num_outputs", "uint", 5), ("num_inputs", "uint", 24), ("params", "tensor", params),
                      ("weights", "alias", (24, 5, 1, 1)),
                      ("biases", "alias", (1, 5, 1, 1) if bias_mode == 0 else (0, 0, 0, 0)),
                      ("bias_mode", "int", bias_mode))
    want = x.reshape(3, -1) @ w + (b if bias_mode == 0 else 0)
    np.testing.assert_allclose(run(d, x).reshape(3, 5), want, atol=1e-5)


def bn_record(version, shape, g, b, rm, rv, eps=1e-4):
    return Details.build(version, ("params", "tensor", np.concatenate([g, b]).reshape(-1, 1, 1, 1)),
                         ("gamma", "alias", shape), ("beta", "alias", shape),
                         ("running_means", "tensor", rm.reshape(shape)), ("running_variances", "tensor", rv.reshape(shape)),
                         ("eps", "f64", eps))


def test_bn_con_is_dlibs_float32_fold():
    x = t4(2, 4, 3, 3)
    g, b, rm, rv = t4(4), t4(4), t4(4), np.abs(t4(4)) + 0.1
    got = run(bn_record("bn_con2", (1, 4, 1, 1), g, b, rm, rv), x)
    scale = g / np.sqrt(rv + np.float32(1e-4))            # float32, dlib's affine_(const bn_&)
    want = x * scale.reshape(1, -1, 1, 1) + (b - scale * rm).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bn_fc_and_fc_mode_affine_are_per_element():
    x = t4(2, 2, 3, 3)
    g, b, rm, rv = t4(18), t4(18), t4(18), np.abs(t4(18)) + 0.1
    got = run(bn_record("bn_fc2", (1, 2, 3, 3), g, b, rm, rv), x)
    scale = g / np.sqrt(rv + np.float32(1e-4))
    np.testing.assert_allclose(got, x * scale.reshape(1, 2, 3, 3) + (b - scale * rm).reshape(1, 2, 3, 3), atol=1e-6)
    d = Details.build("affine_", ("params", "tensor", np.concatenate([g, b]).reshape(-1, 1, 1, 1)),
                      ("gamma", "alias", (1, 2, 3, 3)), ("beta", "alias", (1, 2, 3, 3)), ("mode", "int", 1))
    np.testing.assert_allclose(run(d, x), x * g.reshape(1, 2, 3, 3) + b.reshape(1, 2, 3, 3), atol=1e-6)


def test_elementwise_layers_match_numpy():
    x = t4(2, 3, 4, 5)
    np.testing.assert_array_equal(run(Details.build("relu_"), x), np.maximum(x, 0))
    np.testing.assert_array_equal(run(Details.build("relu_2", ("disabled", "bool", True)), x), x)
    np.testing.assert_allclose(run(Details.build("sig_"), x), 1 / (1 + np.exp(-x)), atol=1e-6)
    np.testing.assert_allclose(run(Details.build("htan_"), x), np.tanh(x), atol=1e-6)
    p = np.array([[[[0.25]]]], np.float32)
    prelu = Details.build("prelu_", ("params", "tensor", p), ("initial_param_value", "f32", 0.25))
    np.testing.assert_allclose(run(prelu, x), np.where(x > 0, x, 0.25 * x), atol=1e-7)
    # dropout_ runs as the multiply_ dlib builds from it: val = 1 − drop_rate
    drop = Details.build("dropout_", ("drop_rate", "f32", 0.3), ("mask", "tensor", np.zeros((0, 0, 0, 0), np.float32)))
    np.testing.assert_allclose(run(drop, x), x * (np.float32(1) - np.float32(0.3)), atol=1e-7)
    np.testing.assert_allclose(run(Details.build("multiply_", ("val", "f32", 1.5)), x), x * 1.5, atol=1e-7)
    l2 = Details.build("l2normalize_", ("eps", "f64", 1e-5))
    want = x / np.sqrt((x.reshape(2, -1) ** 2).sum(1) + 1e-5).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(run(l2, x), want, atol=1e-6)


@pytest.mark.parametrize("a,b", [((2, 3, 4, 4), (2, 5, 3, 3)), ((2, 4, 2, 2), (2, 4, 1, 1)), ((1, 2, 3, 3),) * 2])
def test_add_prev_and_mult_prev_zero_pad_at_the_end(a, b):
    from dlibbridge.port.arch import add_prev
    x, y = t4(*a), t4(*b)
    np.testing.assert_allclose(add_prev(torch.from_numpy(x), torch.from_numpy(y)).numpy(), ref_add_prev(x, y), atol=1e-7)
    np.testing.assert_allclose(generic.mult_prev(torch.from_numpy(x), torch.from_numpy(y)).numpy(),
                               ref_add_prev(x, y, np.multiply), atol=1e-7)


# ---- whole files --------------------------------------------------------------------------

def test_every_real_file_converts_and_round_trips_byte_identically(real_model_files):
    for name, data in real_model_files.items():
        net = generic.to_torch(data)
        assert fmt.dumps(generic.to_dlib_tree(net)) == data, name


def test_changed_weights_are_written_back(real_model_files):
    data = real_model_files["dnn_gender_classifier_v1.dat"]
    net = generic.to_torch(data)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(1.5)
            if hasattr(m, "scale") and isinstance(m.scale, torch.Tensor):
                m.scale.add_(0.25)
    back = generic.to_torch(fmt.dumps(generic.to_dlib_tree(net)))
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_layer_names_its_version(real_model_files):
    model = fmt.loads(real_model_files["dnn_gender_classifier_v1.dat"])
    relu = next(e for e in model.layers() if e.details is not None and e.details.version == "relu_")
    relu.node.details = Details.build("gelu_")
    with pytest.raises(ConversionError, match="'gelu_'"):
        generic.to_torch(model)


def test_face_resnet_generic_equals_faceresnet(face_model_path, johns_chips):
    from dlibbridge.port import convert
    chips = torch.from_numpy(johns_chips[2][:12])
    with torch.no_grad():
        want = convert.to_torch(face_model_path)(chips)
        got = generic.to_torch(face_model_path)(chips)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)


def test_to_torch_dispatches_every_file(real_model_files):
    import dlibbridge
    from dlibbridge.port.arch import FaceResNet
    assert isinstance(dlibbridge.to_torch(real_model_files["dlib_face_recognition_resnet_model_v1.dat"]), FaceResNet)
    assert isinstance(dlibbridge.to_torch(real_model_files["mmod_human_face_detector.dat"]), generic.DlibNet)


def test_output_shapes_of_the_densenet(real_model_files):
    net = generic.to_torch(real_model_files["face_recognition_densenet_model_v1.dat"])
    shapes = generic.output_shapes(net, 150, 150)
    assert shapes[-1][2] == (128, 1, 1)
    assert shapes[3][2] == (32, 38, 38)            # 7×7 s2 pad 3 → 75, 3×3 s2 pad 1 max pool → 38


# ---- against dlib's C++ -----------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_oracle(tmp_path_factory):
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "dlib_oracle"))
    import build
    binary = build.build(source="zoo_oracle.cpp")
    tmp = tmp_path_factory.mktemp("zoo")

    def forward(net: str, model: bytes, images: np.ndarray):
        mpath, ipath, opath = tmp / f"{net}.dat", tmp / f"{net}.u8", tmp / f"{net}.out"
        mpath.write_bytes(model)
        np.ascontiguousarray(images, np.uint8).tofile(ipath)
        n, h, w, _ = images.shape
        r = subprocess.run([str(binary), "forward", net, mpath, ipath, str(n), str(h), str(w), opath],
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stdout + r.stderr
        raw = opath.read_bytes()
        out, off = [], 0
        for _ in range(2 * n):
            dims = np.frombuffer(raw, np.int32, 4, off)
            off += 16
            size = int(np.prod(dims))
            out.append(np.frombuffer(raw, np.float32, size, off).reshape(dims))
            off += 4 * size
        return out[0::2], out[1::2], r.stdout
    return forward


def _photos(shared_dir, size):
    """Real photos (dlib's decoder), cropped to one size for the batch file."""
    import dlib
    files = sorted((shared_dir / "data" / "faces").glob("*.jpg"))[:3]
    imgs = [dlib.load_rgb_image(str(f)) for f in files]
    h, w = size
    return np.stack([i[:h, :w] for i in imgs if i.shape[0] >= h and i.shape[1] >= w])


def _rel(a, b):
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


ORACLE_CASES = {
    # file → (oracle net type, image size)
    "mmod_human_face_detector.dat": ("face_mmod", (200, 240)),
    "shared/mmod_human_face_detector.dat": ("face_mmod", (200, 240)),
    "mmod_rear_end_vehicle_detector.dat": ("vehicle_mmod", (200, 240)),
    "mmod_front_and_rear_end_vehicle_detector.dat": ("vehicle_mmod", (200, 240)),
    "dnn_gender_classifier_v1.dat": ("gender", (32, 32)),
    "face_recognition_densenet_model_v1.dat": ("densenet", (150, 150)),
}


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_network_output_matches_dlib_cpp(name, zoo_oracle, real_model_files, shared_dir, johns_chips):
    net_type, size = ORACLE_CASES[name]
    if size == (150, 150):
        images = johns_chips[2][::11]
    elif size == (32, 32):
        images = np.ascontiguousarray(johns_chips[2][::11, 11:139:4, 11:139:4])   # real faces, 32×32
    else:
        images = _photos(shared_dir, size)
    inputs, outputs, _ = zoo_oracle(net_type, real_model_files[name], images)
    net = generic.to_torch(real_model_files[name])
    worst = 0.0
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            got = net.forward_normalized(torch.from_numpy(x.copy())).numpy()
            worst = max(worst, _rel(got.reshape(y.shape), y))
    print(f"{name}: max |Δ| / max(1, max|y|) = {worst:.3g} over {len(images)} images")
    assert worst <= 1e-5


def test_onnx_export_of_every_network(real_model_files, tmp_path):
    from dlibbridge.port.export import export_onnx
    for name, data in real_model_files.items():
        if name.startswith("dlib_face_recognition"):
            continue   # FaceResNet's own export, tests/test_port_export.py
        net = generic.to_torch(data)
        out = tmp_path / (name.replace("/", "_") + ".onnx")
        diff = export_onnx(net, out)
        assert diff <= 1e-5 and out.stat().st_size > 0, name


def test_checked_dat_export_of_a_generic_network(real_model_files, tmp_path):
    from dlibbridge.port import convert
    net = generic.to_torch(real_model_files["dnn_gender_classifier_v1.dat"])
    out = tmp_path / "gender.dat"
    assert convert.to_dlib(net, out, check=True) == 0.0
    assert out.read_bytes() == real_model_files["dnn_gender_classifier_v1.dat"]
