"""oneDNN's fused CPU convolutions, for the frozen inference paths of the ports.

torch's ``F.conv2d`` on CPU hands each call to oneDNN with the weights in torch's layout, so
oneDNN reorders every weight tensor into its blocked layout on every call, and a following
relu or residual add is a separate pass over the feature map.  ``torch.ops.mkldnn``
exposes the primitive torch's own compiler emits for frozen graphs: a convolution with
post-ops (relu; add-then-relu) on weights reordered once, for one input shape.  On the face
ResNet that is 1.12× the unfused folded forward at batch 64 (``tools/bench_embed.py
--interleave``, ``unfused`` vs ``eager``, docs/benchmarks.md).  Results are bit-identical to
conv → add → relu as three ops (the post-ops are applied to the same float32 sums, in the
same order), except that for a single image ``F.conv2d`` picks another oneDNN kernel
(descriptors ≤ 2e-7 apart);
tests/test_port_onednn.py holds a NumPy reference.

Everything here falls back to the plain ops where this torch build has no oneDNN, for
inputs that are not float32/bfloat16 CPU tensors, and inside :func:`disabled`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _pointwise_op():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


_POINTWISE = _pointwise_op()
_enabled = True


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`conv` / :func:`conv_add_relu` run fused for this input."""
    return (_enabled and _POINTWISE is not None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and not x.requires_grad)


@contextlib.contextmanager
def disabled():
    """The plain torch ops for the duration (benchmarks and tests compare the two paths)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def pack(weight: torch.Tensor, conv: nn.Conv2d, input_shape: torch.Size) -> torch.Tensor:
    """``weight`` reordered once into the layout oneDNN picks for inputs of ``input_shape``
    (batch included: a tensor packed for batch 1 is reordered again on every batch-32 call,
    as slow as no packing).  Only for :func:`applies` inputs."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.contiguous(memory_format=torch.channels_last), list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, list(input_shape))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
         relu: bool) -> torch.Tensor:
    """``conv``'s geometry with ``weight``/``bias`` (plain or :func:`pack`-ed), then relu."""
    if applies(x):
        return _POINTWISE(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups,
                          "relu" if relu else "none", [], "")
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y.relu_() if relu else y


def conv_add_relu(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv: nn.Conv2d) -> torch.Tensor:
    """``relu(conv(x) + other)`` — the tail of a residual block — as one primitive
    (``other`` has the convolution's output shape)."""
    if applies(x):
        return _POINTWISE.binary(x, other, weight, bias, conv.padding, conv.stride, conv.dilation,
                                 conv.groups, "add", 1.0, "relu", [], "")
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y.add_(other).relu_()
