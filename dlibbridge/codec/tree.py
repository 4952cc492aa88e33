"""dlib DNN model files as an editable tree: load, edit, write back byte-identical.

The byte-level work (the type-free grammar of ../shared/docs/dlib-format.md §5, the
float/double encodings, bounds checks) is done by the C++ extension ``_codec``; this
module only gives the parsed records Python types.  It knows nothing about what a layer
*computes* — that lives in ``arch``/``convert`` — and it never imports torch.

Tree shape (outermost first, exactly as dlib nests its C++ objects):

* :class:`Model` — the network plus any trailing objects (a ``shape_predictor`` after
  the vehicle detectors).
* :class:`Loss` — ``add_loss_layer``: loss :class:`Details` + subnet.
* :class:`AddLayer` — ``add_layer`` over another network: details + subnet + runtime state.
* :class:`InputLayer` — ``add_layer`` directly over the input layer (or over the hidden
  ``repeat_input_layer`` at the bottom of a repeat group, where ``input`` is ``None``).
* :class:`TagOrSkip` — ``add_tag_layer``/``add_skip_layer``: identical bytes, no id stored.
* :class:`TagOnInput` — a tag sitting directly on an input (the DenseNet's repeat groups).
* :class:`Repeat` — ``repeat<N, BLOCK, SUBNET>``; ``groups[0]`` is closest to the output.

Every record keeps its version (integer or string) and every field keeps its declared
wire type, so ``dumps(loads(b)) == b`` and old files stay old.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

import numpy as np

from .. import _codec
from ..errors import DlibbridgeError
from .._io import write_atomic


class DlibFormatError(DlibbridgeError, ValueError):
    """A byte stream that is not a dlib DNN file this codec can represent.

    ``offset`` is the byte offset of the failure and ``path`` the layer path
    (e.g. ``layer<12> con_4.params``) being read when it happened.
    """

    def __init__(self, message: str, offset: int | None = None, path: str | None = None):
        self.offset = offset
        self.path = path
        self.reason = message
        where = []
        if offset is not None:
            where.append(f"at byte {offset}")
        if path:
            where.append(f"in {path}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


# Wire types of details fields.  'f32'/'f64' differ only in how the value is encoded
# (dlib's float_details with 24 or 53 mantissa bits); 'byte' is a raw uint8.
FIELD_TYPES = ("int", "uint", "f32", "f64", "bool", "byte", "str", "tensor", "alias", "records")

EMPTY = np.zeros((0, 0, 0, 0), dtype=np.float32)


def _empty() -> np.ndarray:
    return EMPTY.copy()


@dataclass
class Field:
    """One typed field of a details record."""

    type: str
    value: Any


class Details:
    """A layer's (or input's, or loss's) own record: version string + ordered typed fields.

    ``d["params"]`` reads a value; ``d["params"] = arr`` replaces it, coerced to the field's
    wire type (tensors become float32 4-D arrays).  Use :meth:`replace` to build a record
    with a different version string and field list (e.g. affine → bn_con2).
    """

    __slots__ = ("version", "fields")

    def __init__(self, version: str, fields: dict[str, Field] | None = None):
        self.version = version
        self.fields: dict[str, Field] = dict(fields or {})

    @classmethod
    def build(cls, version: str, *items: tuple[str, str, Any]) -> "Details":
        """``Details.build("relu_2", ("disabled", "bool", False))``."""
        d = cls(version)
        for name, typ, value in items:
            if typ not in FIELD_TYPES:
                raise ValueError(f"unknown field type {typ!r} for {name!r}")
            d.fields[name] = Field(typ, None)
            d[name] = value
        return d

    @property
    def layer_type(self) -> str:
        """The version string without its trailing record version: ``con_4`` → ``con``,
        ``bn_con2`` → ``bn_con``, ``affine_`` → ``affine``."""
        return self.version.rstrip("0123456789").rstrip("_")

    def __getitem__(self, name: str) -> Any:
        return self.fields[name].value

    def __setitem__(self, name: str, value: Any) -> None:
        f = self.fields[name]
        f.value = _coerce(f.type, value, name)

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def get(self, name: str, default: Any = None) -> Any:
        f = self.fields.get(name)
        return default if f is None else f.value

    def items(self) -> Iterator[tuple[str, Field]]:
        return iter(self.fields.items())

    def copy(self) -> "Details":
        return Details(self.version, {k: Field(f.type, _copy_value(f.value)) for k, f in self.fields.items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Details) or other.version != self.version:
            return False
        if list(self.fields) != list(other.fields):
            return False
        return all(a.type == b.type and _value_equal(a.value, b.value)
                   for a, b in zip(self.fields.values(), other.fields.values()))

    def __repr__(self) -> str:
        parts = []
        for k, f in self.fields.items():
            v = f.value
            if isinstance(v, np.ndarray):
                v = f"tensor{tuple(v.shape)}"
            elif f.type == "records":
                v = f"[{len(v)} records]"
            parts.append(f"{k}={v}")
        return f"Details({self.version!r}, {', '.join(parts)})"


def _copy_value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, list):  # records
        return [{k: Field(f.type, _copy_value(f.value)) for k, f in r.items()} for r in v]
    return v


def _value_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            list(x) == list(y) and all(x[k].type == y[k].type and _value_equal(x[k].value, y[k].value) for k in x)
            for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN fields compare equal to themselves
    return a == b


def _coerce(typ: str, value: Any, name: str) -> Any:
    """Bring a user-supplied value into the representation of wire type ``typ``."""
    if typ == "tensor":
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if arr.ndim > 4:
            raise ValueError(f"{name}: a dlib tensor has at most 4 dimensions, got {arr.shape}")
        # dlib tensors are (num_samples, k, nr, nc); a lower-rank array fills from the left.
        if arr.ndim < 4:
            arr = arr.reshape(tuple(arr.shape) + (1,) * (4 - arr.ndim)) if arr.size else arr.reshape((0, 0, 0, 0))
        return arr
    if typ == "alias":
        t = tuple(int(x) for x in value)
        if len(t) != 4:
            raise ValueError(f"{name}: an alias_tensor is 4 dimensions, got {value!r}")
        return t
    if typ in ("int", "uint", "byte"):
        v = int(value)
        if typ == "uint" and v < 0:
            raise ValueError(f"{name}: unsigned field cannot be {v}")
        if typ == "byte" and not 0 <= v <= 255:
            raise ValueError(f"{name}: byte field out of range: {v}")
        return v
    if typ == "f32":
        return float(np.float32(value))
    if typ == "f64":
        return float(value)
    if typ == "bool":
        return bool(value)
    if typ == "str":
        return str(value)
    if typ == "records":
        return list(value)
    raise ValueError(f"unknown field type {typ!r}")


Tensor = np.ndarray


@dataclass(eq=False)
class AddLayer:
    details: Details
    subnet: "Node"
    version: int = 2
    setup_called: bool = True
    gradient_input_is_stale: bool = True
    output_disabled: bool = False
    x_grad: Tensor = field(default_factory=_empty)
    cached_output: Tensor = field(default_factory=_empty)
    params_grad: Tensor = field(default_factory=_empty)


@dataclass(eq=False)
class InputLayer:
    """add_layer over the input layer; ``input`` is None over a repeat group's hidden input."""

    input: Details | None
    details: Details
    version: int = 3
    setup_called: bool = True
    gradient_input_is_stale: bool = True
    output_disabled: bool = False
    x_grad: Tensor = field(default_factory=_empty)
    cached_output: Tensor = field(default_factory=_empty)
    grad_final: Tensor = field(default_factory=_empty)
    sample_expansion_factor: int | None = 1


@dataclass(eq=False)
class TagOrSkip:
    """``add_tag_layer`` or ``add_skip_layer``: the bytes cannot tell which, nor the tag id."""

    subnet: "Node"
    version: int = 1


@dataclass(eq=False)
class TagOnInput:
    input: Details | None
    version: int = 2
    cached_output: Tensor = field(default_factory=_empty)
    grad_final: Tensor = field(default_factory=_empty)
    gradient_input_is_stale: bool = False
    sample_expansion_factor: int | None = 1


@dataclass(eq=False)
class Repeat:
    groups: list["Node"]
    subnet: "Node"
    version: int = 1


@dataclass(eq=False)
class Loss:
    details: Details
    subnet: "Node"
    version: int = 1


Node = Union[Loss, AddLayer, InputLayer, TagOrSkip, TagOnInput, Repeat]


@dataclass(eq=False)
class ShapePredictor:
    """dlib's ``shape_predictor`` serialized after the network (the vehicle detectors).

    ``forests[c][t]`` is a dict with ``split_idx`` (S×2 uint64), ``split_thresh`` (S float32)
    and ``leaf_values`` (L×rows×cols float32); ``anchor_idx[c]`` uint64 arrays and
    ``deltas[c]`` (n×2 float32).  ``new_matrix_format`` records dlib's negative-dimension
    matrix header (true in every file dlib writes today).
    """

    initial_shape: np.ndarray
    forests: list
    anchor_idx: list
    deltas: list
    version: int = 1
    new_matrix_format: bool = True


@dataclass
class LayerEntry:
    """One entry of :meth:`Model.layers`: ``index`` is dlib's ``layer<i>`` numbering
    (0 = outermost), ``path`` names nested repeat groups too."""

    index: int
    path: str
    node: Any  # AddLayer | InputLayer | TagOrSkip | TagOnInput | Repeat | Loss

    @property
    def details(self) -> Details | None:
        return getattr(self.node, "details", None)

    @property
    def kind(self) -> str:
        d = self.details
        if d is not None:
            return d.version
        return {TagOrSkip: "tag/skip", TagOnInput: "tag(input)", Repeat: "repeat"}[type(self.node)]


@dataclass(eq=False)
class Model:
    net: Node
    trailers: list = field(default_factory=list)

    @property
    def loss(self) -> Details | None:
        return self.net.details if isinstance(self.net, Loss) else None

    @property
    def input(self) -> Details | None:
        """The network's input layer record (None for nets over a bare tensor input)."""
        node = self.net
        while not isinstance(node, (InputLayer, TagOnInput)):
            node = node.subnet
        return node.input

    def walk(self) -> Iterator[LayerEntry]:
        """Output-to-input, depth first, the order of dlib's ``layer<i>``.  Repeat groups
        are visited (group 0 first) before the repeat's subnet."""
        yield from _walk(self.net, 0, "")

    def layers(self) -> list[LayerEntry]:
        """Flat input-to-output list of every wrapper (forward order; repeat groups run
        from the last index down to 0, as dlib runs them)."""
        out: list[LayerEntry] = []
        _forward(self.net, 0, "", out)
        return out

    def details_records(self) -> list[Details]:
        """Every layer details record, input to output (what a converter maps)."""
        return [e.details for e in self.layers() if e.details is not None]


def _walk(node: Node, index: int, prefix: str) -> Iterator[LayerEntry]:
    for entry in _chain(node, index, prefix):
        yield entry
        if isinstance(entry.node, Repeat):
            for g, grp in enumerate(entry.node.groups):
                yield from _walk(grp, 0, f"{entry.path}.group<{g}>.")


def _forward(node: Node, index: int, prefix: str, out: list) -> None:
    chain = list(_chain(node, index, prefix))
    for entry in reversed(chain):
        if isinstance(entry.node, Repeat):
            for g in range(len(entry.node.groups) - 1, -1, -1):
                _forward(entry.node.groups[g], 0, f"{entry.path}.group<{g}>.", out)
        out.append(entry)


def _chain(node: Node, index: int, prefix: str) -> Iterator[LayerEntry]:
    while True:
        yield LayerEntry(index, f"{prefix}layer<{index}>", node)
        if isinstance(node, (InputLayer, TagOnInput)):
            return
        node = node.subnet
        index += 1


# ---------------------------------------------------------------------------------------
# Conversion between the extension's plain structures and the classes above.

def _det_from_raw(raw) -> Details | None:
    if raw is None:
        return None
    version, fields = raw
    return Details(version, {name: Field(typ, _value_from_raw(typ, v)) for name, typ, v in fields})


def _value_from_raw(typ: str, v: Any) -> Any:
    if typ == "records":
        return [{name: Field(t, _value_from_raw(t, x)) for name, t, x in rec} for rec in v]
    return v


def _det_to_raw(d: Details | None):
    if d is None:
        return None
    return (d.version, [(name, f.type, _value_to_raw(name, f)) for name, f in d.fields.items()])


def _value_to_raw(name: str, f: Field) -> Any:
    if f.type == "records":
        return [[(n, x.type, _value_to_raw(n, x)) for n, x in rec.items()] for rec in f.value]
    return _coerce(f.type, f.value, name)


# The conversions below walk the subnet chain iteratively: a network is a chain of
# hundreds of nested wrappers, deeper than Python's recursion limit allows.  Only repeat
# groups recurse, and they nest as deep as repeats nest in repeats.

def _node_from_raw(raw) -> Node:
    chain = []
    while "subnet" in raw:
        chain.append(raw)
        raw = raw["subnet"]
    if raw["kind"] == "input_layer":
        s, g, o = raw["flags"]
        a, b, c = raw["tensors"]
        node: Node = InputLayer(_det_from_raw(raw["input"]), _det_from_raw(raw["details"]), raw["version"],
                                s, g, o, a, b, c, raw["sef"])
    else:
        a, b = raw["tensors"]
        node = TagOnInput(_det_from_raw(raw["input"]), raw["version"], a, b, raw["stale"], raw["sef"])
    for raw in reversed(chain):
        kind = raw["kind"]
        if kind == "loss":
            node = Loss(_det_from_raw(raw["details"]), node, raw["version"])
        elif kind == "add_layer":
            s, g, o = raw["flags"]
            a, b, c = raw["tensors"]
            node = AddLayer(_det_from_raw(raw["details"]), node, raw["version"], s, g, o, a, b, c)
        elif kind == "tag":
            node = TagOrSkip(node, raw["version"])
        else:
            node = Repeat([_node_from_raw(g) for g in raw["groups"]], node, raw["version"])
    return node


def _t(a) -> np.ndarray:
    return _coerce("tensor", a, "tensor")


def _node_to_raw(n: Node) -> dict:
    chain = []
    while isinstance(n, (Loss, AddLayer, TagOrSkip, Repeat)):
        chain.append(n)
        n = n.subnet
    if isinstance(n, InputLayer):
        raw = {"kind": "input_layer", "version": n.version, "input": _det_to_raw(n.input),
               "details": _det_to_raw(n.details),
               "flags": (bool(n.setup_called), bool(n.gradient_input_is_stale), bool(n.output_disabled)),
               "tensors": (_t(n.x_grad), _t(n.cached_output), _t(n.grad_final)), "sef": n.sample_expansion_factor}
    elif isinstance(n, TagOnInput):
        raw = {"kind": "tag_input", "version": n.version, "input": _det_to_raw(n.input),
               "tensors": (_t(n.cached_output), _t(n.grad_final)), "stale": bool(n.gradient_input_is_stale),
               "sef": n.sample_expansion_factor}
    else:
        raise TypeError(f"not a dlib network node: {type(n).__name__}")
    for n in reversed(chain):
        if isinstance(n, Loss):
            raw = {"kind": "loss", "version": n.version, "details": _det_to_raw(n.details), "subnet": raw}
        elif isinstance(n, AddLayer):
            raw = {"kind": "add_layer", "version": n.version, "details": _det_to_raw(n.details), "subnet": raw,
                   "flags": (bool(n.setup_called), bool(n.gradient_input_is_stale), bool(n.output_disabled)),
                   "tensors": (_t(n.x_grad), _t(n.cached_output), _t(n.params_grad))}
        elif isinstance(n, TagOrSkip):
            raw = {"kind": "tag", "version": n.version, "subnet": raw}
        else:
            raw = {"kind": "repeat", "version": n.version, "groups": [_node_to_raw(g) for g in n.groups],
                   "subnet": raw}
    return raw


def _trailer_from_raw(raw) -> ShapePredictor:
    return ShapePredictor(raw["initial_shape"], raw["forests"], raw["anchor_idx"], raw["deltas"],
                          raw["version"], raw["new_matrix_format"])


def _trailer_to_raw(t) -> dict:
    if not isinstance(t, ShapePredictor):
        raise TypeError(f"unsupported trailer object: {type(t).__name__}")
    return {"kind": "shape_predictor", **dataclasses.asdict(t)}


# ---------------------------------------------------------------------------------------
# Public API

def loads(data: bytes) -> Model:
    """Parse the bytes of a dlib DNN file.  Raises :class:`DlibFormatError`."""
    try:
        raw = _codec.parse(memoryview(data).cast("B"))
    except _codec.CodecError as e:
        msg, offset, path = e.args
        if not _starts_with_a_version_string(data):
            msg = f"this is not a dlib DNN file: {msg}"
        raise DlibFormatError(msg, offset, path) from None
    return Model(_node_from_raw(raw["net"]), [_trailer_from_raw(t) for t in raw["trailers"]])


def _starts_with_a_version_string(data) -> bool:
    """Every dlib DNN file opens, within its first few bytes (after a small serialization
    version integer), with its outer layer's version string such as ``loss_metric_2``: dlib's
    integer encoding of the length (control byte = byte count 1..8, little-endian bytes) and
    that many printable characters with an underscore.  When even this first record is not
    there, the file is not a damaged network but something else entirely."""
    head = bytes(data[:96])
    for i in range(min(len(head), 24)):
        c = head[i]
        if 1 <= c <= 8:
            n = int.from_bytes(head[i + 1:i + 1 + c], "little")
            text = head[i + 1 + c:i + 1 + c + n]
            if 3 <= n <= 64 and len(text) == n and b"_" in text and all(0x20 < b < 0x7F for b in text):
                return True
    return False


def is_dlib_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` parses as a dlib DNN file (what an output may replace)."""
    try:
        load(path)
    except (DlibFormatError, OSError):
        return False
    return True


def load(path: str | os.PathLike) -> Model:
    """Parse a dlib DNN file (``"default"``: dlib's installed face model, see
    :func:`dlibbridge.assets.resolve_model`).  The file is memory-mapped, not read into a bytes object:
    tensors are copied once, straight from the page cache into their numpy arrays.  A pipe
    or another stream (``/dev/stdin``) cannot be mapped and is read whole instead."""
    from ..assets import resolve_model
    with open(resolve_model(path), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return loads(f.read())
        if os.fstat(f.fileno()).st_size == 0:
            return loads(b"")
        # MAP_POPULATE (Linux) faults the pages in one kernel call instead of one by one.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mm:
            return loads(mm)


def dumps(model: Model) -> bytes:
    """Serialize a tree to dlib's bytes.  Raises :class:`DlibFormatError` for a tree that
    cannot be written (unknown field type, value out of its wire type's range, …)."""
    raw = {"net": _node_to_raw(model.net), "trailers": [_trailer_to_raw(t) for t in model.trailers]}
    try:
        return _codec.serialize(raw)
    except _codec.CodecError as e:
        msg, offset, path = e.args
        raise DlibFormatError(msg, offset, path) from None


def save(model: Model, path: str | os.PathLike) -> None:
    """Serialize and write atomically (temp file + rename)."""
    write_atomic(path, dumps(model))


