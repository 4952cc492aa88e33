"""Private C++ codec (cpp/). Use dlibbridge.codec.tree instead; this is its contract.

parse() returns {"net": NODE, "trailers": [SHAPE_PREDICTOR, ...]} where

NODE is a dict with "kind" and "version" and, by kind:
  "loss":        details, subnet
  "add_layer":   details, subnet, flags=(setup_called, stale, disabled), tensors=(x_grad, cached_output, params_grad)
  "input_layer": input (DETAILS | None), details, flags, tensors=(x_grad, cached_output, grad_final), sef (int | None)
  "tag":         subnet
  "tag_input":   input (DETAILS | None), tensors=(cached_output, grad_final), stale, sef
  "repeat":      groups (list of NODE, group 0 nearest the output), subnet
DETAILS is (version_string, [(field_name, field_type, value), ...]) with field_type one of
  int uint f32 f64 bool byte str tensor alias records; tensors are float32 arrays (n, k, nr, nc),
  aliases 4-tuples, records a list of field lists.
SHAPE_PREDICTOR is {"kind": "shape_predictor", "version", "new_matrix_format", "initial_shape",
  "forests": [[{"split_idx", "split_thresh", "leaf_values"}, ...], ...], "anchor_idx", "deltas"}.
serialize() takes the same structure back.
"""
from typing import Any

class CodecError(ValueError):
    """args = (message: str, offset: int, path: str)"""

def parse(data: bytes | bytearray | memoryview) -> dict[str, Any]: ...
def serialize(tree: dict[str, Any]) -> bytes: ...
