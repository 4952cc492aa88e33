"""``--device``: the one place a device name becomes a ``torch.device``.

``auto`` (every command's default) is the GPU when torch sees one, else the CPU.  A device
this torch cannot use (``cuda`` on a CPU-only build or a machine without a driver, a GPU
index past the last one, ``mps`` off a Mac) is refused with one line naming it, before any
model is loaded, instead of a traceback from deep inside the first forward pass.
"""
from __future__ import annotations

import torch

from ..errors import DlibbridgeError
from ..options import DEVICE_AUTO


class DeviceError(DlibbridgeError, ValueError):
    """A device name torch does not know, or a device this machine's torch cannot use."""


def resolve_device(name: str | torch.device = DEVICE_AUTO) -> torch.device:
    """The device ``name`` means here; see the module docstring.  CUDA is checked without
    touching a GPU (no context is created: under torchrun each rank picks its own later)."""
    if isinstance(name, torch.device):
        return name
    if name == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"--device {name}: this torch {torch.__version__} ({build}) sees no CUDA device; "
                              "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:     # torch reports a missing backend either way
        reason = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeviceError(f"--device {name}: not available to this torch {torch.__version__} ({reason}); "
                          "use --device cpu or auto") from None
    return device
