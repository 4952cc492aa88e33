"""unfreeze / freeze proven with dlib's own C++ (tools/dlib_oracle, built from dlib's sdist).

The oracle declares the training ``net_type`` (bn_con) and testing ``anet_type`` (affine)
of dlib's metric-learning example with the face ResNet's levels; it runs dlib's
deserializers, ``anet_type a = net;``, batch forwards (dlib's batch-norm on batch
statistics) and ``dnn_trainer`` with the example's solver.

Measured (johns, dlib 20.0.1): uncalibrated net_type on a batch of 25: mean |Δ| 1.17,
max 5.6 from the deployed descriptors; calibrated on all 55: mean 0.0026, max 0.013; single
chips ≤ 2.7e-7.  dnn_trainer (sgd(0.0005, 0.9), lr 0.01, batch 5×5): first losses
4.76, 2.82, 2.22 uncalibrated, 0.0 calibrated.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dlib
from dlibbridge.codec import rewrite
from dlibbridge.port import convert

pytestmark = [pytest.mark.oracle, pytest.mark.slow]   # builds dlib (~3 CPU-min), then ~2 CPU-min

REFUSAL = "Unexpected version 'affine_' found while deserializing dlib::bn_"


@pytest.fixture(scope="module")
def johns(johns_chips, face_model_path):
    """(chips, integer labels, deployed descriptors from Python dlib)."""
    _, people, chips = johns_chips
    names = sorted(set(people))
    labels = np.array([names.index(p) for p in people])
    ref = np.array(dlib.face_recognition_model_v1(str(face_model_path)).compute_face_descriptor(list(chips)))
    return chips, labels, ref


@pytest.fixture(scope="module")
def batch25(johns):
    """dlib's example mini-batch shape: 5 people × 5 chips (the first five of each)."""
    _, labels, _ = johns
    return np.concatenate([np.flatnonzero(labels == p)[:5] for p in range(5)])


def test_deployed_model_is_refused_by_net_type(dlib_oracle, face_model_path):
    """The negative control: the problem unfreeze solves, in dlib's own words."""
    with pytest.raises(Exception) as err:
        dlib_oracle.load(face_model_path, "net")
    assert REFUSAL in err.value.text
    assert "loaded anet_type" in dlib_oracle.load(face_model_path, "anet")


def test_unfrozen_file_loads_into_net_type(dlib_oracle, unfrozen_face_model, calibrated_face_model):
    assert "loaded net_type" in dlib_oracle.load(unfrozen_face_model, "net")
    assert "loaded net_type" in dlib_oracle.load(calibrated_face_model[0], "net")


def test_anet_type_from_unfrozen_net_gives_the_original_descriptors(dlib_oracle, unfrozen_face_model, johns):
    chips, _, ref = johns
    # dlib's `anet_type a = net;` on the net_type loaded from the unfrozen file: bit-identical.
    np.testing.assert_array_equal(dlib_oracle.embed(unfrozen_face_model, chips, "anet"), ref)
    # net_type itself, one chip at a time (running statistics): bit-identical too.
    np.testing.assert_array_equal(dlib_oracle.embed(unfrozen_face_model, chips[::6], "single"), ref[::6])


def test_calibration_brings_net_type_batch_output_to_the_deployed_one(dlib_oracle, unfrozen_face_model,
                                                                      calibrated_face_model, johns, batch25):
    chips, _, ref = johns
    before = np.abs(dlib_oracle.embed(unfrozen_face_model, chips[batch25], "batch") - ref[batch25])
    after = np.abs(dlib_oracle.embed(calibrated_face_model[0], chips[batch25], "batch") - ref[batch25])
    print(f"net_type batch of 25: uncalibrated mean {before.mean():.4f} max {before.max():.4f}; "
          f"calibrated on 55: mean {after.mean():.4f} max {after.max():.4f}")
    assert before.mean() > 0.5 and before.max() > 2          # the problem is real (1.17 / 5.6 measured)
    assert after.mean() <= 0.01 and after.max() <= 0.1       # the target
    single = dlib_oracle.embed(calibrated_face_model[0], chips[batch25][::5], "single")
    assert np.abs(single - ref[batch25][::5]).max() <= 1e-6  # inference unchanged


@pytest.fixture(scope="module")
def trained(dlib_oracle, unfrozen_face_model, johns, batch25, tmp_path_factory):
    """Three dnn_trainer steps on the uncalibrated unfrozen file (loss far from 0, so a
    decrease is visible); the trainer's saved net_type file."""
    chips, labels, _ = johns
    out = tmp_path_factory.mktemp("oracle") / "trained.dat"
    return dlib_oracle.train(unfrozen_face_model, chips[batch25], labels[batch25], steps=3, lr=0.01, out=out)


def test_dnn_trainer_runs_with_finite_decreasing_loss(trained):
    print("dnn_trainer losses:", trained.losses)
    assert len(trained.losses) == 3 and np.all(np.isfinite(trained.losses))
    assert trained.losses[0] > 2                              # training-mode start of the uncalibrated net
    assert all(b < a for a, b in zip(trained.losses, trained.losses[1:]))
    assert trained.output.stat().st_size > 20_000_000


def test_dnn_trainer_starts_at_the_deployed_loss_after_calibration(dlib_oracle, calibrated_face_model, johns,
                                                                   batch25, tmp_path):
    chips, labels, _ = johns
    r = dlib_oracle.train(calibrated_face_model[0], chips[batch25], labels[batch25], steps=1, lr=0.01,
                          out=tmp_path / "t.dat")
    print("dnn_trainer first loss after calibration:", r.losses)
    assert len(r.losses) == 1 and 0 <= r.losses[0] <= 0.01   # 0.0 measured (deployed model: 0.0)


def test_trained_file_deploys_through_freeze_to_dlib_and_the_torch_port(dlib_oracle, trained, johns, tmp_path):
    chips, _, _ = johns
    chips = chips[::5]
    want = dlib_oracle.embed(trained.output, chips, "anet")     # dlib's `anet_type a = net;`
    frozen = tmp_path / "deployed.dat"
    rewrite.freeze_file(trained.output, frozen)
    got = np.array(dlib.face_recognition_model_v1(str(frozen)).compute_face_descriptor(list(chips)))
    np.testing.assert_array_equal(got, want)                    # freeze == dlib's conversion, bit for bit
    np.testing.assert_array_equal(dlib_oracle.embed(frozen, chips, "anet-file"), want)
    with torch.inference_mode():
        port = convert.to_torch(frozen)(torch.from_numpy(chips)).numpy()
    assert np.abs(port - want).max() <= 1e-5                    # the port's float tolerance (2.1e-6 measured)


def test_loss_metric_golden_file_is_what_dlib_computes(dlib_oracle):
    """tests/data/loss_metric_golden.npz (tools/dlib_oracle/make_loss_metric_golden.py) is
    reproduced exactly by dlib's C++ now, so the committed numbers cannot go stale."""
    from pathlib import Path
    z = np.load(Path(__file__).resolve().parent / "data" / "loss_metric_golden.npz")
    prefixes = sorted({k.split("_", 1)[0] for k in z.files})
    assert len(prefixes) >= 10
    for p in prefixes:
        loss, grad = dlib_oracle.loss_metric(z[f"{p}_embeddings"], z[f"{p}_labels"], float(z[f"{p}_margin"]),
                                             float(z[f"{p}_dist_thresh"]))
        assert loss == float(z[f"{p}_loss"]), str(z[f"{p}_name"])
        np.testing.assert_array_equal(grad, z[f"{p}_gradient"], err_msg=str(z[f"{p}_name"]))
