"""Chips → descriptors in batches: the one loop behind evaluation's engines
(:mod:`dlibbridge.eval.embedders`), calibration (:mod:`.calibrate`), fine-tuning's validation
and head initialisation, and the benchmarks.

Chips are read batch by batch (``rows`` picks them from a memory-mapped store without
loading the rest), so memory stays at one batch whatever the set's size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

EMBED_DIM = 128               # dlib's descriptor; fine-tuned exports keep it (heads are training-only)


def in_batches(forward: Callable[[np.ndarray], np.ndarray], chips, batch_size: int, *,
               rows: Sequence[int] | np.ndarray | None = None, bar=None) -> np.ndarray:
    """``forward`` applied to consecutive batches of ``chips`` (or of ``chips[rows]``),
    concatenated as float32 (N, 128).  ``bar`` (tqdm) advances by the chips of each batch."""
    n = len(chips) if rows is None else len(rows)
    out = []
    for s in range(0, n, batch_size):
        batch = chips[s:s + batch_size] if rows is None else chips[np.asarray(rows[s:s + batch_size])]
        out.append(np.asarray(forward(np.ascontiguousarray(batch)), np.float32))
        if bar is not None:
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, EMBED_DIM), np.float32)


def torch_forward(module, device, amp_dtype=None) -> Callable[[np.ndarray], np.ndarray]:
    """One batch (a numpy array in any layout the module takes) through ``module`` on
    ``device`` in inference mode, optionally under autocast; float32 numpy out.  The module's
    train/eval modes are the caller's (calibration runs chosen norms on batch statistics)."""
    import torch
    device = torch.device(device)

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    return forward


def embed_chips(module, chips, device="cpu", batch_size: int = 64, *, rows=None, amp_dtype=None,
                bar=None) -> np.ndarray:
    """Descriptors of uint8 RGB chips (N,150,150,3; a store's memory map with ``rows``) with
    the module in eval mode (running statistics) for the pass, its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        return in_batches(torch_forward(module, device, amp_dtype), chips, batch_size, rows=rows, bar=bar)
    finally:
        module.train(was_training)

