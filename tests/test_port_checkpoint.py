"""port.checkpoint: weights_only checkpoints round-trip the module and its dlib source."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dlibbridge
from dlibbridge.port import arch
from dlibbridge.port import checkpoint, convert


def test_checkpoint_loads_weights_only_and_round_trips(tmp_path, trainable, face_model_bytes):
    p = tmp_path / "m.pt"
    checkpoint.save_torch(trainable, p)
    raw = torch.load(p, weights_only=True)        # plain torch, no dlibbridge classes needed
    assert raw["format"] == checkpoint.CHECKPOINT_FORMAT and raw["config"]["trainable"] is True
    back = checkpoint.load_model(p)
    assert isinstance(back.level2[0].branch1.norm, arch.DlibBatchNorm2d) and back.level2[0].branch1.norm.eps == 1e-4
    assert dlibbridge.dumps(convert.to_dlib_tree(back)) == face_model_bytes
    flipped = checkpoint.load_model(p, trainable=False)
    assert not flipped.trainable and dlibbridge.dumps(convert.to_dlib_tree(flipped)) == face_model_bytes
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))      # another zip: refused, not a crash
    for other in ("other.pt", "arrays.npz"):
        with pytest.raises(convert.ConversionError, match="not a dlibbridge FaceResNet checkpoint"):
            checkpoint.load_model(tmp_path / other)


@pytest.mark.parametrize("trainable", [False, True])
def test_to_torch_and_inspect_accept_every_model_file_we_write(tmp_path, trainable, capsys):
    """``dlibbridge.to_torch`` and ``dlibbridge inspect`` take a model.pt (either form) as they
    take .dat files: the same descriptors, and inspect describes the dlib file it exports to."""
    import dlib
    from dlibbridge import cli
    base = convert.to_torch("default", trainable)
    checkpoint.save_torch(base, tmp_path / "model.pt")
    convert.to_dlib(base, tmp_path / "model.dat", trainable=trainable)
    chips = np.ascontiguousarray(np.random.default_rng(0).integers(0, 256, (2, 150, 150, 3), dtype=np.uint8))
    with torch.no_grad():
        got = dlibbridge.to_torch(str(tmp_path / "model.pt"))(torch.from_numpy(chips)).numpy()
    net = dlib.face_recognition_model_v1(str(tmp_path / "model.dat"))
    want = np.array([net.compute_face_descriptor(c) for c in chips])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not dlibbridge.to_torch(str(tmp_path / "model.pt")).trainable
    assert dlibbridge.to_torch(str(tmp_path / "model.pt"), trainable=True).trainable
    assert cli.main(["inspect", str(tmp_path / "model.pt")]) == 0
    listing = capsys.readouterr().out
    assert ("bn_con" in listing) == trainable and "fc" in listing


def test_the_public_api_is_listed_and_documented():
    import pydoc
    assert {"load", "save", "to_torch", "to_dlib", "DlibbridgeError"} <= set(dlibbridge.__all__)
    for name in dlibbridge.__all__:
        obj = getattr(dlibbridge, name)
        assert (obj.__doc__ or "").strip(), name
    text = pydoc.render_doc(dlibbridge, renderer=pydoc.plaintext)
    assert all(name in text for name in dlibbridge.__all__)
