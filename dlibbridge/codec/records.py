"""dlib's normalisation records and their arithmetic, exactly as dlib does it (numpy only).

One definition of each record dlibbridge writes by hand and of the bn ⇄ affine algebra, shared
by :mod:`dlibbridge.codec.rewrite` (record → record) and :mod:`dlibbridge.port.convert` (torch
module → record): a model exported from torch and a file frozen with ``dlibbridge freeze``
carry bit-identical affine parameters.
"""
from __future__ import annotations

import numpy as np

from .tree import Details
from ..errors import DlibbridgeError

DLIB_RGB_MEAN = (122.782, 117.001, 104.298)   # input_rgb_image's per-channel means
DLIB_BN_EPS = 1e-4           # DEFAULT_BATCH_NORM_EPS
DLIB_BN_WINDOW = 100         # default running_stats_window_size

CONV_MODE, FC_MODE = 0, 1
_BN_VERSION = {CONV_MODE: "bn_con2", FC_MODE: "bn_fc2"}
_BN_MODE = {v: k for k, v in _BN_VERSION.items()}


class BatchNormError(DlibbridgeError, ValueError):
    """A record or file that cannot be (un)frozen; the message names the dlib layer."""



def fold(gamma, beta, running_mean, running_var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """dlib's bn_ → affine_ conversion (``affine_(const bn_&)`` in dlib/dnn/layers.h), bit for
    bit: ``g = gamma / sqrt(var + eps)``, ``b = beta − g·mean``, all in float32 — dlib's
    matrix expression casts eps to float before the sum.  (dlib's bn *inference* instead
    takes ``1/sqrt(double(var) + eps)`` in double, as dlib-format.md §6.7 describes; the two
    differ in the last bit for real statistics, and only this one reproduces what an
    affine-typed dlib network loads: tests/test_codec_rewrite.py checks it against dlib.)"""
    f32 = np.float32
    gamma, beta = np.asarray(gamma, f32), np.asarray(beta, f32)
    rm, rv = np.asarray(running_mean, f32), np.asarray(running_var, f32)
    g = gamma / np.sqrt(rv + f32(eps))
    return g, beta - g * rm


def affine_as_bn_variance(eps: float = DLIB_BN_EPS) -> np.float32:
    """The running variance that makes a batch-norm compute exactly an affine:
    float32(1 − eps), so that 1/sqrt(var + eps) is exactly 1.0f in dlib's inference (double
    sum) and in its bn→affine conversion (float sum) alike (dlib-format.md §6.7; folding
    1 + eps into gamma instead costs 3e-7)."""
    return np.float32(1.0 - eps)


def _gamma_beta(path: str, d: Details) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    shape = tuple(int(v) for v in d["gamma"])
    n = int(np.prod(shape))
    flat = d["params"].reshape(-1)
    if n == 0 or flat.size != 2 * n or tuple(d["beta"]) != shape:
        raise BatchNormError(f"{path} {d.version}: params holds {flat.size} floats for gamma/beta "
                             f"aliases {tuple(d['gamma'])}/{tuple(d['beta'])}")
    return flat[:n].copy(), flat[n:].copy(), shape


def _stat_shape(mode: int, gamma_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """bn_ keeps running statistics per channel in CONV_MODE and per element in FC_MODE."""
    return (1, gamma_shape[1], 1, 1) if mode == CONV_MODE else (1, *gamma_shape[1:])


def affine_to_bn(d: Details, path: str = "") -> Details:
    """``affine_``/``affine_2`` → the bn record (``bn_con2``, or ``bn_fc2`` in FC mode) whose
    inference output is bit-identical (dlib-format.md §6.7): gamma = g, beta = b,
    running mean 0, running variance float32(1 − eps), eps 1e-4, ``means``/``invstds``
    zeros/ones shaped like the statistics (never empty: num_updates > 0 would make dlib's
    first training batch abort), num_updates = window = 100, bn's default multipliers."""
    if d.layer_type != "affine":
        raise BatchNormError(f"{path} {d.version}: not an affine record")
    if d.get("disabled", False):
        raise BatchNormError(f"{path} {d.version}: a disabled affine (identity, no parameters) has no "
                             f"batch-norm counterpart")
    mode = int(d["mode"])
    if mode not in _BN_VERSION:
        raise BatchNormError(f"{path} {d.version}: unknown mode {mode}")
    g, b, shape = _gamma_beta(path, d)
    stat = _stat_shape(mode, shape)
    return bn_record(_BN_VERSION[mode], g, b, shape, means=np.zeros(stat), invstds=np.ones(stat),
                     running_means=np.zeros(stat), running_variances=np.full(stat, affine_as_bn_variance()))


def bn_to_affine(d: Details, path: str = "") -> Details:
    """``bn_con2``/``bn_fc2`` → the ``affine_`` record (the form the face model ships), with
    dlib's conversion (:func:`fold`).  Running statistics and eps are dropped, as dlib does."""
    if d.version not in _BN_MODE:
        raise BatchNormError(f"{path} {d.version}: not a bn_con2/bn_fc2 record")
    mode = _BN_MODE[d.version]
    gamma, beta, shape = _gamma_beta(path, d)
    stat = _stat_shape(mode, shape)
    rm, rv = d["running_means"], d["running_variances"]
    if tuple(rm.shape) != stat or tuple(rv.shape) != stat:
        raise BatchNormError(f"{path} {d.version}: running statistics shaped {tuple(rm.shape)}/"
                             f"{tuple(rv.shape)}, expected {stat} (a never-trained layer?)")
    g, b = fold(gamma.reshape(stat), beta.reshape(stat), rm, rv, d["eps"])
    return affine_record(g, b, shape, mode)


# ---------------------------------------------------------------------------------------
# Records dlibbridge builds from numbers (their field order is the C++ schema's, which
# Details.build checks when the tree is written)

#: bn_'s default learning-rate and weight-decay multipliers (dlib/dnn/layers.h).
BN_MULTIPLIERS = (("learning_rate_multiplier", 1.0), ("weight_decay_multiplier", 0.0),
                  ("bias_learning_rate_multiplier", 1.0), ("bias_weight_decay_multiplier", 1.0))


def bn_record(version: str, gamma, beta, shape: tuple[int, ...], *, means, invstds, running_means, running_variances,
              num_updates: int = DLIB_BN_WINDOW, window: int = DLIB_BN_WINDOW, eps: float = DLIB_BN_EPS,
              multipliers: dict | None = None) -> Details:
    """A ``bn_con2``/``bn_fc2`` record: gamma/beta (aliases shaped ``shape``, flattened into
    ``params``), dlib's last-batch ``means``/``invstds`` (never empty when
    ``num_updates`` > 0, or dlib's first training batch aborts, dlib-format.md §4.3), the
    running statistics, and the multipliers (bn's defaults unless given)."""
    gamma, beta = np.asarray(gamma, np.float32).reshape(-1), np.asarray(beta, np.float32).reshape(-1)
    stat = tuple(np.shape(running_means))
    f32 = lambda v: np.asarray(v, np.float32).reshape(stat)  # noqa: E731
    mult = dict(BN_MULTIPLIERS, **(multipliers or {}))
    return Details.build(
        version, ("params", "tensor", np.concatenate([gamma, beta]).reshape(-1, 1, 1, 1)),
        ("gamma", "alias", shape), ("beta", "alias", shape),
        ("means", "tensor", f32(means)), ("invstds", "tensor", f32(invstds)),
        ("running_means", "tensor", f32(running_means)), ("running_variances", "tensor", f32(running_variances)),
        ("num_updates", "uint", num_updates), ("running_stats_window_size", "uint", window),
        *((name, "f64", float(mult[name])) for name, _ in BN_MULTIPLIERS),
        ("eps", "f64", eps))


def affine_record(g, b, shape: tuple[int, ...], mode: int = CONV_MODE) -> Details:
    """An ``affine_`` record (the deployed form of the face model): ``params`` = g then b."""
    params = np.concatenate([np.asarray(g, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1)])
    return Details.build("affine_", ("params", "tensor", params.reshape(-1, 1, 1, 1)), ("gamma", "alias", shape),
                         ("beta", "alias", shape), ("mode", "int", mode))


def input_rgb_image_sized(rows: int, cols: int, mean=DLIB_RGB_MEAN) -> Details:
    """dlib's ``input_rgb_image_sized<rows, cols>`` with per-channel means (R, G, B)."""
    r, g, b = (float(v) for v in mean)
    return Details.build("input_rgb_image_sized", ("avg_red", "f32", r), ("avg_green", "f32", g),
                         ("avg_blue", "f32", b), ("nr", "uint", rows), ("nc", "uint", cols))


def loss_metric_2(margin: float = 0.04, dist_thresh: float = 0.6) -> Details:
    """dlib's ``loss_metric_`` with its defaults (the face model's loss)."""
    return Details.build("loss_metric_2", ("margin", "f32", margin), ("dist_thresh", "f32", dist_thresh))
