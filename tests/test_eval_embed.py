"""eval.embed (``dlibbridge embed``): descriptors of a folder of chips or photos, with each
image's person, resumable, matching dlib."""
from __future__ import annotations

import numpy as np
import pytest

from dlibbridge import assets, cli
from dlibbridge._io import write_npz
from dlibbridge.eval import embed, embedders
from dlibbridge.eval.embedders import ModelSpec
from dlibbridge.port.dist import Dist
from conftest import torchrun
from parity import ATOL


@pytest.fixture
def chip_folder(tmp_path, johns_dir, shared_dir):
    """Eight johns chips in two sub-folders plus a photo (no face: the central box) and a non-image."""
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
    assert z["paths"].tolist() == rel + ["zz/dogs.jpg"]
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (9, 128)
    idx = [johns_chips[0].index(p) for p in rel]
    assert np.abs(z["embeddings"][:8] - dlib_descriptors[idx]).max() <= ATOL
    assert z["identities"].tolist() == [p.split("/")[0] for p in rel] + ["zz"]
    assert z["statuses"].tolist() == ["chip"] * 8 + ["fallback"]      # no face in dogs.jpg: evaluate's central box
    assert z["skipped_paths"].tolist() == ["zz/notes.png"] and z["skipped_reasons"].tolist() == ["not_an_image"]
    assert "skipped zz/notes.png: not_an_image" in capsys.readouterr().err


def test_embed_aligns_photos_as_dlib_does_with_their_people(shared_dir, face_model_path, photo_chips,
                                                           johns_chips, dlib_descriptors, tmp_path):
    """Photos in person folders: the most central face of each (evaluate's policy), aligned as
    dlib aligns (its own detector, landmarks and get_face_chip give the reference), labelled
    with the folder."""
    import dlib
    faces = shared_dir / "data" / "faces"
    photos = {"tom": ["Tom_Cruise_avp_2014_4.jpg"], "pascal": ["2009_004587.jpg", "2008_001009.jpg"]}
    root = tmp_path / "photos"
    want = []
    detector = dlib.get_frontal_face_detector()
    for person, names in photos.items():
        (root / person).mkdir(parents=True)
        for name in names:
            (root / person / name).symlink_to(faces / name)
            img = dlib.load_rgb_image(str(faces / name))
            h, w = img.shape[:2]
            dets = list(detector(img, 1))
            central = min(range(len(dets)), key=lambda i: ((dets[i].left() + dets[i].right()) / 2 - (w - 1) / 2) ** 2
                          + ((dets[i].top() + dets[i].bottom()) / 2 - (h - 1) / 2) ** 2)
            want.append((f"{person}/{name}", len(johns_chips[0]) + photo_chips[0].index(f"{name}#{central}")))
    want.sort()
    res = embed.embed_folder(str(face_model_path), root, tmp_path / "e.npz", batch_size=2, progress=False, workers=0)
    z = np.load(res.out)
    assert z["paths"].tolist() == [p for p, _ in want] and not res.skipped
    assert z["identities"].tolist() == [p.split("/")[0] for p, _ in want]
    assert z["statuses"].tolist() == ["detected"] * len(want)
    assert np.abs(z["embeddings"] - dlib_descriptors[[i for _, i in want]]).max() <= ATOL


def test_embed_resumes_after_interruption(chip_folder, face_model_path, tmp_path, monkeypatch):
    root, rel = chip_folder
    full = embed.embed_folder(str(face_model_path), root, tmp_path / "full.npz", batch_size=3, progress=False)
    out = tmp_path / "emb.npz"
    monkeypatch.setattr(embed, "SAVE_EVERY_S", 0.0)
    real = embedders.make_embedder

    def interrupted_at_the_third_batch(*args, **kwargs):
        engine, calls = real(*args, **kwargs), []

        def embed_or_interrupt(chips):
            calls.append(len(chips))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return type(engine).embed(engine, chips)
        engine.embed = embed_or_interrupt
        return engine

    monkeypatch.setattr(embedders, "make_embedder", interrupted_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_folder(str(face_model_path), root, out, batch_size=3, progress=False)
    assert not out.exists() and out.with_name("emb.npz.partial.npz").exists()
    monkeypatch.setattr(embedders, "make_embedder", real)
    res = embed.embed_folder(str(face_model_path), root, out, batch_size=3, progress=False)
    assert res.resumed_from == 6 and res.paths == full.paths == rel + ["zz/dogs.jpg"]
    np.testing.assert_array_equal(np.load(out)["embeddings"], np.load(tmp_path / "full.npz")["embeddings"])
    assert not out.with_name("emb.npz.partial.npz").exists()


def test_embed_decoding_in_worker_processes_gives_the_same_output(chip_folder, face_model_path, tmp_path):
    root, rel = chip_folder
    one = embed.embed_folder(str(face_model_path), root, tmp_path / "a.npz", batch_size=3, progress=False,
                             workers=0)
    two = embed.embed_folder(str(face_model_path), root, tmp_path / "b.npz", batch_size=3, progress=False,
                             workers=2)
    assert one.paths == two.paths == rel + ["zz/dogs.jpg"] and one.skipped == two.skipped and len(two.skipped) == 1
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
    from dlibbridge.eval.evaluate import ChipSource, PhotoAlignment
    tag = ChipSource(chips, None, **PhotoAlignment().alignment()).cache_tag()
    write_npz(tmp_path / "three.npz.rank0of2.partial.npz", fingerprint=np.array(embed._fingerprint(
        spec.path, spec.engine, tag, files[lo:hi])), done=np.array(hi - lo), paths=np.array(files[lo:hi]),
        statuses=np.array(["chip"] * (hi - lo)), embeddings=np.zeros((hi - lo, 128), np.float32),
        skipped=np.zeros((0, 2), str))
    torchrun("embed", "default", str(chips), "-o", "three.npz", "--batch-size", "4", "-q", cwd=tmp_path)
    c = np.load(tmp_path / "three.npz")
    assert c["paths"].tolist() == files and not c["embeddings"][:hi].any()
    np.testing.assert_array_equal(c["embeddings"][hi:], a["embeddings"][hi:])
    assert not list(tmp_path.glob("*.partial.npz"))
