"""How a dlib network's records are wired, and the tensor shape each one outputs — torch-free.

The bytes of a dlib DNN file store neither tag ids nor whether a tag-or-skip record is a tag
or a skip (dlib-format.md §5).  Wiring follows dlib's idioms, which every shipped file uses:

* a tag-or-skip directly above another one is ``skipN<tagM<…>>``: it jumps back to the tag
  recorded before that pair;
* ``add_prev``/``mult_prev`` read the latest tag;
* ``concat_`` of n tags reads the n latest, oldest first (``concat2<tag1, tag2>``).

:func:`wire` turns the record list into that program once; the generic PyTorch port runs it
(:mod:`dlibbridge.port.generic`) and :func:`output_shapes` propagates shapes through it, so
``dlibbridge inspect`` shows the shapes of every network without loading torch, from the same
wiring the port executes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DlibbridgeError
from .tree import AddLayer, Details, InputLayer, LayerEntry, Loss, Model, Repeat, TagOnInput, TagOrSkip

Shape = tuple[int, int, int]     # per sample: (k, nr, nc), dlib's order


class WiringError(DlibbridgeError, ValueError):
    """The records cannot be wired by dlib's tag idioms (the message names the record)."""


@dataclass(frozen=True)
class Step:
    """One step of the forward program: ``layer`` runs a record (``entry``), ``tag`` stores
    the current tensor in a slot, ``skip`` continues from a slot, ``add_prev``/``mult_prev``
    combine with a slot, ``concat`` joins slots along k."""

    op: str
    entry: LayerEntry
    details: Details | None = None
    slots: tuple[int, ...] = ()

    @property
    def path(self) -> str:
        return self.entry.path


def wire(model: Model) -> list[Step]:
    """The forward program of a parsed network, input to output (the loss is not a step)."""
    steps: list[Step] = []
    slots = 0                      # tag slots recorded so far; slot i is the i-th tag
    prev_was_tag = False
    for e in model.layers():
        node = e.node
        is_tag = False
        if isinstance(node, InputLayer):
            steps.append(Step("layer", e, node.details))
        elif isinstance(node, AddLayer):
            d = node.details
            if d.version in ("add_prev_", "mult_prev_"):
                if not slots:
                    raise WiringError(f"{e.path}: {d.version} with no tag before it")
                steps.append(Step(d.version[:-1], e, d, (slots - 1,)))
            elif d.version == "concat_":
                n = d["num_tags"]
                if slots < n:
                    raise WiringError(f"{e.path}: concat_ of {n} tags with {slots} recorded")
                steps.append(Step("concat", e, d, tuple(range(slots - n, slots))))
            else:
                steps.append(Step("layer", e, d))
        elif isinstance(node, TagOnInput):
            steps.append(Step("tag", e, slots=(slots,)))
            slots, is_tag = slots + 1, True
        elif isinstance(node, TagOrSkip):
            if prev_was_tag and slots >= 2:
                steps.append(Step("skip", e, slots=(slots - 2,)))
            else:
                steps.append(Step("tag", e, slots=(slots,)))
                slots, is_tag = slots + 1, True
        elif not isinstance(node, (Repeat, Loss)):   # a repeat's groups are in the flat list
            raise WiringError(f"{e.path}: {e.kind} records are not supported")
        prev_was_tag = is_tag
    return steps


def input_size(model: Model) -> tuple[int, int] | None:
    """(nr, nc) a sized input layer fixes, else None (any size; for a pyramid input, the size
    of the tiled pyramid image the network runs on)."""
    inp = model.input
    if inp is not None and inp.version == "input_rgb_image_sized":
        return inp["nr"], inp["nc"]
    return None


def _window(shape: Shape, d: Details, channels: int | None) -> Shape:
    """dlib's output size of a conv or pooling window: ``1 + (n + 2·pad − window) / stride``;
    a window of 0 (``*_pool_everything``) spans the whole input."""
    k, h, w = shape
    kh, kw = d["nr"] or h, d["nc"] or w
    oh = 1 + (h + 2 * d["padding_y"] - kh) // d["stride_y"]
    ow = 1 + (w + 2 * d["padding_x"] - kw) // d["stride_x"]
    if oh < 1 or ow < 1:
        raise WiringError(f"{d.version} window {kh}x{kw} does not fit a {h}x{w} input")
    return (channels if channels is not None else k, oh, ow)


def _layer_shape(shape: Shape, d: Details) -> Shape:
    t = d.layer_type
    if t == "con":
        return _window(shape, d, d["num_filters"])
    if t in ("max_pool", "avg_pool"):
        return _window(shape, d, None)
    if t == "fc":
        return (d["num_outputs"], 1, 1)
    return shape                   # element-wise: bn, affine, relu, prelu, sig, htan, dropout, …


def output_shapes(model: Model, height: int | None = None, width: int | None = None) -> list[tuple[Step, Shape]]:
    """Each step with its per-sample output shape for one ``height``×``width`` RGB input
    (default: the size a sized input layer fixes; required otherwise).  ``add_prev``/
    ``mult_prev`` zero-pad both operands to the larger size in every dimension, as dlib does."""
    if height is None or width is None:
        fixed = input_size(model)
        if fixed is None:
            raise WiringError("this network takes images of any size: give the input size")
        height, width = fixed
    cur: Shape = (3, height, width)
    saved: dict[int, Shape] = {}
    out = []
    for s in wire(model):
        if s.op == "layer":
            cur = _layer_shape(cur, s.details)
        elif s.op == "tag":
            saved[s.slots[0]] = cur
        elif s.op == "skip":
            cur = saved[s.slots[0]]
        elif s.op in ("add_prev", "mult_prev"):
            cur = tuple(max(a, b) for a, b in zip(cur, saved[s.slots[0]]))
        else:                      # concat: along k; dlib requires equal nr, nc
            parts = [saved[i] for i in s.slots]
            if len({p[1:] for p in parts}) != 1:
                raise WiringError(f"{s.path}: concat_ of tensors of different sizes {parts}")
            cur = (sum(p[0] for p in parts), *parts[0][1:])
        out.append((s, cur))
    return out
