"""Shared checks of the port against dlib: descriptors from a file in dlib and from a module,
the tolerance they meet, and whether two descriptor sets make the same same/different calls."""
from __future__ import annotations

import numpy as np
import torch

ATOL = 1e-5


def dlib_net(path):
    import dlib
    return dlib.face_recognition_model_v1(str(path))


def dlib_embed(path, chips) -> np.ndarray:
    return np.array(dlib_net(path).compute_face_descriptor([np.ascontiguousarray(c) for c in chips]))


def torch_embed(module, chips) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(chips))).numpy().astype(np.float64)


def same_decisions(a: np.ndarray, b: np.ndarray, threshold: float = 0.6) -> bool:
    da = np.linalg.norm(a[:, None] - a[None], axis=-1) < threshold
    db = np.linalg.norm(b[:, None] - b[None], axis=-1) < threshold
    return bool((da == db).all())
