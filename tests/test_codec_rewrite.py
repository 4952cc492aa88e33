"""unfreeze / freeze against the real files and the real ``dlib`` Python package.

What is exact and what is not (tolerances):
* uncalibrated unfreeze: bit-identical descriptors in Python dlib (dlib's affine reader
  converts the bn records back); every other record, and the whole file once the affine
  records are put back, byte-identical; freeze∘unfreeze is the identity on bytes.
* freeze: bit-identical to dlib's own bn→affine conversion (Python dlib loading the bn file
  itself), checked on real trained statistics (the CNN face detector's bn_con2 layers).
* calibrated unfreeze: inference within 1e-6 (float rounding of gamma·(x−μ)/σ + beta vs
  g·x + b; measured 2.5e-7); training-mode deviation on batches of 25 johns ≤ 0.01 mean,
  ≤ 0.1 max (measured 0.0026 / 0.013 with dlib's C++, see test_unfreeze_oracle.py).
The C++ proofs (dlib's net_type, anet_type and dnn_trainer) are in test_unfreeze_oracle.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import dlib
from dlibbridge import cli
from dlibbridge.codec import records, rewrite
from dlibbridge.codec import tree as fmt
from dlibbridge.codec.rewrite import BatchNormError
from dlibbridge.codec.tree import Details
from parity import dlib_embed

EPS = 1e-4


# ---- record level -------------------------------------------------------------------------

def _affine(c=3, mode=0, shape=None, version="affine_"):
    shape = shape or (1, c, 1, 1)
    n = int(np.prod(shape))
    params = np.arange(2 * n, dtype=np.float32).reshape(-1, 1, 1, 1) / 7 - 1
    fields = [("params", "tensor", params), ("gamma", "alias", shape), ("beta", "alias", shape), ("mode", "int", mode)]
    if version == "affine_2":
        fields.append(("disabled", "bool", False))
    return Details.build(version, *fields)


def test_affine_to_bn_writes_the_exact_form_of_dlib_format_6_7():
    d = records.affine_to_bn(_affine(4))
    assert d.version == "bn_con2"
    assert [n for n, _ in d.items()] == [
        "params", "gamma", "beta", "means", "invstds", "running_means", "running_variances", "num_updates",
        "running_stats_window_size", "learning_rate_multiplier", "weight_decay_multiplier",
        "bias_learning_rate_multiplier", "bias_weight_decay_multiplier", "eps"]
    assert d.fields["eps"].type == "f64" and d["eps"] == EPS
    np.testing.assert_array_equal(d["params"], _affine(4)["params"])
    for name, value in (("means", 0), ("invstds", 1), ("running_means", 0)):
        assert d[name].shape == (1, 4, 1, 1) and np.all(d[name] == value), name
    assert d["running_variances"].dtype == np.float32 and np.all(d["running_variances"] == np.float32(1 - EPS))
    # float(double(float32(1 - eps)) + eps) is exactly 1.0f: invstd is exactly 1.
    assert np.float32(np.float64(np.float32(1 - EPS)) + EPS) == np.float32(1.0)
    assert (d["num_updates"], d["running_stats_window_size"]) == (100, 100)
    assert [d[k] for k in ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
                           "bias_weight_decay_multiplier")] == [1.0, 0.0, 1.0, 1.0]


def test_fc_mode_affine_becomes_bn_fc2_with_per_element_statistics():
    a = _affine(mode=1, shape=(1, 2, 3, 4))
    d = records.affine_to_bn(a)
    assert d.version == "bn_fc2" and d["running_means"].shape == (1, 2, 3, 4) and d["means"].shape == (1, 2, 3, 4)
    assert records.bn_to_affine(d) == a


def test_affine2_round_trips_to_the_affine_form_the_face_model_uses():
    back = records.bn_to_affine(records.affine_to_bn(_affine(5, version="affine_2")))
    assert back == _affine(5)          # affine_ (no 'disabled' field), same numbers


def test_bn_to_affine_is_dlibs_fold():
    """dlib's affine_(const bn_&) computes in float32 (eps cast to float, then the sum); the
    double-precision sum of its bn inference differs in the last bit for some values, which
    shows in detections (see the detector test below)."""
    rng = np.random.default_rng(0)
    c = 6
    bn = records.affine_to_bn(_affine(c))
    gamma, beta = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    rm, rv = rng.normal(size=c).astype(np.float32), rng.uniform(0.01, 3, size=c).astype(np.float32)
    bn["params"] = np.concatenate([gamma, beta]).reshape(-1, 1, 1, 1)
    bn["running_means"], bn["running_variances"] = rm.reshape(1, c, 1, 1), rv.reshape(1, c, 1, 1)
    out = records.bn_to_affine(bn)["params"].reshape(-1)
    g = gamma / np.sqrt(rv + np.float32(EPS))
    assert g.dtype == np.float32
    np.testing.assert_array_equal(out[:c], g)
    np.testing.assert_array_equal(out[c:], beta - g * rm)


def test_bad_records_are_refused_with_the_layer_named():
    dis = Details.build("affine_2", ("params", "tensor", np.zeros((0, 0, 0, 0), np.float32)),
                        ("gamma", "alias", (0, 0, 0, 0)), ("beta", "alias", (0, 0, 0, 0)), ("mode", "int", 0),
                        ("disabled", "bool", True))
    with pytest.raises(BatchNormError, match=r"layer<7> affine_2: a disabled affine"):
        records.affine_to_bn(dis, "layer<7>")
    short = _affine(3)
    short["params"] = np.zeros((5, 1, 1, 1), np.float32)
    with pytest.raises(BatchNormError, match="params holds 5 floats"):
        records.affine_to_bn(short)
    bn = records.affine_to_bn(_affine(3))
    bn["running_means"] = np.zeros((0, 0, 0, 0), np.float32)
    with pytest.raises(BatchNormError, match="running statistics shaped"):
        records.bn_to_affine(bn, "layer<2>")


# ---- whole files --------------------------------------------------------------------------

def test_unfreeze_changes_only_the_affine_records(face_model_path, face_model_bytes):
    model = fmt.load(face_model_path)
    originals = {e.path: e.details for e in model.layers() if e.details is not None}
    conv = rewrite.unfreeze(model)
    assert len(conv.converted) == 29
    assert {e.details.version for e in model.layers() if e.path in conv.converted} == {"bn_con2"}
    assert not any(e.details.layer_type == "affine" for e in model.layers() if e.details is not None)
    # Putting the original affine records back gives the original file byte for byte: the
    # unfrozen file differs from the deployed one in those records and nowhere else.
    data = fmt.dumps(model)
    for e in model.layers():
        if e.path in conv.converted:
            e.node.details = originals[e.path]
    assert fmt.dumps(model) == face_model_bytes
    assert len(data) > len(face_model_bytes)


def test_freeze_after_unfreeze_is_the_identity_on_bytes(unfrozen_face_model, face_model_bytes):
    model = fmt.load(unfrozen_face_model)
    assert len(rewrite.freeze(model).converted) == 29
    assert fmt.dumps(model) == face_model_bytes


def test_python_dlib_gives_identical_descriptors_from_the_unfrozen_file(unfrozen_face_model, johns_chips,
                                                                         johns_reference):
    got = dlib_embed(unfrozen_face_model, johns_chips[2])
    assert got.shape == (55, 128)
    np.testing.assert_array_equal(got, johns_reference)


def test_freeze_matches_dlibs_own_conversion_on_real_trained_statistics(tmp_path, shared_dir):
    """The CNN face detector stores bn_con2 with real running statistics; dlib's
    cnn_face_detection_model_v1 (affine-typed) converts them at load time.  Our frozen file
    must give bit-identical detections."""
    from dlibbridge import assets
    src = assets.cnn_face_detector_path()
    out = tmp_path / "mmod_frozen.dat"
    lines = rewrite.freeze_file(src, out)
    assert "converted 6 batch-norm records" in lines[1]
    assert {e.details.version for e in fmt.load(out).layers() if e.details is not None} >= {"affine_"}
    img = dlib.load_rgb_image(str(shared_dir / "data" / "faces" / "2008_002506.jpg"))

    def detect(path):
        return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                for d in dlib.cnn_face_detection_model_v1(str(path))(img, 0)]

    want = detect(src)
    assert want and detect(out) == want






# ---- CLI ----------------------------------------------------------------------------------

def test_cli_unfreeze_default_model_to_cwd_and_verifies(tmp_path, monkeypatch, capsys, face_model_bytes):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["unfreeze", "-q"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "dlib_face_recognition_resnet_model_v1_trainable.dat"
    assert written.is_file()
    assert "converted 29 affine records to bn_con2" in out
    assert "python dlib descriptors vs original: max |Δ| 0.00e+00" in out
    model = fmt.load(written)
    rewrite.freeze(model)
    assert fmt.dumps(model) == face_model_bytes
    # freeze through the CLI goes back to the deployed bytes too
    assert cli.main(["freeze", str(written), "-o", str(tmp_path / "deployed.dat")]) == 0
    assert (tmp_path / "deployed.dat").read_bytes() == face_model_bytes
    assert "bit-identical" in capsys.readouterr().out




def test_cli_refuses_to_overwrite_input_and_pointless_or_bad_input(tmp_path, unfrozen_face_model, face_model_path,
                                                                   capsys):
    copy = tmp_path / "m.dat"
    copy.write_bytes(unfrozen_face_model.read_bytes())
    before = copy.read_bytes()
    assert cli.main(["freeze", str(copy), "-o", str(copy)]) == 2
    assert "refusing to write over the input" in capsys.readouterr().err
    assert copy.read_bytes() == before
    assert cli.main(["unfreeze", str(copy), "-o", str(tmp_path / "x.dat")]) == 2      # already trainable
    assert "no affine_ records to unfreeze" in capsys.readouterr().err
    assert cli.main(["freeze", str(face_model_path), "-o", str(tmp_path / "y.dat")]) == 2
    assert "no bn_con2/bn_fc2 records to freeze" in capsys.readouterr().err
    bad = tmp_path / "bad.dat"
    bad.write_bytes(before[:1000])
    assert cli.main(["freeze", str(bad), "-o", str(tmp_path / "z.dat")]) == 2
    assert "invalid dlib file" in capsys.readouterr().err
    assert not any(p.name in ("x.dat", "y.dat", "z.dat") or p.name.startswith(".tmp") for p in tmp_path.iterdir())


