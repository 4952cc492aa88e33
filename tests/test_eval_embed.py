"""eval.embed (``dlibbridge embed``): descriptors of a folder of chips, resumable, matching dlib."""
from __future__ import annotations

import numpy as np
import pytest

from dlibbridge import assets, cli
from dlibbridge._io import write_npz
from dlibbridge.eval import embed
from dlibbridge.eval.embedders import ModelSpec
from dlibbridge.port.dist import Dist
from conftest import torchrun
from parity import ATOL


@pytest.fixture
def chip_folder(tmp_path, johns_dir, shared_dir):
    """Eight johns chips in two sub-folders plus a wrong-sized photo and a non-image."""
    root = tmp_path / "chips"
    files = sorted(johns_dir.glob("*/*.jpg"))[:8]
    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / f.parent.name / f.name).symlink_to(f)
    (root / "zz").mkdir()
    (root / "zz" / "dogs.jpg").symlink_to(shared_dir / "data" / "faces" / "dogs.jpg")
    (root / "zz" / "notes.png").write_bytes(b"not an image")
    return root, [f.relative_to(johns_dir).as_posix() for f in files]


def test_cli_embed_reports_bad_images_and_matches_dlib(chip_folder, face_model_path, dlib_descriptors,
                                                       johns_chips, tmp_path, capsys):
    root, rel = chip_folder
    out = tmp_path / "emb.npz"
    assert cli.main(["embed", str(face_model_path), str(root), "-o", str(out), "--batch-size", "3", "-q"]) == 0
    z = np.load(out)
    assert z["paths"].tolist() == rel
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (8, 128)
    idx = [johns_chips[0].index(p) for p in rel]
    assert np.abs(z["embeddings"] - dlib_descriptors[idx]).max() <= ATOL
    assert z["skipped_paths"].tolist() == ["zz/dogs.jpg", "zz/notes.png"]
    assert "wrong size" in z["skipped_reasons"][0] and "not_an_image" in z["skipped_reasons"][1]
    err = capsys.readouterr().err
    assert "skipped zz/dogs.jpg" in err and "skipped zz/notes.png" in err


def test_embed_resumes_after_interruption(chip_folder, face_model_path, tmp_path, monkeypatch):
    root, rel = chip_folder
    full = embed.embed_folder(str(face_model_path), root, tmp_path / "full.npz", batch_size=3, progress=False)
    out = tmp_path / "emb.npz"
    monkeypatch.setattr(embed, "SAVE_EVERY_S", 0.0)
    calls = {"n": 0}
    real = embed._read_chip

    def interrupted(path):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(embed, "_read_chip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_folder(str(face_model_path), root, out, batch_size=3, progress=False)
    assert not out.exists() and out.with_name("emb.npz.partial.npz").exists()
    monkeypatch.setattr(embed, "_read_chip", real)
    res = embed.embed_folder(str(face_model_path), root, out, batch_size=3, progress=False)
    assert res.resumed_from == 6 and res.paths == full.paths == rel
    np.testing.assert_array_equal(np.load(out)["embeddings"], np.load(tmp_path / "full.npz")["embeddings"])
    assert not out.with_name("emb.npz.partial.npz").exists()


def test_embed_decoding_in_worker_processes_gives_the_same_output(chip_folder, face_model_path, tmp_path):
    root, rel = chip_folder
    one = embed.embed_folder(str(face_model_path), root, tmp_path / "a.npz", batch_size=3, progress=False,
                             workers=0)
    two = embed.embed_folder(str(face_model_path), root, tmp_path / "b.npz", batch_size=3, progress=False,
                             workers=2)
    assert one.paths == two.paths == rel and one.skipped == two.skipped and len(two.skipped) == 2
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
    assert a["skipped_reasons"].tolist() == b["skipped_reasons"].tolist()


def test_embed_refuses_empty_or_missing_folders(tmp_path, face_model_path):
    with pytest.raises(embed.EmbedError, match="not a folder"):
        embed.embed_folder(str(face_model_path), tmp_path / "missing", tmp_path / "o.npz", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(embed.EmbedError, match="no images"):
        embed.embed_folder(str(face_model_path), tmp_path / "empty", tmp_path / "o.npz", progress=False)


def test_embed_under_torchrun_equals_one_process_and_resumes_per_shard(tmp_path):
    """Each rank embeds its share (batch-aligned, so the batches are one process's), rank 0
    merges: the same file bit for bit.  A finished shard's partial file is reused by a rerun."""
    chips = assets.sample_chips_dir()
    one = embed.embed_folder("default", chips, tmp_path / "one.npz", batch_size=4, progress=False, workers=0)
    p = torchrun("embed", "default", str(chips), "-o", "two.npz", "--batch-size", "4", "-q", cwd=tmp_path)
    assert p.stdout.count("two.npz: 25 embeddings") == 1          # rank 0 reports, once
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["paths"].tolist() == b["paths"].tolist() == one.paths
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["one.npz", "two.npz"]     # no partials left

    # Rank 0's shard finished earlier (marked: zeros), rank 1's not: the rerun keeps rank 0's.
    files = embed.list_images(chips)
    lo, hi = Dist(0, 2).shard(len(files), 4)
    spec = ModelSpec.parse("default")
    write_npz(tmp_path / "three.npz.rank0of2.partial.npz", fingerprint=np.array(embed._fingerprint(
        spec.path, spec.engine, files[lo:hi])), done=np.array(hi - lo), paths=np.array(files[lo:hi]),
        embeddings=np.zeros((hi - lo, 128), np.float32), skipped=np.zeros((0, 2), str))
    torchrun("embed", "default", str(chips), "-o", "three.npz", "--batch-size", "4", "-q", cwd=tmp_path)
    c = np.load(tmp_path / "three.npz")
    assert c["paths"].tolist() == files and not c["embeddings"][:hi].any()
    np.testing.assert_array_equal(c["embeddings"][hi:], a["embeddings"][hi:])
    assert not list(tmp_path.glob("*.partial.npz"))
