"""The parity check every writer of a face model ends with: load the file in the ``dlib``
package itself and take its descriptors (numpy only, so the torch-free codec uses it too)."""
from __future__ import annotations

import os

import numpy as np


def face_descriptors(path: str | os.PathLike, chips: np.ndarray) -> np.ndarray | None:
    """``dlib.face_recognition_model_v1(path)``'s descriptors (N,128 float64) of uint8 RGB
    chips (N,150,150,3); None when dlib's face recognition network cannot load the file
    (another network, or not the face ResNet)."""
    import dlib
    try:
        net = dlib.face_recognition_model_v1(os.fspath(path))
    except RuntimeError:
        return None
    return np.array(net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips]))
