"""Unfreeze and freeze: dlib's deployed ``affine_`` ⇄ trainable batch-norm (``bn_con2``/``bn_fc2``).

Why: dlib's training network (``net_type`` with ``bn_con``) refuses the deployed face model
(``Unexpected version 'affine_' found while deserializing dlib::bn_``) and dlib has no
affine → bn conversion.  :func:`unfreeze` writes one, :func:`freeze` is dlib's own bn → affine
conversion so a network trained by ``dnn_trainer`` deploys to ``face_recognition_model_v1``.
Both rewrite only the normalisation records; every other record and every wrapper field
stays as it was, so the rest of the file is byte-identical.

Uncalibrated unfreeze (dlib-format.md §6.7) is exact in inference but not in training:
dlib's batch-norm has no eval mode, any batch of more than one sample is normalised with its
own statistics, and the deployed file no longer holds the statistics the affine folded away.
:func:`~dlibbridge.port.calibrate.calibrate` measures each layer's input mean/variance on the user's aligned chips and
re-seeds ``running_means``/``running_variances``/``gamma``/``beta`` so that the inference
transform is unchanged while a training batch is normalised back to (almost) the deployed
function.  It works on the torch port, so it lives in :mod:`dlibbridge.port.calibrate`; this
module is pure record algebra and never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._dlib import face_descriptors
from ..assets import resolve_model
from .._io import replace_verified
from .._paths import resolved
from .._writable import check_output_file
from . import tree as fmt
from .records import _BN_MODE, BatchNormError, affine_to_bn, bn_to_affine
from .tree import Model, is_dlib_file

# ---------------------------------------------------------------------------------------
# Whole trees


@dataclass
class Conversion:
    """Result of :func:`unfreeze` / :func:`freeze`: the rewritten tree and the dlib layer
    paths whose records were converted."""

    model: Model
    converted: list[str] = field(default_factory=list)
    calibration: object | None = None   # port.calibrate.CalibrationReport, when calibrated


def _norm_entries(model: Model, kind: str):
    for e in model.layers():
        d = e.details
        if d is not None and (d.layer_type == "affine" if kind == "affine" else d.version in _BN_MODE):
            yield e


def unfreeze(model: Model) -> Conversion:
    """Rewrite every affine record of ``model`` (in place) as its trainable bn record, §6.7's
    exact form.  :func:`dlibbridge.port.calibrate.unfreeze` also re-seeds the statistics."""
    return _rewrite_norms(model, "affine", affine_to_bn, "no affine_ records to unfreeze (already trainable?)")


def freeze(model: Model) -> Conversion:
    """Rewrite every ``bn_con2``/``bn_fc2`` record of ``model`` (in place) as ``affine_``,
    exactly as dlib converts them when an affine-typed network loads a bn file."""
    return _rewrite_norms(model, "bn", bn_to_affine, "no bn_con2/bn_fc2 records to freeze (already deployed?)")


def _rewrite_norms(model: Model, kind: str, convert, nothing: str) -> Conversion:
    converted = []
    for e in _norm_entries(model, kind):
        e.node.details = convert(e.details, e.path)
        converted.append(e.path)
    if not converted:
        raise BatchNormError(nothing)
    return Conversion(model, converted)


# ---------------------------------------------------------------------------------------
# Verified file rewrites


def _check_same_elsewhere(a: Model, b: Model, converted: set[str]) -> None:
    """Every wrapper field and every record of ``b`` outside ``converted`` equals ``a``'s."""
    la, lb = a.layers(), b.layers()
    if len(la) != len(lb):
        raise BatchNormError(f"verification failed: {len(lb)} layers written, {len(la)} expected")
    for ea, eb in zip(la, lb):
        if type(ea.node) is not type(eb.node) or ea.path != eb.path:
            raise BatchNormError(f"verification failed at {ea.path}: structure differs")
        for f in ("version", "setup_called", "gradient_input_is_stale", "output_disabled", "input",
                  "sample_expansion_factor"):
            if getattr(ea.node, f, None) != getattr(eb.node, f, None):
                raise BatchNormError(f"verification failed at {ea.path}: wrapper field {f} differs")
        if ea.path not in converted and ea.details != eb.details:
            raise BatchNormError(f"verification failed at {ea.path}: {ea.details.version} record changed")
    if a.loss != b.loss or len(a.trailers) != len(b.trailers):
        raise BatchNormError("verification failed: loss record or trailing objects differ")


def _check_chips(calibration: np.ndarray | None, n: int = 4) -> np.ndarray:
    """The chips a rewritten file is checked on: the first calibration chips, else seeded
    random uint8 RGB chips (N,150,150,3)."""
    if calibration is not None:
        return np.asarray(calibration[:n])
    return np.random.default_rng(0).integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)


def _check_paths(src: Path, out: Path) -> None:
    resolve_model(src)                  # a directory: the message every command gives
    if not src.is_file():
        raise BatchNormError(f"{src}: no such file")
    if out.exists() and os.path.samefile(src, out) or resolved(out, "-o") == resolved(src, "input"):
        raise BatchNormError(f"refusing to write over the input {src}; choose another -o")
    check_output_file(out, "-o", src.stat().st_size, kind="a dlib DNN file", is_kind=is_dlib_file)


def freeze_file(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """``dlibbridge freeze``: bn records → affine_ as dlib converts them; verified by
    re-reading, and (face ResNet) by Python dlib giving bit-identical descriptors from the
    frozen file and from ``src`` itself (dlib's own bn→affine conversion at load time)."""
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    original = fmt.load(src)
    model = fmt.load(src)
    conv = freeze(model)
    lines = [f"{src} -> {out}", f"converted {len(conv.converted)} batch-norm records to affine_"]

    def verify(tmp: Path) -> list[str]:
        written = fmt.load(tmp)
        _check_same_elsewhere(original, written, set(conv.converted))
        check = _check_chips(None)
        want, got = face_descriptors(src, check), face_descriptors(tmp, check)
        if got is None:
            return ["verified: re-read; python dlib check skipped (not a face recognition network)"]
        diff = float(np.abs(got - want).max())
        if diff != 0.0:
            raise BatchNormError(f"verification failed: python dlib's descriptors differ by {diff:.3g} from "
                                 f"dlib's own conversion of {src}")
        return ["verified: re-read, other layers unchanged; python dlib gives bit-identical descriptors "
                f"to its own conversion of the input ({len(check)} chips)"]

    return lines + replace_verified(out, fmt.dumps(model), verify)


__all__ = ["BatchNormError", "Conversion", "unfreeze", "freeze", "freeze_file"]
