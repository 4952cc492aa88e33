"""oneDNN's fused convolutions (dlibbridge.port.onednn) against a NumPy reference and against
the plain torch ops they replace; and the face ResNet's fused inference path against the
unfused one and dlib.

Tolerances: the fused ops are bit-identical to the plain ops (same float32 sums, post-ops in
the same order); against the float64 NumPy reference within float32 rounding (1e-5);
descriptors within 1e-5 of dlib (the port's bar).
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import dlib_reference as ref
from dlibbridge.port import arch, onednn

pytestmark = pytest.mark.skipif(onednn._POINTWISE is None, reason="this torch build has no oneDNN")


def _unit(cin, cout, k, s, relu, seed):
    rng = np.random.default_rng(seed)
    unit = arch.ConvNorm(cin, cout, k, s, arch.DlibAffine, relu=relu).eval()
    with torch.no_grad():
        unit.norm.scale.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, cout).astype(np.float32)))
        unit.norm.shift.copy_(torch.from_numpy(rng.standard_normal(cout).astype(np.float32)))
    return unit.to(memory_format=torch.channels_last)


def _numpy_unit(unit, x, residual=None):
    """conv → affine (→ + residual) → relu in float64."""
    w, b = unit.conv.weight.detach().double().numpy(), unit.conv.bias.detach().double().numpy()
    y = ref.conv2d(x.astype(np.float64), w, b, unit.conv.stride, unit.conv.padding)
    y = ref.affine(y, unit.norm.scale.double().numpy(), unit.norm.shift.double().numpy())
    if residual is not None:
        y = y + residual
    return np.maximum(y, 0) if (residual is not None or len(unit) > 2) else y


@pytest.mark.parametrize("cin,cout,k,s,relu", [(8, 16, 3, 1, True), (8, 16, 3, 2, False), (3, 8, 7, 2, True)])
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_unit_is_the_plain_ops_bit_for_bit_and_the_reference(cin, cout, k, s, relu, batch):
    unit = _unit(cin, cout, k, s, relu, seed=cin + k + batch)
    x = torch.randn(batch, cin, 19, 19).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused = unit(x)
        with onednn.disabled():
            plain = unit(x)
    assert torch.equal(fused, plain)
    np.testing.assert_allclose(fused.numpy(), _numpy_unit(unit, x.numpy()), rtol=0, atol=1e-5)


def test_residual_tail_is_one_op_equal_to_add_then_relu():
    unit = _unit(16, 16, 3, 1, relu=False, seed=7)
    h = torch.randn(4, 16, 11, 11).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 16, 11, 11).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused = unit.folded(h, residual=r)
        with onednn.disabled():
            plain = unit.folded(h, residual=r)
        three_ops = (unit(h) + r).relu_()
    assert torch.equal(fused, plain) and torch.equal(fused, three_ops)
    np.testing.assert_allclose(fused.numpy(), _numpy_unit(unit, h.numpy(), r.numpy()), rtol=0, atol=1e-5)


def test_weights_are_reordered_per_input_shape_and_only_the_last_few_kept():
    """A tensor packed for one batch size is correct but slow at another, so the unit keeps
    one per shape, bounded; an in-place weight edit drops them all."""
    unit = _unit(8, 8, 3, 1, relu=True, seed=1)
    xs = {n: torch.randn(n, 8, 9, 9).contiguous(memory_format=torch.channels_last) for n in (1, 2, 3, 4, 5)}
    with torch.inference_mode():
        first = {n: unit(x) for n, x in xs.items()}
        assert list(unit._packed) == [tuple(xs[n].shape) for n in (3, 4, 5)]
        assert all(torch.equal(unit(x), first[n]) for n, x in xs.items())
    with torch.no_grad():
        unit.norm.scale.mul_(2)
    with torch.inference_mode():
        assert not torch.equal(unit(xs[5]), first[5])
        assert list(unit._packed) == [tuple(xs[5].shape)]


def test_face_net_fused_path_equals_unfused_and_dlib(frozen, face_chips, dlib_descriptors):
    net = copy.deepcopy(frozen)
    for n in (1, 7, 40):              # one chip, one chunk, two chunks (cpu_chunk = 32)
        x = torch.from_numpy(face_chips[:n])
        with torch.inference_mode():
            fused = net(x)
            with onednn.disabled():
                plain = net(x)
        if n == 1:    # F.conv2d picks another oneDNN kernel for one image: float32 rounding apart
            assert (fused - plain).abs().max().item() <= 1e-6
        else:
            assert torch.equal(fused, plain), n
    with torch.inference_mode():
        got = net(torch.from_numpy(face_chips)).numpy()
    assert np.abs(got - dlib_descriptors).max() <= 1e-5


def test_a_used_net_still_deep_copies_and_saves(frozen, face_chips):
    """The caches hold oneDNN tensors, which cannot be pickled: they are not state."""
    x = torch.from_numpy(face_chips[:3])
    with torch.inference_mode():
        want = frozen(x)
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(loaded(x), want)
        assert torch.equal(copy.deepcopy(frozen)(x), want)
