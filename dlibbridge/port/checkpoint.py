"""Saved models: dlibbridge's torch checkpoints, TorchScript archives and dlib files, told apart in one place.

:func:`save_torch` writes a ``weights_only``-loadable checkpoint (config, state dict and the dlib
source bytes, so export after reloading is still byte-identical); :func:`sniff` tells what a file
is from its leading bytes, and :func:`load_model` opens a .dat or a checkpoint as a FaceResNet.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .._io import write_torch
from .._load import DamagedFileError, read_torch
from .arch import FaceResNet
from .convert import ConversionError, _channels_last, _unwrap, to_dlib_tree, to_torch

CHECKPOINT_FORMAT = "dlibbridge.FaceResNet"
CHECKPOINT_VERSION = 1


def save_torch(module: nn.Module, path: str | os.PathLike) -> None:
    """Save config + state dict + the dlib source bytes, loadable with ``weights_only=True``.

    The source file travels as a uint8 tensor (pickled ``bytes`` would grow by half under
    torch.save's pickle protocol 2), so export after reloading is still byte-identical."""
    module = _unwrap(module)
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in module.state_dict().items()}
    src = module.dlib_source
    ckpt = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "config": module.config,
            "state_dict": state, "dlib_meta": module.dlib_meta,
            "dlib_source": None if src is None else torch.frombuffer(bytearray(src), dtype=torch.uint8)}
    write_torch(path, ckpt)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FaceResNet:
    """Inverse of :func:`save_torch` (read with ``weights_only``: no code runs), in eval mode."""
    try:
        ckpt = read_torch(path, what="torch file", map_location=map_location)
    except DamagedFileError as e:     # TorchScript archives, other zips (e.g. .npz), truncated files
        raise ConversionError(f"{path}: not a dlibbridge FaceResNet checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConversionError(f"{path}: not a dlibbridge FaceResNet checkpoint")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise ConversionError(f"{path}: checkpoint format version {ckpt.get('format_version')} "
                              f"(this dlibbridge reads {CHECKPOINT_VERSION})")
    module = FaceResNet(ckpt["config"])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.dlib_meta = ckpt.get("dlib_meta") or {}
    src = ckpt.get("dlib_source")
    module.dlib_source = None if src is None else src.numpy().tobytes()
    return _channels_last(module).eval()


def sniff(path: str | os.PathLike) -> str:
    """What a saved model is, from its bytes (never its name): ``"torchscript"`` (a zip
    archive holding compiled ``code/``), ``"checkpoint"`` (any other zip: torch.save's
    format, :func:`save_torch` or not) or ``"dat"`` (anything else: dlib's format, checked by
    the codec when it is read)."""
    import zipfile
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return "dat"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist()):
                return "torchscript"
    return "checkpoint"


def load_model(path: str | os.PathLike, trainable: bool | None = None) -> FaceResNet:
    """A dlib .dat or a :func:`save_torch` checkpoint → FaceResNet.  ``trainable=None``
    keeps a checkpoint's form (and gives the frozen form for a .dat)."""
    if sniff(path) != "dat":
        module = load_torch(path)
        if trainable is not None and bool(trainable) != module.trainable:
            module = to_torch(to_dlib_tree(module, bool(trainable)), bool(trainable))
        return module
    return to_torch(path, bool(trainable))


def open_model(path: str | os.PathLike) -> nn.Module:
    """Any saved face model as a module that maps chips to descriptors: a TorchScript archive
    as torch loads it, a .dat or a checkpoint as :func:`load_model` does."""
    if sniff(path) == "torchscript":
        return load_torchscript(path)
    return load_model(path)


def load_torchscript(path) -> nn.Module:
    """``torch.jit.load`` (a path or a file object) on CPU, without its deprecation notice in torch ≥ 2.13 (TorchScript
    stays supported here: its archives are what ``export --torchscript`` writes)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        return torch.jit.load(path if hasattr(path, "read") else os.fspath(path), map_location="cpu")


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_torch", "load_torch", "load_model", "sniff",
           "open_model", "load_torchscript"]
