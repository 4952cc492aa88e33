"""The torch modules against NumPy references of dlib's semantics (tests/dlib_reference.py),
block by block against a reference forward pass, and end to end against real dlib.

Tolerances: single ops are exact or within float32 rounding (stated per test); descriptors
within 1e-5 of dlib's per element (the issue's bar; dlib against itself across builds
differs by ~3e-7).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import dlib_reference as ref
import dlibbridge
from dlibbridge.errors import DlibbridgeError
from dlibbridge.port import arch

DESCRIPTOR_ATOL = 1e-5


@pytest.fixture(scope="module")
def face_model(face_model_path):
    return dlibbridge.load(face_model_path)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# ---------------------------------------------------------------------------------------
# single ops


def test_dlib_padding_rule():
    # k//2 at stride 1, zero at any other stride — not "same" padding.
    assert [arch.dlib_padding(k, 1) for k in (1, 3, 5, 7)] == [0, 1, 2, 3]
    assert [arch.dlib_padding(k, s) for k in (3, 7) for s in (2, 3)] == [0, 0, 0, 0]


def test_input_normalisation_matches_reference_in_every_layout():
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    want = ref.normalize_input(chips, arch.DLIB_RGB_MEAN)
    inp = arch.DlibInput()
    x = torch.from_numpy(chips)
    for variant in (x, x.permute(0, 3, 1, 2), x.float(), x.permute(0, 3, 1, 2).float().contiguous()):
        got = inp(variant)
        assert got.dtype == torch.float32 and got.shape == (2, 3, 150, 150)
        np.testing.assert_array_equal(_np(got), want)   # exact: subtract in float32, /256 exact
    np.testing.assert_array_equal(_np(inp(x[0])), want[:1])   # a single chip


@pytest.mark.parametrize("shape,says", [((2, 150, 151, 3), "got 150x151"), ((2, 149, 149, 3), "got 149x149"),
                                        ((2, 112, 112, 3), "got 112x112"), ((2, 150, 150, 4), "no axis of 3 channels"),
                                        ((2, 150, 150, 1), "no axis of 3 channels"), ((2, 1, 150, 150), "no axis of 3"),
                                        ((150, 150), "got shape (150, 150)"), ((1, 2, 3, 4, 5), "got shape")])
def test_input_rejects_wrong_shapes_saying_what_it_takes(shape, says):
    with pytest.raises(arch.InputSpecError, match="the network takes 150x150 RGB chips") as e:
        arch.DlibInput()(torch.zeros(shape, dtype=torch.uint8))
    assert says in str(e.value) and isinstance(e.value, DlibbridgeError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_input_refuses_a_float_batch_in_the_0_1_range(dtype):
    chips = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 150, 150, 3), dtype=np.uint8))
    unit = (chips.to(torch.float32) / 255).to(dtype)           # torchvision's ToTensor range
    net = arch.DlibInput()
    for x in (unit, unit.permute(0, 3, 1, 2), unit[0]):
        with pytest.raises(arch.InputSpecError, match="0-1 range.*multiply it by 255"):
            net(x)
    np.testing.assert_array_equal(_np(net(chips.to(dtype))), _np(net(chips)))    # the same pixels, 0-255


def test_dark_0_255_float_chips_are_taken_as_they_are():
    """Pixels from 8-bit images are whole numbers: a black or nearly black chip as float is
    not in the refused 0–1 range, and gives what its uint8 form gives."""
    net = arch.DlibInput()
    for chips in (torch.zeros(2, 150, 150, 3, dtype=torch.uint8),
                  torch.randint(0, 2, (2, 150, 150, 3), dtype=torch.uint8),
                  torch.randint(0, 8, (2, 150, 150, 3), dtype=torch.uint8)):
        np.testing.assert_array_equal(_np(net(chips.float())), _np(net(chips)))


def test_input_spec_states_what_the_network_takes(frozen):
    spec = frozen.input_spec
    assert spec["input_size"] == (3, 150, 150) and spec["channel_order"] == "RGB" and spec["range"] == (0, 255)
    assert spec["layouts"][:2] == ("NHWC", "NCHW") and "uint8" in spec["dtypes"]
    assert spec["mean"] == tuple(float(f"{m:.6g}") for m in np.float32(arch.DLIB_RGB_MEAN))
    assert spec["std"] == (256.0,) * 3
    assert arch.DlibInput(None).input_spec["input_size"] == (3, None, None)   # any size: the detectors


def test_half_precision_keeps_float32_means():
    inp = arch.DlibInput().half()
    assert inp.mean.dtype == torch.float32
    np.testing.assert_array_equal(inp.mean.reshape(-1).numpy(), np.float32(arch.DLIB_RGB_MEAN))


@pytest.mark.parametrize("a_shape,b_shape", [
    ((2, 256, 3, 3), (2, 128, 4, 4)),     # alevel1: main 3×3, shortcut 4×4 with half the channels
    ((2, 256, 1, 1), (2, 256, 2, 2)),     # alevel0: main 1×1, shortcut 2×2
    ((2, 64, 17, 17), (2, 32, 17, 17)),   # alevel3: channels only
    ((1, 3, 5, 2), (1, 4, 2, 6)),         # each operand larger in some dimension
    ((2, 8, 4, 4), (2, 8, 4, 4)),
])
def test_add_prev_zero_pads_at_the_end(a_shape, b_shape):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    got = arch.add_prev(torch.from_numpy(a), torch.from_numpy(b))
    # exact: every output is one float32 sum (or a copy), correctly rounded either way
    np.testing.assert_array_equal(got.numpy(), ref.add_prev(a, b).astype(np.float32))


def test_add_prev_would_be_wrong_if_aligned_bottom_right():
    """Guard against the tempting centre/bottom-right alignment: values differ."""
    a = torch.ones(1, 1, 3, 3)
    b = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = arch.add_prev(a, b)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 3, 3] == 15 and out[0, 0, 2, 2] == 11


@pytest.mark.parametrize("k,s,p,size", [(3, 2, 0, 72), (3, 2, 1, 72), (3, 2, 1, 35), (2, 2, 0, 35), (2, 2, 0, 3), (3, 1, 1, 6)])
def test_pools_match_dlib_clipped_windows(k, s, p, size):
    """Max: max over the window clipped to the image; avg: mean over the clipped window
    (count_include_pad=False); floor output size.  Stem builds its pool from the record's
    (k, s, p), so padded variants (the DenseNet's) are checked too."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, size, size)).astype(np.float32)
    stem = arch.Stem(4, arch.DlibAffine, pool=(k, s, p))
    got = stem.pool(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, ref.max_pool(x.astype(np.float64), (k, k), (s, s), (p, p)).astype(np.float32))
    avg = torch.nn.AvgPool2d(k, s, p, count_include_pad=False)  # the shortcut pool's settings
    want = ref.avg_pool(x.astype(np.float64), (k, k), (s, s), (p, p))
    np.testing.assert_allclose(avg(torch.from_numpy(x)).numpy(), want, rtol=0, atol=1e-6)


def test_down_block_shortcut_is_the_2x2_pool_of_dlib():
    blk = arch.ResDownBlock(128, 256, arch.DlibAffine)
    assert isinstance(blk.shortcut, torch.nn.AvgPool2d) and blk.shortcut.count_include_pad is False
    assert blk.branch1.conv.stride == (2, 2) and blk.branch1.conv.padding == (0, 0)
    assert blk.branch2.conv.stride == (1, 1) and blk.branch2.conv.padding == (1, 1)
    x = torch.randn(1, 128, 8, 8)
    assert blk(x).shape == (1, 256, 4, 4)   # main 3×3 + shortcut 4×4 → 4×4


def test_conv_matches_reference_with_dlib_padding():
    rng = np.random.default_rng(3)
    unit = arch.ConvNorm(5, 6, 3, 2, arch.DlibAffine, relu=False)
    x = rng.standard_normal((2, 5, 17, 17)).astype(np.float32)
    w, b = unit.conv.weight.detach().numpy(), unit.conv.bias.detach().numpy()
    with torch.no_grad():
        got = unit.conv(torch.from_numpy(x)).numpy()
    want = ref.conv2d(x.astype(np.float64), w, b, (2, 2), (0, 0))
    assert got.shape == want.shape == (2, 6, 8, 8)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_affine_matches_reference():
    rng = np.random.default_rng(4)
    m = arch.DlibAffine(6)
    m.scale.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
    m.shift.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
    x = rng.standard_normal((3, 6, 5, 5)).astype(np.float32)
    want = ref.affine(x.astype(np.float64), m.scale.numpy(), m.shift.numpy())
    np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), want, rtol=1e-6, atol=1e-6)
    assert list(m.parameters()) == []   # frozen: nothing for an optimiser to move


def _random_bn(c: int, window: int, seed: int) -> arch.DlibBatchNorm2d:
    rng = np.random.default_rng(seed)
    bn = arch.DlibBatchNorm2d(c, eps=1e-4, window=window)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
        bn.bias.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
    return bn


def test_batchnorm_inference_matches_reference():
    bn = _random_bn(5, 100, 5).eval()
    x = np.random.default_rng(6).standard_normal((4, 5, 3, 3)).astype(np.float32)
    want = ref.bn_inference(x.astype(np.float64), bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                            bn.running_mean.numpy(), bn.running_var.numpy(), 1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(bn(torch.from_numpy(x)).numpy(), want, rtol=1e-6, atol=1e-6)


def test_batchnorm_training_follows_dlib_running_average_schedule():
    """Batch stats normalise; running stats move by 1/(n+1) towards μ_B and the unbiased
    σ²_B, n capped at the window — cumulative while filling, then 1/(window+1)."""
    window = 3
    bn = _random_bn(4, window, 7).train()
    rng = np.random.default_rng(8)
    rm, rv = bn.running_mean.numpy().astype(np.float64), bn.running_var.numpy().astype(np.float64)
    n = 0
    for step in range(6):
        x = (rng.standard_normal((3, 4, 5, 5)) * (step + 1) + step).astype(np.float32)
        y_want, rm, rv, n = ref.bn_train(x.astype(np.float64), bn.weight.detach().numpy(),
                                         bn.bias.detach().numpy(), rm, rv, 1e-4, n, window)
        y = bn(torch.from_numpy(x))
        np.testing.assert_allclose(y.detach().numpy(), y_want, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == n == min(step + 1, window)


def test_batchnorm_single_sample_uses_running_stats_even_in_train_mode():
    bn = _random_bn(4, 100, 9).train()
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(1, 4, 3, 3)
    y = bn(x)
    with torch.no_grad():
        np.testing.assert_array_equal(y.detach().numpy(), bn.eval()(x).numpy())
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_batchnorm_eps_and_window_travel_in_state_dict():
    bn = arch.DlibBatchNorm2d(3, eps=2.5e-3, window=17)
    other = arch.DlibBatchNorm2d(3)
    other.load_state_dict(bn.state_dict())
    assert (other.eps, other.window) == (2.5e-3, 17)


# ---------------------------------------------------------------------------------------
# whole network


def test_network_shapes_and_flops(frozen):
    x = torch.zeros(2, 150, 150, 3, dtype=torch.uint8)
    inter = frozen.forward_intermediates(x)
    shapes = {k: tuple(v.shape[1:]) for k, v in inter.items()}
    assert shapes["stem"] == (32, 35, 35)
    assert shapes["level3.0"] == (64, 17, 17) and shapes["level2.0"] == (128, 8, 8)
    assert shapes["level1.0"] == (256, 4, 4) and shapes["level0.0"] == (256, 2, 2)
    assert shapes["fc"] == (128,)
    assert abs(arch.gflops_per_face(frozen) - 0.5417) < 1e-3     # the 0.54 GFLOP


def test_blocks_match_reference_forward(frozen, face_model, johns_chips, photo_chips):
    """Every block's output against the NumPy reference run straight from the dlib records
    (float64).  A failure names the block and its dlib layer.  Bound: 5e-6 relative to
    the block's largest activation (float32 accumulation over up to 2304-term sums)."""
    chips = np.stack([johns_chips[2][0], photo_chips[1][0]])
    want_out, want = ref.forward(face_model, chips)
    got = frozen.forward_intermediates(torch.from_numpy(chips))
    names = ["stem"] + [k for k in got if k.startswith("level")] + ["pool"]
    assert [w[0] for w in want] == ["stem"] + [f"block{i}" for i in range(len(names) - 2)] + ["pool"]
    worst = []
    for name, (_, path, w) in zip(names, want):
        g = _np(got[name])
        err = np.abs(g - w).max() / np.abs(w).max()
        worst.append(err)
        assert err <= 5e-6, f"{name} (dlib {path}): relative error {err:.3g}"
    assert np.abs(_np(got["fc"]) - want_out).max() <= DESCRIPTOR_ATOL
    assert max(worst) > 0  # the comparison really ran in different arithmetic


def _pairwise_same(d: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    dist = np.linalg.norm(d[:, None, :] - d[None, :, :], axis=-1)
    return dist < threshold


@pytest.mark.parametrize("form", ["frozen", "trainable"])
def test_descriptors_match_dlib(form, request, face_chips, dlib_descriptors):
    """All johns + photo chips: max |Δ| ≤ 1e-5 per element vs dlib, same decisions at 0.6."""
    net = request.getfixturevalue(form)
    with torch.inference_mode():
        got = net(torch.from_numpy(face_chips)).numpy().astype(np.float64)
    diff = np.abs(got - dlib_descriptors).max()
    print(f"{form}: {len(face_chips)} chips, max |Δ| vs dlib = {diff:.3g}")
    assert diff <= DESCRIPTOR_ATOL
    np.testing.assert_array_equal(_pairwise_same(got), _pairwise_same(dlib_descriptors))


def test_batch_composition_and_cpu_chunking_do_not_change_results(frozen, trainable, face_chips):
    """Eval: no cross-sample coupling, so chunked CPU inference (batches above ``cpu_chunk``),
    whole batches and single chips agree.  Train mode: batch statistics always span the
    whole batch (no chunking), so running stats match an unchunked module exactly."""
    x = torch.from_numpy(face_chips[:5])
    with torch.inference_mode():
        frozen.cpu_chunk = 2
        chunked = frozen(x)
        frozen.cpu_chunk = 1000
        whole = frozen(x)
        del frozen.cpu_chunk                 # back to the class default
        one = torch.cat([frozen(x[i:i + 1]) for i in range(5)])
    assert (chunked - whole).abs().max().item() <= 1e-6
    assert (one - whole).abs().max().item() <= 1e-6
    for only_norms in (False, True):      # the whole module in train(), or just its norms
        a, b = copy.deepcopy(trainable), copy.deepcopy(trainable)
        for m in (a, b):
            for sub in (m.modules() if only_norms else [m]):
                if isinstance(sub, arch.DlibBatchNorm2d) or not only_norms:
                    sub.train()
        a.cpu_chunk = 2
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        assert torch.equal(a.level0[0].branch2.norm.running_var, b.level0[0].branch2.norm.running_var)


def test_folded_inference_follows_weight_edits_and_matches_the_layered_path(frozen, johns_chips):
    """Inference folds each affine into its convolution and caches the result: an in-place
    edit of a scale must reach the next call, and the folded output must stay the layered
    (autograd) one up to rounding."""
    net = copy.deepcopy(frozen)
    x = torch.from_numpy(johns_chips[2][:4])
    with torch.inference_mode():
        before = net(x)
    with torch.no_grad():
        net.level2[0].branch1.norm.scale.mul_(1.5)
    with torch.inference_mode():
        folded = net(x)
    layered = net(x).detach()                     # autograd on: conv, then the affine pass
    assert (folded - before).abs().max() > 1e-3
    assert (folded - layered).abs().max() <= 1e-6
