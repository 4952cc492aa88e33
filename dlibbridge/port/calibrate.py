"""Calibrated unfreeze: re-seed the batch-norm statistics of an unfrozen face ResNet on real chips.

The deployed file no longer holds the statistics its affine records folded away, and dlib's
batch-norm has no eval mode: a training batch is normalised with its own statistics.
:func:`calibrate` measures each layer's input mean/variance on the user's aligned chips through
the torch port and re-seeds ``running_means``/``running_variances``/``gamma``/``beta`` so the
inference transform is unchanged while a training batch is normalised back to (almost) the
deployed function.  The record rewriting itself is :mod:`dlibbridge.codec.rewrite`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._dlib import face_descriptors
from .._io import replace_verified
from ..codec import tree as fmt
from ..codec.records import _gamma_beta, bn_to_affine, fold
from ..codec.rewrite import (BatchNormError, Conversion, _check_chips, _check_paths, _check_same_elsewhere,
                             _norm_entries)
from ..codec.rewrite import unfreeze as unfreeze_records
from ..codec.tree import Model
from ..data.images import CHIP_SHAPE
from .arch import DlibBatchNorm2d
from .infer import in_batches, torch_forward
from .convert import affine_layers, to_torch


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did and how close the result is (descriptor units).

    ``train_before``/``train_after``: (mean, max) |Δ| between training-mode descriptors
    (``report_chips`` chips in random batches of ``batch_size``, dlib's batch-statistics
    normalisation) and the inference descriptors, before and after calibration.
    ``inference_max``: max |Δ| of the inference descriptors after vs before (float
    rounding, ~2e-7)."""

    chips: int
    batch_size: int
    report_chips: int
    layers: int
    train_before: tuple[float, float]
    train_after: tuple[float, float]
    inference_max: float

    def lines(self) -> list[str]:
        where = f"{self.report_chips} chips in batches of {self.batch_size}"
        return [f"calibrated {self.layers} batch-norm layers on {self.chips} chips",
                f"training-mode deviation from inference ({where}): before mean {self.train_before[0]:.4f} "
                f"max {self.train_before[1]:.4f}; after mean {self.train_after[0]:.4f} max {self.train_after[1]:.4f}",
                f"inference change: max {self.inference_max:.2e}"]


# ---------------------------------------------------------------------------------------
# Calibration (torch port)


def _unwrap(module):
    for attr in ("module", "_orig_mod"):       # DistributedDataParallel, torch.compile
        while hasattr(module, attr) and not hasattr(module, "dlib_source"):
            module = getattr(module, attr)
    return module


def _norm_modules(module):
    """(FaceResNet, [(module name, dlib layer path, DlibBatchNorm2d), …] in forward order)."""
    module = _unwrap(module)
    out = []
    for name, path in affine_layers(module):
        m = module.get_submodule(name)
        if not isinstance(m, DlibBatchNorm2d):
            raise BatchNormError(f"{name} ({path}) is a frozen affine: calibrate needs the trainable "
                                 f"form (convert.to_torch(..., trainable=True))")
        out.append((name, path, m))
    return module, out


@contextlib.contextmanager
def _batch_statistics(norms: Sequence[DlibBatchNorm2d]):
    """Run ``norms`` as dlib runs a batch of more than one sample (batch statistics) and
    put their running statistics back afterwards: measuring must not train."""
    saved = [(m.training, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    try:
        for m in norms:
            m.train()
        yield
    finally:
        for m, (training, rm, rv, n) in zip(norms, saved):
            m.train(training)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(n)


def _descriptors(module, chips: np.ndarray, batch_size: int, device, bar, train_norms: Sequence = ()) -> np.ndarray:
    """Descriptors (float64) of ``chips`` in batches of ``batch_size``; ``train_norms`` use
    batch statistics, every other norm its running statistics."""
    with _batch_statistics(train_norms):
        return in_batches(torch_forward(module, device), chips, batch_size, bar=bar).astype(np.float64)


@torch.inference_mode()
def _input_statistics(module, norms: Sequence[DlibBatchNorm2d], chips: np.ndarray, batch_size: int,
                      device, bar) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and biased variance (accumulated in float64 over N·H·W values) of
    each norm's input, in one inference pass over ``chips``."""
    acc = [[0, 0.0, 0.0] for _ in norms]

    def hook(i):
        def pre(_mod, args):
            x = args[0].double()
            xs = x.transpose(0, 1).reshape(x.shape[1], -1)
            acc[i][0] += xs.shape[1]
            acc[i][1] = acc[i][1] + xs.sum(1)
            acc[i][2] = acc[i][2] + (xs * xs).sum(1)
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(norms)]
    try:
        in_batches(torch_forward(module, device), chips, batch_size, bar=bar)
    finally:
        for h in handles:
            h.remove()
    out = []
    for n, s, s2 in acc:
        mean = (s / n).cpu().numpy()
        out.append((mean, np.maximum((s2 / n).cpu().numpy() - mean * mean, 0.0)))
    return out


def _deviation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a - b)
    return float(d.mean()), float(d.max())


def calibrate(module, chips: np.ndarray, *, batch_size: int = 25, report_max: int = 500, seed: int = 0,
              device=None, progress: bool = False) -> CalibrationReport:
    """Re-seed every batch-norm of a trainable FaceResNet (in place) from ``chips``
    (uint8 RGB, N×150×150×3) without changing its inference function.

    For each layer, with its input's per-channel mean μ and biased variance σ² over all the
    chips (one inference pass), and the layer's current inference transform ``y = g·x + b``
    (dlib's fold of gamma, beta and running stats): running_mean = μ, running_var = σ²,
    gamma = g·sqrt(σ² + eps), beta = b + g·μ (dlib-format.md §6.7, end).  A training batch
    whose statistics equal μ, σ² is then normalised to exactly the deployed output, so the
    remaining training-mode deviation is the batch's sampling noise.

    Layer-by-layer (sequential) calibration, each layer measured with the earlier ones on
    batch statistics, was measured too and gives the same result to 1e-7 on the johns (a
    calibrated layer passes its input's batch on unchanged when the batch is the
    calibration set), so the single pass is used.

    The report measures the training-mode deviation on random batches of ``batch_size``
    (dlib's example trains on 5×5) drawn from at most ``report_max`` of the chips.
    """
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[1:] != CHIP_SHAPE or chips.dtype != np.uint8:
        raise BatchNormError(f"calibration chips must be uint8 N×150×150×3, got {chips.dtype} {chips.shape}")
    if len(chips) < 2:
        raise BatchNormError("calibration needs at least 2 chips (the statistics of one sample are degenerate)")
    if batch_size < 2:
        raise BatchNormError("batch_size must be at least 2 (dlib uses running statistics for one sample)")
    module, named = _norm_modules(module)
    norms = [m for _, _, m in named]
    device = torch.device(device) if device is not None else next(module.parameters()).device
    rng = np.random.default_rng(seed)
    bs = min(batch_size, len(chips))
    n_report = max(bs, min(report_max, len(chips)) // bs * bs)    # whole batches only
    sample = chips[rng.permutation(len(chips))[:n_report]]
    was_training = module.training
    module.eval()
    from .._progress import progress_bar
    # The bar counts forward passes of one chip: the statistics pass over every chip plus the
    # before/after deviation checks (4 passes over the report sample).
    with progress_bar(total=len(chips) + 4 * len(sample), desc=f"calibrating on {len(chips)} chips",
                      unit=" chip passes", enabled=progress) as bar:
        try:
            infer0 = _descriptors(module, sample, bs, device, bar)
            train0 = _descriptors(module, sample, bs, device, bar, norms)
            stats = _input_statistics(module, norms, chips, 64, device, bar)
            for m, (mean, var) in zip(norms, stats):
                _reseed(m, *_inference_transform(m), mean, var)
            infer1 = _descriptors(module, sample, bs, device, bar)
            train1 = _descriptors(module, sample, bs, device, bar, norms)
        finally:
            module.train(was_training)
    return CalibrationReport(len(chips), bs, len(sample), len(norms), _deviation(train0, infer0),
                             _deviation(train1, infer1), float(np.abs(infer1 - infer0).max()))


def _inference_transform(m: DlibBatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    as_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    return fold(as_np(m.weight), as_np(m.bias), as_np(m.running_mean), as_np(m.running_var), m.eps)


def _reseed(m: DlibBatchNorm2d, g: np.ndarray, b: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    f32, f64 = np.float32, np.float64
    rm, rv = mean.astype(f32), var.astype(f32)
    std = np.sqrt(rv + f32(m.eps))          # the denominator dlib's fold will divide gamma by
    gamma = (g.astype(f64) * std).astype(f32)
    beta = (b.astype(f64) + g.astype(f64) * rm.astype(f64)).astype(f32)
    with torch.no_grad():
        for t, v in ((m.running_mean, rm), (m.running_var, rv), (m.weight, gamma), (m.bias, beta)):
            t.copy_(torch.from_numpy(v).to(t.device, t.dtype))


def _write_statistics(module, model: Model) -> None:
    """Copy the calibrated gamma/beta/running statistics of ``module`` into the bn records
    of ``model`` (the tree the module was built from); nothing else changes."""
    entries = {e.path: e for e in model.layers()}
    _, named = _norm_modules(module)
    as_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    for _, path, m in named:
        d = entries[path].details
        c = m.num_features
        d["params"] = np.concatenate([as_np(m.weight), as_np(m.bias)]).reshape(2 * c, 1, 1, 1)
        d["running_means"] = as_np(m.running_mean).reshape(1, c, 1, 1)
        d["running_variances"] = as_np(m.running_var).reshape(1, c, 1, 1)


# ---------------------------------------------------------------------------------------
# Calibration data


def load_chips(path: str | os.PathLike, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Aligned 150×150 chips for calibration: a chip store (``dlibbridge pack``) or a folder
    of chip images (``dlibbridge align`` output or any tree of 150×150 images).  At most
    ``limit`` chips, a seeded random subset.  Returns (chips, unreadable files skipped)."""
    from ..data.store import ChipStore, NotAChipError, StoreError, chip_entries, read_chips

    root = Path(path)
    if not root.exists():
        raise BatchNormError(f"calibration folder {root} does not exist")
    if not root.is_dir():
        raise BatchNormError(f"{root} is a file, not a folder of aligned chips")
    rng = np.random.default_rng(seed)
    try:
        store = ChipStore(root)
    except StoreError:
        store = None
    if store is not None:
        idx = np.arange(len(store))
        if limit is not None and len(idx) > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        return np.asarray(store.chips[idx]), []
    entries = chip_entries(root)
    if limit is not None and len(entries) > limit:
        entries = [entries[i] for i in np.sort(rng.choice(len(entries), limit, replace=False))]
    try:
        read, skipped = read_chips(root, entries)
    except NotAChipError as err:
        raise BatchNormError(str(err)) from None
    chips = [rgb for _, rgb in read]
    if len(chips) < 2:
        raise BatchNormError(f"{root}: found {len(chips)} readable chips, calibration needs at least 2")
    return np.stack(chips), skipped

# ---------------------------------------------------------------------------------------
# Calibrated unfreeze of models and files


def unfreeze(model: Model, calibration: np.ndarray | None = None, *, batch_size: int = 25,
             device=None, progress: bool = False) -> Conversion:
    """Rewrite every affine record of ``model`` (in place) as its trainable bn record.

    ``calibration``: uint8 RGB chips (N,150,150,3) — re-seed the statistics with
    :func:`calibrate` (face ResNet only).  Without it the result is §6.7's exact form."""
    out = unfreeze_records(model)
    if calibration is not None:
        module = to_torch(model, trainable=True)
        out.calibration = calibrate(module, calibration, batch_size=batch_size, device=device, progress=progress)
        _write_statistics(module, model)
    return out


def unfreeze_file(src: str | os.PathLike, out: str | os.PathLike, calibrate_dir: str | os.PathLike | None = None,
                  *, max_chips: int | None = 1000, batch_size: int = 25, progress: bool = False) -> list[str]:
    """``dlibbridge unfreeze``: read ``src``, unfreeze (calibrated on the chips in
    ``calibrate_dir`` when given), write ``out`` atomically after verifying it: re-read, every
    other record and wrapper field unchanged, each bn record folds back to its affine (bit for
    bit uncalibrated), and Python dlib gives the original descriptors.  Returns summary lines."""
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    original = fmt.load(src)
    model = fmt.load(src)
    chips, skipped = load_chips(calibrate_dir, limit=max_chips) if calibrate_dir is not None else (None, [])
    conv = unfreeze(model, chips, batch_size=batch_size, progress=progress)
    lines = [f"{src} -> {out}", f"converted {len(conv.converted)} affine records to "
             f"{', '.join(sorted({e.details.version for e in _norm_entries(model, 'bn')}))}"]
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable calibration files: " + "; ".join(skipped[:5])
                     + (" …" if len(skipped) > 5 else ""))
    if conv.calibration is not None:
        lines += conv.calibration.lines()
    before = {e.path: e.details for e in original.layers()}

    def verify(tmp: Path) -> list[str]:
        written = fmt.load(tmp)
        _check_same_elsewhere(original, written, set(conv.converted))
        worst = 0.0
        for e in _norm_entries(written, "bn"):
            g, b = _gamma_beta(e.path, bn_to_affine(e.details, e.path))[:2]
            g0, b0 = _gamma_beta(e.path, before[e.path])[:2]
            worst = max(worst, float(np.abs(np.concatenate([g - g0, b - b0])).max()))
        if conv.calibration is None and worst != 0.0:
            raise BatchNormError(f"verification failed: a bn record folds back to its affine with error {worst:g}")
        check = _check_chips(chips)
        want, got = face_descriptors(src, check), face_descriptors(tmp, check)
        if got is None:
            dlib_line = "python dlib check skipped (not a face recognition network)"
        else:
            diff = float(np.abs(got - want).max())
            tol = 0.0 if conv.calibration is None else 1e-6
            if not diff <= tol:
                raise BatchNormError(f"verification failed: python dlib's descriptors moved by {diff:.3g} (> {tol})")
            dlib_line = f"python dlib descriptors vs original: max |Δ| {diff:.2e} on {len(check)} chips"
        return [f"verified: re-read, {len(before) - len(conv.converted)} other layers unchanged, "
                f"bn→affine fold max |Δ| {worst:.2e}", dlib_line]

    return lines + replace_verified(out, fmt.dumps(model), verify)


__all__ = ["CalibrationReport", "calibrate", "load_chips", "unfreeze", "unfreeze_file"]
