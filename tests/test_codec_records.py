"""codec.records: every record dlibbridge builds by hand is accepted by the C++ writer's schema
table and reads back equal; the bn ⇄ affine arithmetic is tested against dlib in
tests/test_codec_rewrite.py and tests/test_port_convert.py."""
from __future__ import annotations

import numpy as np
import pytest

from dlibbridge.codec import records
from dlibbridge.codec.tree import AddLayer, Details, InputLayer, Loss, Model, dumps, loads


def _round_trip(details: Details, *, loss: Details | None = None, inp: Details | None = None) -> Model:
    """Write ``details`` inside a minimal network through the C++ codec and read it back."""
    fc = Details.build(
        "fc_2", ("num_outputs", "uint", 1), ("num_inputs", "uint", 3), ("params", "tensor", np.ones((3, 1, 1, 1), np.float32)),
        ("weights", "alias", (3, 1, 1, 1)), ("biases", "alias", (0, 0, 0, 0)), ("bias_mode", "int", 1),
        ("learning_rate_multiplier", "f64", 1.0), ("weight_decay_multiplier", "f64", 1.0),
        ("bias_learning_rate_multiplier", "f64", 1.0), ("bias_weight_decay_multiplier", "f64", 0.0))
    net = InputLayer(inp or records.input_rgb_image_sized(150, 150), fc)
    net = AddLayer(details, net) if details is not None else net
    model = Model(Loss(loss or records.loss_metric_2(), net))
    return loads(dumps(model))


@pytest.mark.parametrize("mode", [records.CONV_MODE, records.FC_MODE])
def test_bn_records_match_the_schema_and_round_trip(mode):
    shape = (1, 3, 1, 1) if mode == records.CONV_MODE else (1, 3, 2, 2)
    stat = shape
    g = np.arange(int(np.prod(shape)), dtype=np.float32)
    d = records.bn_record(records._BN_VERSION[mode], g, -g, shape, means=np.zeros(stat), invstds=np.ones(stat),
                          running_means=np.full(stat, 0.5), running_variances=np.full(stat, 2.0))
    back = _round_trip(d).net.subnet.details
    assert back == d
    assert back["learning_rate_multiplier"] == 1.0 and back["weight_decay_multiplier"] == 0.0
    assert back["num_updates"] == records.DLIB_BN_WINDOW and back["eps"] == records.DLIB_BN_EPS


def test_affine_input_and_loss_records_match_the_schema():
    d = records.affine_record(np.ones(3), np.zeros(3), (1, 3, 1, 1))
    inp = records.input_rgb_image_sized(120, 130)
    m = _round_trip(d, inp=inp)
    assert m.net.subnet.details == d
    assert m.net.subnet.subnet.input == inp
    assert m.loss == records.loss_metric_2()
    assert (inp["nr"], inp["nc"]) == (120, 130)
    assert [inp[k] for k in ("avg_red", "avg_green", "avg_blue")] == [np.float32(v) for v in records.DLIB_RGB_MEAN]
