"""eval.embedders: dlib, torch, checkpoint, ONNX and TorchScript engines agree; the embedding cache."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from dlibbridge.eval import embedders as emb
from dlibbridge.eval import evaluate as ev


@pytest.fixture(scope="module")
def port(face_model_path):
    """The torch port of dlib's face model, converted once (conversion takes seconds)."""
    from dlibbridge.port.convert import to_torch
    return to_torch(face_model_path)


@pytest.fixture(scope="module")
def torch_embedder(face_model_path, port):
    return emb.TorchEmbedder(face_model_path, port)


def test_engines_agree_and_flip_and_jitter_semantics(face_model_path, johns_chips, port, torch_embedder):
    chips = johns_chips[2][:4]
    dl = emb.make_embedder(emb.ModelSpec.parse(f"dlib:{face_model_path}"))
    assert np.abs(dl.embed(chips) - torch_embedder.embed(chips)).max() <= 1e-5
    flip_t = emb.TorchEmbedder(face_model_path, port, flip=True)
    flip_d = emb.make_embedder(emb.ModelSpec.parse(f"dlib:{face_model_path}"), flip=True)
    mirrored = np.ascontiguousarray(chips[:, :, ::-1])
    want = (torch_embedder.embed(chips) + torch_embedder.embed(mirrored)) / 2
    np.testing.assert_allclose(flip_t.embed(chips), want, atol=1e-7)
    assert np.abs(flip_d.embed(chips) - want).max() <= 1e-5
    assert flip_t.cache_name() != torch_embedder.cache_name() != dl.cache_name()
    # dlib treats num_jitters=1 as no jitter; the port follows
    one_t = emb.TorchEmbedder(face_model_path, port, jitter=1)
    np.testing.assert_array_equal(one_t.embed(chips[:2]), torch_embedder.embed(chips[:2]))
    jit = emb.TorchEmbedder(face_model_path, port, jitter=3).embed(chips[:2])
    assert jit.shape == (2, 128) and np.isfinite(jit).all()
    assert np.linalg.norm(jit - torch_embedder.embed(chips[:2]), axis=1).max() < 0.3   # same faces, jittered
    with pytest.raises(ValueError, match="uint8 chips"):
        torch_embedder.embed(chips[:, :100])


def test_checkpoint_and_onnx_models_run(tmp_path, johns_chips, port, torch_embedder):
    from dlibbridge.port.export import export_onnx
    from dlibbridge.port.checkpoint import save_torch
    chips = johns_chips[2][:3]
    want = torch_embedder.embed(chips)
    save_torch(port, tmp_path / "m.pt")
    ck = emb.make_embedder(emb.ModelSpec.parse(str(tmp_path / "m.pt")))
    np.testing.assert_array_equal(ck.embed(chips), want)
    export_onnx(port, tmp_path / "m.onnx")
    spec = emb.ModelSpec.parse(str(tmp_path / "m.onnx"))
    assert spec.engine == "onnx"
    assert np.abs(emb.make_embedder(spec).embed(chips) - want).max() <= 1e-5
    with pytest.raises(ValueError, match="dlib engine"):
        emb.ModelSpec.parse(f"dlib:{tmp_path / 'm.onnx'}")
    with pytest.raises(ValueError, match="dlib engine"):
        emb.ModelSpec.parse(str(tmp_path / "m.pt"), "dlib")
    with pytest.raises(FileNotFoundError):
        emb.ModelSpec.parse(str(tmp_path / "nope.dat"))


def test_torchscript_exports_run_and_archives_without_an_input_record_are_refused(tmp_path, johns_chips, port,
                                                                                  torch_embedder):
    import torch

    from dlibbridge.port.export import export_torchscript
    chips = johns_chips[2][:3]
    export_torchscript(port, tmp_path / "m.ts")
    ts = emb.make_embedder(emb.ModelSpec.parse(str(tmp_path / "m.ts")))
    assert np.abs(ts.embed(chips) - torch_embedder.embed(chips)).max() <= 1e-5
    # a TorchScript archive that does not say it takes uint8 NHWC chips (an older export took
    # float NCHW): it would run and give wrong descriptors, so it is refused up front
    with warnings.catch_warnings():          # torch ≥ 2.13 marks TorchScript deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(torch.nn.Flatten(), torch.zeros(1, 3, 150, 150)), str(tmp_path / "old.ts"))
    with pytest.raises(ValueError, match="does not record its input.*export the model again"):
        emb.make_embedder(emb.ModelSpec.parse(str(tmp_path / "old.ts")))


class CountingEmbedder(emb.TorchEmbedder):
    """The real torch port, counting the faces it is asked to embed."""
    faces = 0

    def _forward_batch(self, x):
        CountingEmbedder.faces += len(x)
        return super()._forward_batch(x)


def test_cache_is_reused_and_keyed_by_content(tmp_path, face_model_path, johns_dir, port):
    data = tmp_path / "data"
    shutil.copytree(johns_dir / "John_Salley", data / "js")
    paths = sorted((data / "js").glob("*.jpg"))[:6]
    emb = CountingEmbedder(face_model_path, port)
    src = ev.ChipSource(data, None)
    first, status = ev.compute_embeddings(paths, [emb], src, tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6 and status == ["chip"] * 6
    again, _ = ev.compute_embeddings(paths, [emb], src, tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6, "second run must come from the cache"
    np.testing.assert_array_equal(first, again)
    moved = data / "renamed"
    shutil.move(data / "js", moved)           # same bytes elsewhere: still cached
    ev.compute_embeddings(sorted(moved.glob("*.jpg"))[:6], [emb], ev.ChipSource(data, None),
                          tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6


def test_models_with_the_same_file_name_get_distinct_labels(tmp_path, face_model_path):
    """run/model.dat and cam/model.dat were both "model [torch]" (one row label, one errors
    folder): they are told apart by the shortest end of their paths that differs."""
    for d in ("x/run", "y/cam", "z/cam"):
        (tmp_path / d).mkdir(parents=True)
        shutil.copy(face_model_path, tmp_path / d / "model.dat")
    specs = [emb.ModelSpec.parse(str(tmp_path / d / "model.dat")) for d in ("x/run", "y/cam", "z/cam")]
    specs.append(emb.ModelSpec.parse(f"dlib:{tmp_path / 'x/run/model.dat'}"))
    specs.append(emb.ModelSpec.parse("default"))
    names = [s.name for s in emb.label_models(specs)]
    assert names == ["x/run/model.dat [torch]", "y/cam/model.dat [torch]", "z/cam/model.dat [torch]",
                     "model [dlib]", "dlib_face_recognition_resnet_model_v1 [torch]"]
    two = emb.label_models(specs[:2])
    assert [s.name for s in two] == ["run/model.dat [torch]", "cam/model.dat [torch]"]
    with pytest.raises(ValueError, match="given twice"):
        emb.label_models([specs[0], specs[0]])
