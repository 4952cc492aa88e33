"""The torch-free wiring and shape propagation of dlibbridge.codec.graph, checked against what
the generic PyTorch port computes when it runs the same program on a real tensor."""
from __future__ import annotations

import pytest

from dlibbridge.codec import graph, tree
from dlibbridge.port import generic


@pytest.mark.parametrize("size", [(150, 150), (97, 203)])
def test_shapes_equal_the_torch_ports_traced_shapes_for_every_real_file(real_model_files, size):
    for name, data in real_model_files.items():
        model = tree.loads(data)
        fixed = graph.input_size(model)
        h, w = fixed or size
        predicted = [(s.path, shape) for s, shape in graph.output_shapes(model, h, w)]
        net = generic.to_torch(data)
        traced: dict[str, tuple] = {}
        for path, _op, shape in generic.output_shapes(net, h, w):
            traced[path] = shape             # a record run as two modules (con + relu): the last one
        assert [p for p, _ in predicted] == list(traced), name
        assert dict(predicted) == traced, name


def test_wiring_of_the_face_resnets_down_block(face_model_bytes):
    steps = graph.wire(tree.loads(face_model_bytes))
    ops = [s.op for s in steps]
    assert ops.count("tag") == 18 and ops.count("skip") == 4 and ops.count("add_prev") == 14   # 10 plain + 4 down blocks
    i = ops.index("skip")
    assert ops[i - 1] == "tag" and steps[i].slots == (steps[i - 1].slots[0] - 1,)


def test_a_network_the_idioms_cannot_wire_is_named(face_model_bytes):
    model = tree.loads(face_model_bytes)
    first_tag = next(e for e in model.layers() if isinstance(e.node, tree.TagOrSkip))
    node = model.net
    while node.subnet is not first_tag.node:
        node = node.subnet
    node.subnet = first_tag.node.subnet      # drop the first tag: the first add_prev reads nothing
    with pytest.raises(graph.WiringError, match=r"add_prev_ with no tag before it"):
        graph.wire(model)
