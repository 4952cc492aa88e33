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
