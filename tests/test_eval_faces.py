"""The jobs after a fine-tune: ``compare``, ``identify``, ``cluster`` (eval.faces, eval.compare,
eval.identify, eval.cluster), each against dlib's own pipeline with dlib's model and with a
fine-tuned one (a model.dat with changed weights in a run folder that recommends a threshold)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dlibbridge import assets, cli
from dlibbridge.eval import faces as fc
from parity import ATOL, dlib_net
from conftest import TUNED_THRESHOLD as RUN_THRESHOLD

SAMPLE = assets.sample_chips_dir()


def _dlib_photo_descriptor(model: Path, photo: Path) -> np.ndarray:
    """dlib's own pipeline on a photo: HOG detector (upsample 1), the largest face, 5-point
    landmarks, compute_face_descriptor (which cuts the 150x150, 0.25 chip itself)."""
    import dlib
    img = dlib.load_rgb_image(str(photo))
    dets = dlib.get_frontal_face_detector()(img, 1)
    det = max(dets, key=lambda r: r.area())
    shape = dlib.shape_predictor(str(assets.landmarks5_path()))(img, det)
    return np.array(dlib_net(model).compute_face_descriptor(img, shape))


def _chip_descriptors(model: Path, files: list[Path]) -> np.ndarray:
    import dlib
    return np.array(dlib_net(model).compute_face_descriptor([dlib.load_rgb_image(str(f)) for f in files]))


def _sample(person: str) -> list[Path]:
    return sorted((SAMPLE / person).glob("*.jpg"))


def test_model_threshold_comes_from_the_run_that_made_the_model(tuned_run, tmp_path):
    assert fc.model_threshold(tuned_run / "model.dat") == fc.Threshold(RUN_THRESHOLD, fc.model_threshold(
        tuned_run / "model.pt").source)
    assert fc.model_threshold(tuned_run / "model.dat", 0.5).value == 0.5
    assert fc.model_threshold(assets.face_model_path()).value == 0.6
    other = tmp_path / "other.dat"          # a file the run does not list: dlib's default
    other.write_bytes((tuned_run / "model.dat").read_bytes())
    (tmp_path / "summary.json").write_text((tuned_run / "summary.json").read_text())
    assert fc.model_threshold(other).value == 0.6
    with pytest.raises(fc.FacesError, match="--threshold"):
        fc.model_threshold(other, -1.0)


def test_compare_photos_matches_dlibs_pipeline(tuned_run, shared_dir, capsys):
    """Two photos: the faces are found and aligned as dlib does; the distance is dlib's, with
    dlib's model and with a fine-tuned model.dat (at its run's threshold by default)."""
    a, b = shared_dir / "data" / "faces" / "Tom_Cruise_avp_2014_4.jpg", shared_dir / "data" / "faces" / "2008_001009.jpg"
    for model, threshold in ((assets.face_model_path(), 0.6), (tuned_run / "model.dat", RUN_THRESHOLD)):
        assert cli.main(["compare", str(a), str(b), "--model", str(model), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        want = np.linalg.norm(_dlib_photo_descriptor(model, a) - _dlib_photo_descriptor(model, b))
        assert abs(r["distance"] - want) < 10 * ATOL
        assert r["threshold"] == threshold and r["same"] == (want < threshold)
    assert cli.main(["compare", str(a), str(b), "--model", str(tuned_run / "model.pt")]) == 0
    line = capsys.readouterr().out
    assert line.startswith("different people: distance ") and f"threshold {RUN_THRESHOLD:.4f}" in line
    assert "recommended threshold" in line and line.count("\n") == 1


def test_compare_chips_same_person_and_no_face(tmp_path, shared_dir, capsys):
    a, b = _sample("John_Salley")[:2]
    assert cli.main(["compare", str(a), str(b), "--engine", "dlib"]) == 0
    out = capsys.readouterr().out
    d = np.linalg.norm(np.subtract(*_chip_descriptors(assets.face_model_path(), [a, b])))
    assert out == f"same person: distance {d:.4f} < threshold 0.6000 (dlib's default)\n"
    assert cli.main(["compare", str(a), str(shared_dir / "data" / "faces" / "dogs.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dogs.jpg: no face (no_face)" in err


def _gallery(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Four people enrolled with all but their first chip; probes: each one's first chip and
    John_Simm, who is not enrolled."""
    gallery = tmp_path / "gallery"
    probes = []
    for person in ("John_Salley", "John_Savage", "John_Schneider", "John_Shimkus"):
        first, *rest = _sample(person)
        probes.append(first)
        (gallery / person).mkdir(parents=True)
        for f in rest:
            (gallery / person / f.name).symlink_to(f)
    return gallery, probes + _sample("John_Simm")[:1]


def test_identify_nearest_people_and_unknown(tuned_run, tmp_path, capsys):
    gallery, probes = _gallery(tmp_path)
    out = tmp_path / "ids.csv"
    model = tuned_run / "model.dat"
    args = ["identify", "--gallery", str(gallery), *map(str, probes), "-o", str(out), "--model", str(model),
            "-k", "2", "--workers", "0", "-q"]
    assert cli.main(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["probe"] for r in rows] == [str(p) for p in probes]
    enrolled = sorted(gallery.glob("*/*.jpg"))
    g = _chip_descriptors(model, enrolled)
    names = np.array([f.parent.name for f in enrolled])
    for row, probe, emb in zip(rows, probes, _chip_descriptors(model, probes)):
        d = np.linalg.norm(g - emb, axis=1)
        per = {p: d[names == p].min() for p in set(names)}
        ranked = sorted(per, key=per.get)
        assert [row["person_1"], row["person_2"]] == ranked[:2]
        assert abs(float(row["distance_1"]) - per[ranked[0]]) < 10 * ATOL
        assert row["identity"] == (ranked[0] if per[ranked[0]] < RUN_THRESHOLD else "unknown")
        assert row["status"] == "ok" and row["face"] == "0" and row["left"] == ""
    assert [r["identity"] for r in rows[:4]] == [p.parent.name for p in probes[:4]]
    assert rows[4]["identity"] == "unknown"
    assert f"at threshold {RUN_THRESHOLD:.4f}" in capsys.readouterr().out
    assert cli.main(args) == 2                                # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0


def test_identify_every_face_of_a_group_photo_to_stdout(tmp_path, shared_dir, capsys):
    gallery, _ = _gallery(tmp_path)
    group = shared_dir / "data" / "faces" / "2008_002470.jpg"
    assert cli.main(["identify", "--gallery", str(gallery), str(group), str(shared_dir / "data" / "faces" / "dogs.jpg"),
                     "--workers", "0", "-q"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert [r["face"] for r in rows] == ["0", "1", "2", "3", "4", "5", ""]
    assert all(r["identity"] == "unknown" and r["left"] for r in rows[:6])   # strangers, boxes given
    assert rows[6]["status"] == "no_face"
    assert "6 faces: 0 identified, 6 unknown" in captured.err


def _partition(labels) -> set[frozenset[int]]:
    groups: dict = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def test_cluster_is_dlibs_chinese_whispers_as_folders_of_links(tuned_run, tmp_path, capsys):
    import dlib
    model = tuned_run / "model.dat"
    out = tmp_path / "out"
    assert cli.main(["cluster", str(SAMPLE), "-o", str(out), "--model", str(model), "--workers", "0", "-q"]) == 0
    files = sorted(SAMPLE.glob("*/*.jpg"))
    ref = dlib.chinese_whispers_clustering([dlib.vector(v.tolist()) for v in _chip_descriptors(model, files)],
                                           RUN_THRESHOLD)
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert _partition(r["cluster"] for r in rows) == _partition(ref)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == RUN_THRESHOLD and summary["faces"] == len(files)
    sizes = [c["faces"] for c in summary["clusters"]]
    assert sizes == sorted(sizes, reverse=True)
    for r in rows:
        link = out / r["cluster"] / Path(r["file"]).name
        assert link.is_symlink() and Path(os.readlink(link)) == Path(r["file"]).absolute()
    assert "clusters" in capsys.readouterr().out


def test_cluster_every_face_of_photos_matches_dlib(tmp_path, shared_dir):
    """Photos with several faces: each face is clustered; a photo is linked from each cluster
    that holds one of its faces."""
    import dlib
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("2008_002470.jpg", "2008_007676.jpg", "dogs.jpg"):
        (photos / name).symlink_to(shared_dir / "data" / "faces" / name)
    out = tmp_path / "out"
    assert cli.main(["cluster", str(photos), "-o", str(out), "--workers", "0", "-q"]) == 0
    detector = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(assets.landmarks5_path()))
    net = dlib_net(assets.face_model_path())
    ref = {}
    for name in ("2008_002470.jpg", "2008_007676.jpg"):
        img = dlib.load_rgb_image(str(photos / name))
        for d in detector(img, 1):
            ref[name, d.left(), d.top(), d.right(), d.bottom()] = net.compute_face_descriptor(img, sp(img, d))
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert rows[-1]["status"] == "no_face" and rows[-1]["file"].endswith("dogs.jpg")
    keys = [(Path(r["file"]).name, *(int(r[k]) for k in ("left", "top", "right", "bottom"))) for r in rows[:-1]]
    assert sorted(keys) == sorted(ref)                  # dlib's detections, every one
    labels = dlib.chinese_whispers_clustering([ref[k] for k in keys], 0.6)
    assert _partition(r["cluster"] for r in rows[:-1]) == _partition(labels)
    for r in rows[:-1]:
        assert (out / r["cluster"] / Path(r["file"]).name).is_symlink()


def test_cluster_never_deletes_user_files(tmp_path, capsys):
    src = tmp_path / "chips"
    src.mkdir()
    for f in _sample("John_Salley")[:2]:
        (src / f.name).symlink_to(f)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    base = ["cluster", str(src), "--workers", "0", "-q", "--engine", "dlib"]
    assert cli.main(base + ["-o", str(mine), "--overwrite"]) == 2
    assert "not written by dlibbridge cluster" in capsys.readouterr().err
    assert cli.main(base + ["-o", str(src / "out")]) == 2           # inside an input folder
    out = tmp_path / "out"
    assert cli.main(base + ["-o", str(out)]) == 0
    assert cli.main(base + ["-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(base + ["-o", str(out), "--overwrite"]) == 0     # its own result: replaced
    (out / "cluster_000" / "photo.jpg").write_text("a user's file")  # not a link
    assert cli.main(base + ["-o", str(out), "--overwrite"]) == 2
    assert (out / "cluster_000" / "photo.jpg").read_text() == "a user's file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert all(f.exists() for f in _sample("John_Salley")[:2])


def test_an_absent_device_is_one_clear_line(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    a, b = _sample("John_Salley")[:2]
    assert cli.main(["compare", str(a), str(b), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and "Traceback" not in err
    from dlibbridge.port.device import resolve_device
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("argv,words", [
    (["--engine", "dlib", "--model", "MODEL_PT"], "the dlib engine runs dlib .dat files"),
    (["--model", "SUMMARY"], "cannot load"),
])
def test_bad_models_are_one_clear_line(tuned_run, argv, words, capsys):
    a, b = _sample("John_Salley")[:2]
    argv = [x.replace("MODEL_PT", str(tuned_run / "model.pt")).replace("SUMMARY", str(tuned_run / "summary.json"))
            for x in argv]
    for cmd in (["compare", str(a), str(b)], ["cluster", str(a), "-o", "never"],
                ["identify", "--gallery", str(SAMPLE), str(a)]):
        assert cli.main(cmd + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not Path("never").exists()
