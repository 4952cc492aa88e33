"""Batch-norm ⇄ affine arithmetic, exactly as dlib does it (no torch, no file I/O).

Shared by :mod:`dlibbridge.convert` (torch module → record) and :mod:`dlibbridge.batchnorm`
(record → record): one definition, so a model exported from torch and a file frozen with
``dlibbridge freeze`` carry bit-identical affine parameters.
"""
from __future__ import annotations

import numpy as np

DLIB_BN_EPS = 1e-4  # DEFAULT_BATCH_NORM_EPS


def fold(gamma, beta, running_mean, running_var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """dlib's bn_ → affine_ conversion (``affine_(const bn_&)`` in dlib/dnn/layers.h), bit for
    bit: ``g = gamma / sqrt(var + eps)``, ``b = beta − g·mean``, all in float32 — dlib's
    matrix expression casts eps to float before the sum.  (dlib's bn *inference* instead
    takes ``1/sqrt(double(var) + eps)`` in double, as dlib-format.md §6.7 describes; the two
    differ in the last bit for real statistics, and only this one reproduces what an
    affine-typed dlib network loads: tests/test_unfreeze.py checks it against dlib.)"""
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
