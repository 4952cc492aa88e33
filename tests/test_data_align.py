"""``align``: chips identical to dlib's own pipeline, descriptors through the torch port equal
to dlib's ``compute_face_descriptor``, the several-faces and no-face policies, bad files,
duplicates, resumability, and the ``align``/``pack`` command lines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from dlibbridge import assets
from dlibbridge.data.align import (AlignError, AlignSettings, Face, align, center_box, choose_faces, list_sources, read_manifest)
from dlibbridge.cli import main as cli_main
from image_zoo import build_zoo, face_crop


def _chip(out: Path, row: dict) -> np.ndarray:
    return cv2.imread(str(out / row["chip"]), cv2.IMREAD_UNCHANGED)[:, :, ::-1]


def _rect(row: dict):
    import dlib
    return dlib.rectangle(*(int(row[k]) for k in ("left", "top", "right", "bottom")))


@pytest.fixture(scope="module")
def dlib_parts():
    import dlib
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(assets.landmarks5_path())))


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory, shared_dir):
    """All faces of dlib's example photos, aligned by 2 worker processes."""
    out = tmp_path_factory.mktemp("faces") / "chips"
    summary = align(shared_dir / "data" / "faces", out, AlignSettings(multi="all"), jobs=2, progress=False)
    return out, summary, read_manifest(out / "manifest.csv")


# ---- the proof: dlib's chips, dlib's descriptors --------------------------------------------

def test_chips_are_dlibs_get_face_chip_for_the_same_detection(faces_run, shared_dir, dlib_parts):
    import dlib
    out, summary, rows = faces_run
    _, sp = dlib_parts
    chips = [r for r in rows if r["chip"]]
    assert len(chips) == summary["chips"] == summary["faces_detected"] > 60
    images = {}
    for r in chips:
        img = images.setdefault(r["source"], dlib.load_rgb_image(str(shared_dir / "data" / "faces" / r["source"])))
        shape = sp(img, _rect(r))
        assert r["landmarks"] == " ".join(f"{p.x} {p.y}" for p in shape.parts())
        np.testing.assert_array_equal(_chip(out, r), dlib.get_face_chip(img, shape, size=150, padding=0.25),
                                      err_msg=r["chip"])


def test_detections_are_dlibs(faces_run, photo_chips, shared_dir, dlib_parts):
    """Per photo, the set of chips equals the one dlib's own detector → landmarks → chip gives
    (conftest's photo_chips), so no face is lost, added or moved; scores are dlib's."""
    import dlib
    out, _, rows = faces_run
    names, dlib_chips = photo_chips
    by_photo: dict[str, list[bytes]] = {}
    for name, chip in zip(names, dlib_chips):
        by_photo.setdefault(name.split("#")[0], []).append(chip.tobytes())
    ours: dict[str, list[bytes]] = {}
    for r in rows:
        if r["chip"]:
            ours.setdefault(r["source"], []).append(_chip(out, r).tobytes())
    assert {k: sorted(v) for k, v in ours.items()} == {k: sorted(v) for k, v in by_photo.items()}
    assert [r["status"] for r in rows if r["source"] == "dogs.jpg"] == ["no_face"]
    detector, _ = dlib_parts
    img = dlib.load_rgb_image(str(shared_dir / "data" / "faces" / "2008_001009.jpg"))
    rects, scores, _ = detector.run(img, 1, 0.0)
    expected = sorted(((r.left(), r.top(), r.right(), r.bottom()), repr(float(s))) for r, s in zip(rects, scores))
    got = sorted(((int(r["left"]), int(r["top"]), int(r["right"]), int(r["bottom"])), r["score"])
                 for r in rows if r["source"] == "2008_001009.jpg")
    assert got == expected


def test_descriptor_of_our_chip_through_the_torch_port_equals_dlibs(faces_run, shared_dir, dlib_parts,
                                                                   face_model_path):
    """dlib.face_recognition_model_v1.compute_face_descriptor(img, shape) — dlib crops its own
    chip inside — against the torch port (dlibbridge.to_torch) on the chip from our PNG.
    Tolerance 1e-5 (absolute, per component); one face per photo to keep the test fast."""
    import dlib
    import torch
    from dlibbridge import to_torch
    out, _, rows = faces_run
    _, sp = dlib_parts
    fr = dlib.face_recognition_model_v1(str(face_model_path))
    firsts = [r for r in rows if r["chip"] and r["face"] == "0"]
    assert len(firsts) == 11
    expected = []
    for r in firsts:
        img = dlib.load_rgb_image(str(shared_dir / "data" / "faces" / r["source"]))
        expected.append(np.array(fr.compute_face_descriptor(img, sp(img, _rect(r)))))
    net = to_torch(face_model_path)
    with torch.no_grad():
        got = net(torch.from_numpy(np.stack([_chip(out, r) for r in firsts]))).numpy()
    assert np.abs(got - np.array(expected)).max() <= 1e-5


# ---- policies -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_faces_dir(tmp_path_factory, shared_dir):
    """2009_004587.jpg (500x400): the larger face is far from the centre, the smaller near it."""
    d = tmp_path_factory.mktemp("two")
    shutil.copy(shared_dir / "data" / "faces" / "2009_004587.jpg", d / "pair.jpg")
    return d


@pytest.mark.parametrize("policy", ["largest", "center", "skip", "all"])
def test_several_faces_policy(two_faces_dir, tmp_path, policy, dlib_parts):
    import dlib
    out = tmp_path / "out"
    align(two_faces_dir, out, AlignSettings(multi=policy), jobs=1, progress=False)
    rows = read_manifest(out / "manifest.csv")
    img = dlib.load_rgb_image(str(two_faces_dir / "pair.jpg"))
    faces = [Face((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in zip(*dlib_parts[0].run(img, 1, 0.0)[:2])]
    assert len(faces) == 2 and all(r["n_faces"] == "2" for r in rows)
    largest = max(faces, key=lambda f: f.area)
    cy, cx = (img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2
    central = min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)
    assert largest is not central, "the photo must tell the two policies apart"
    boxes = [tuple(int(r[k]) for k in ("left", "top", "right", "bottom")) for r in rows if r["chip"]]
    if policy == "skip":
        assert [r["status"] for r in rows] == ["multiple_faces"] and not list(out.glob("*.png"))
    elif policy == "all":
        assert sorted(boxes) == sorted(f.box for f in faces)
        assert sorted(r["chip"] for r in rows) == ["pair.face0.png", "pair.face1.png"]
    else:
        assert boxes == [(largest if policy == "largest" else central).box]
        assert [r["chip"] for r in rows] == ["pair.png"]


def test_choose_faces_ties_and_single_face():
    a, b = Face((0, 0, 9, 9), 1.0), Face((20, 0, 29, 9), 2.0)
    assert choose_faces([a, b], "largest", 10, 30) == [b], "equal areas: higher score"
    assert choose_faces([a], "skip", 10, 30) == [a], "one face is never skipped"


def test_fallback_center_box_is_aligned_with_landmarks(tmp_path, dlib_parts):
    import dlib
    raw = tmp_path / "raw"
    raw.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    cv2.imwrite(str(raw / "noface.png"), noise)
    align(raw, tmp_path / "a", AlignSettings(), jobs=1, progress=False)
    assert [r["status"] for r in read_manifest(tmp_path / "a" / "manifest.csv")] == ["no_face"]
    align(raw, tmp_path / "b", AlignSettings(fallback="center"), jobs=1, progress=False)
    (row,) = read_manifest(tmp_path / "b" / "manifest.csv")
    assert row["status"] == "fallback" and row["score"] == "" and row["n_faces"] == "0"
    box = center_box(250, 250)
    assert tuple(int(row[k]) for k in ("left", "top", "right", "bottom")) == box == (80, 80, 169, 169)
    img = noise[:, :, ::-1].copy()   # cv2 wrote BGR
    expected = dlib.get_face_chip(img, dlib_parts[1](img, dlib.rectangle(*box)), 150, 0.25)
    np.testing.assert_array_equal(_chip(tmp_path / "b", row), expected)


def test_cnn_detector_gives_dlibs_detections_and_chips(tmp_path, shared_dir, dlib_parts):
    import dlib
    raw = tmp_path / "raw"
    raw.mkdir()
    face = face_crop(shared_dir)
    cv2.imwrite(str(raw / "face.png"), face[:, :, ::-1])
    align(raw, tmp_path / "out", AlignSettings(detector="cnn", upsample=0), jobs=1, progress=False)
    (row,) = read_manifest(tmp_path / "out" / "manifest.csv")
    cnn = dlib.cnn_face_detection_model_v1(str(assets.cnn_face_detector_path()))
    (det,) = cnn(face, 0)
    assert row["status"] == "ok" and row["score"] == repr(float(det.confidence))
    assert tuple(int(row[k]) for k in ("left", "top", "right", "bottom")) == (
        det.rect.left(), det.rect.top(), det.rect.right(), det.rect.bottom())
    expected = dlib.get_face_chip(face, dlib_parts[1](face, det.rect), 150, 0.25)
    np.testing.assert_array_equal(_chip(tmp_path / "out", row), expected)


def test_cnn_bfloat16_via_the_cli_is_recorded_and_refused_where_it_cannot_apply(tmp_path, shared_dir, capsys):
    """``--cnn-precision bfloat16`` runs the torch port in bfloat16 (close to dlib, not exact:
    tests/test_port_mmod.py bounds it); the setting is part of the run's settings; with HOG,
    or with dlib's own CNN (no torch factory), it is refused."""
    import dlib
    raw = tmp_path / "raw"
    raw.mkdir()
    face = face_crop(shared_dir)
    cv2.imwrite(str(raw / "face.png"), face[:, :, ::-1])
    out = tmp_path / "out"
    from dlibbridge.port.mmod import cpu_runs_bfloat16
    if not cpu_runs_bfloat16():           # an AVX2 machine: refused before any photo, in one line
        capsys.readouterr()
        assert cli_main(["align", str(raw), str(out), "--detector", "cnn", "--cnn-precision", "bfloat16", "-q"]) == 2
        assert "need a CPU with AVX-512" in capsys.readouterr().err
        return
    assert cli_main(["align", str(raw), str(out), "--detector", "cnn", "--upsample", "0",
                     "--cnn-precision", "bfloat16", "-q"]) == 0
    (row,) = read_manifest(out / "manifest.csv")
    (det,) = dlib.cnn_face_detection_model_v1(str(assets.cnn_face_detector_path()))(face, 0)
    assert row["status"] == "ok" and abs(float(row["score"]) - det.confidence) <= 1e-2
    assert json.loads((out / ".align" / "settings.json").read_text())["cnn_precision"] == "bfloat16"
    with pytest.raises(AlignError, match="other settings .*cnn_precision: 'bfloat16' → 'float32'"):
        align(raw, out, AlignSettings(detector="cnn", upsample=0), jobs=1, progress=False)
    capsys.readouterr()
    assert cli_main(["align", str(raw), str(tmp_path / "o2"), "--cnn-precision", "bfloat16", "-q"]) == 2
    err = capsys.readouterr().err
    assert "applies to the cnn detector only" in err and "Traceback" not in err
    with pytest.raises(AlignError, match="needs the torch port"):
        align(raw, tmp_path / "o3", AlignSettings(detector="cnn", cnn_precision="bfloat16"), progress=False)


def test_settings_of_a_run_before_a_setting_existed_mean_its_default(small_raw, tmp_path):
    out = tmp_path / "out"
    align(small_raw, out, jobs=1, progress=False)
    path = out / ".align" / "settings.json"
    before = json.loads(path.read_text())
    del before["cnn_precision"]
    path.write_text(json.dumps(before))
    assert align(small_raw, out, jobs=1, progress=False)["processed_this_run"] == 0


# ---- a real-world folder: bad files, identities, duplicates; then pack ----------------------

def test_bad_files_are_reported_good_ones_aligned_and_packed(tmp_path, shared_dir):
    raw = tmp_path / "raw"
    zoo = build_zoo(raw / "ann", face_crop(shared_dir))
    (raw / "bob").mkdir()
    shutil.copy(raw / "ann" / "photo.jpg", raw / "bob" / "same_bytes.jpg")
    shutil.copy(shared_dir / "data" / "faces" / "Tom_Cruise_avp_2014_4.jpg", raw / "bob" / "tom.jpg")
    (raw / ".hidden").mkdir()
    (raw / ".hidden" / "x.jpg").write_bytes(b"never listed")
    out = tmp_path / "out"
    summary = align(raw, out, AlignSettings(), jobs=2, progress=False)
    rows = {r["source"]: r for r in read_manifest(out / "manifest.csv")}
    assert set(rows) == {f"ann/{n}" for n in zoo} | {"bob/same_bytes.jpg", "bob/tom.jpg"}
    for name, exp in zoo.items():
        r = rows[f"ann/{name}"]
        assert r["identity"] == "ann"
        if exp.reason:
            assert (r["status"], r["reason"]) == ("error", exp.reason), (name, r["note"])
            assert r["note"], name
        elif exp.face:
            assert r["status"] == "ok", (name, r["status"], r["note"])
            assert _chip(out, r).shape == (150, 150, 3)
        else:
            assert r["status"] in ("ok", "no_face"), name
    assert rows["bob/same_bytes.jpg"]["status"] == "duplicate"
    assert rows["bob/same_bytes.jpg"]["duplicate_of"] == "ann/photo.jpg"
    assert rows["ann/photo_exif6.jpg"]["orientation"] == "6"
    bad_reasons = [e.reason for e in zoo.values() if e.reason]
    for reason in set(bad_reasons):
        assert summary["failures_by_reason"][reason] == bad_reasons.count(reason)
    assert summary["duplicates"] == [["bob/same_bytes.jpg", "ann/photo.jpg"]]
    assert summary["identities_under_2_chips"] == ["bob"] and summary["identities"] == 2
    assert not list(out.rglob(".tmp-*")), "no temporary files left"

    store = cli_pack(out, tmp_path / "st")
    chips = [r for r in read_manifest(out / "manifest.csv") if r["chip"]]
    assert len(store) == len(chips) and store.identities == ["ann", "bob"]
    for i, rel in enumerate(store.paths):
        r = next(c for c in chips if c["chip"] == rel)
        np.testing.assert_array_equal(store.chips[i], _chip(out, r))
        assert store.identities[store.labels[i]] == r["identity"] and store.sources[i] == r["source"]


def cli_pack(chips_dir: Path, store_path: Path):
    from dlibbridge.data.store import ChipStore
    assert cli_main(["pack", str(chips_dir), "-o", str(store_path), "-q"]) == 0
    return ChipStore(store_path)


# ---- resumability ---------------------------------------------------------------------------

@pytest.fixture()
def small_raw(tmp_path, shared_dir):
    raw = tmp_path / "raw"
    for person, name in [("p1", "2008_001009.jpg"), ("p1", "2009_004587.jpg"), ("p2", "2008_002470.jpg")]:
        (raw / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_dir / "data" / "faces" / name, raw / person / name)
    return raw


def test_interrupted_run_resumes_and_finished_run_is_reused(small_raw, tmp_path):
    out = tmp_path / "out"
    done = []

    def stop_after_first(rel):
        done.append(rel)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        align(small_raw, out, jobs=1, progress=False, on_photo=stop_after_first)
    assert not (out / "manifest.csv").exists()
    (out / ".align" / "tmp" / ".tmp-abc2008_002470.png").write_bytes(b"half a chip")   # an interrupted write
    (out / "p2").mkdir(exist_ok=True)
    (out / "p2" / ".tmp-mine.png").write_bytes(b"the user's")      # named like ours, but not in our folder
    summary = align(small_raw, out, jobs=1, progress=False)
    assert summary["processed_this_run"] == 2 and summary["reused_from_earlier_runs"] == 1
    assert not list((out / ".align").rglob(".tmp-*"))
    assert (out / "p2" / ".tmp-mine.png").read_bytes() == b"the user's"
    (out / "p2" / ".tmp-mine.png").unlink()
    manifest = (out / "manifest.csv").read_text()

    fresh = align(small_raw, tmp_path / "fresh", jobs=1, progress=False)
    assert fresh["chips"] == summary["chips"] == 3
    for png in sorted((tmp_path / "fresh").rglob("*.png")):
        assert (out / png.relative_to(tmp_path / "fresh")).read_bytes() == png.read_bytes()

    again = align(small_raw, out, jobs=1, progress=False)
    assert again["processed_this_run"] == 0 and (out / "manifest.csv").read_text() == manifest
    (out / "p1" / "2008_001009.png").unlink()
    assert align(small_raw, out, jobs=1, progress=False)["processed_this_run"] == 1
    shutil.copy(small_raw / "p1" / "2009_004587.jpg", small_raw / "p2" / "2008_002470.jpg")  # content changed
    after = align(small_raw, out, jobs=1, progress=False)
    assert after["processed_this_run"] == 0, "now a duplicate: nothing to process"
    assert after["duplicates"] == [["p2/2008_002470.jpg", "p1/2009_004587.jpg"]]


def test_other_settings_need_redo(small_raw, tmp_path):
    out = tmp_path / "out"
    align(small_raw, out, jobs=1, progress=False)
    with pytest.raises(AlignError, match="upsample: 1 → 0"):
        align(small_raw, out, AlignSettings(upsample=0), jobs=1, progress=False)
    s = align(small_raw, out, AlignSettings(upsample=0), jobs=1, progress=False, redo=True)
    assert s["processed_this_run"] == 3 and s["settings"]["upsample"] == 0
    assert json.loads((out / ".align" / "settings.json").read_text())["upsample"] == 0


# ---- folders, names, command line -----------------------------------------------------------

def test_sources_identities_and_collision_free_chip_names(tmp_path):
    for rel in ["a.jpg", "p/x.jpg", "p/x.png", "p/sub/y.jpeg", "q/z.jpg", ".git/config", "p/.DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = [(s.rel, s.identity, s.chip_stem) for s in list_sources(tmp_path)]
    assert got == [("a.jpg", "", "a"), ("p/sub/y.jpeg", "p", "p/sub/y"), ("p/x.jpg", "p", "p/x.jpg"),
                   ("p/x.png", "p", "p/x.png"), ("q/z.jpg", "q", "q/z")]


def test_output_must_not_overlap_the_input(small_raw, capsys):
    with pytest.raises(AlignError, match="must not be"):
        align(small_raw, small_raw / "chips", progress=False)
    assert cli_main(["align", str(small_raw), str(small_raw), "-q"]) == 2
    assert "must not be" in capsys.readouterr().err
    assert cli_main(["align", str(small_raw / "missing"), str(small_raw.parent / "o"), "-q"]) == 2


def test_cli_align_prints_the_summary(small_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["align", str(small_raw), str(out), "-q", "-j", "1", "--multi", "largest"]) == 0
    text = capsys.readouterr().out
    assert "3 files (identities): 3 chips from 3 photos" in text and "manifest:" in text
    assert json.loads((out / "summary.json").read_text())["settings"]["multi"] == "largest"


def test_unreadable_files_are_retried_by_the_next_run(tmp_path, shared_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "later.jpg").symlink_to(tmp_path / "arrives-later.jpg")
    first = align(raw, tmp_path / "out", jobs=1, progress=False)
    assert first["failures_by_reason"] == {"unreadable": 1}
    shutil.copy(shared_dir / "data" / "faces" / "2008_001009.jpg", tmp_path / "arrives-later.jpg")
    second = align(raw, tmp_path / "out", jobs=1, progress=False)
    assert second["processed_this_run"] == 1 and second["chips"] == 2


def test_a_chip_that_cannot_be_written_stops_the_run(small_raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1").write_text("a file where the chip folder p1/ must go")
    with pytest.raises(AlignError, match="cannot write"):
        align(small_raw, out, jobs=1, progress=False)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path, shared_dir, ctrl_c_popen):
    """A real Ctrl-C (SIGINT to the whole process group) during a 2-process run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    raw = tmp_path / "raw"
    for p in sorted((shared_dir / "data" / "celeba-dev").glob("*/*.jpg"))[:60]:
        (raw / p.parent.name).mkdir(parents=True, exist_ok=True)
        (raw / p.parent.name / p.name).symlink_to(p)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dlibbridge", "align", str(raw), str(out), "-j", "2", "-q"]
    repo = Path(__file__).resolve().parents[1]
    proc = ctrl_c_popen(cmd, cwd=repo)
    journal = out / ".align" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (journal.is_file() and journal.stat().st_size > 0):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    done = len(journal.read_text().splitlines())
    assert 0 < done < 60
    assert not list(out.rglob(".tmp-*")) and not (out / "manifest.csv").exists()
    rerun = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused_from_earlier_runs"] == done and summary["processed_this_run"] == 60 - done


def test_a_killed_worker_is_reported_with_the_photos_in_flight(tmp_path, shared_dir):
    import multiprocessing
    import os
    import signal
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in sorted((shared_dir / "data" / "celeba-dev").glob("*/*.jpg"))[:16]:
        (raw / p.name).symlink_to(p)

    def kill_a_worker(rel):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
            break

    with pytest.raises(AlignError, match="worker process died while processing one of: .*jpg"):
        align(raw, tmp_path / "out", jobs=2, progress=False, on_photo=kill_a_worker)
    rerun = align(raw, tmp_path / "out", jobs=1, progress=False)
    assert rerun["reused_from_earlier_runs"] >= 1 and rerun["files"] == 16


def test_an_empty_folder_is_nothing_to_do_and_no_face_is_a_failure(tmp_path, capsys):
    """Exit 0 means chips were made: an empty RAW_DIR says there was nothing to do, photos
    without a single alignable face exit 2 after the summary."""
    (tmp_path / "raw").mkdir()
    assert cli_main(["align", str(tmp_path / "raw"), str(tmp_path / "out"), "-q"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    cv2.imwrite(str(tmp_path / "raw" / "blank.png"), np.zeros((200, 200, 3), np.uint8))
    assert cli_main(["align", str(tmp_path / "raw"), str(tmp_path / "out2"), "-q"]) == 2
    cap = capsys.readouterr()
    assert "no face could be aligned" in cap.err and "status: " in cap.out


def test_landmarks_on_the_upsampled_photo_place_small_faces_chips_closer(shared_dir):
    """Faces of ~31 px (celeba-dev photos shrunk to 70×70), HOG at upsample 2: with the landmarks
    predicted on the upsampled photo the chip region (dlib's ``get_face_chip_details`` of them,
    moved to the photo) lies nearer the clean photo's (scaled): its centre and its angle.
    Measured on these 7 faces: centre error 0.0099 → 0.0047 of the chip width, angle 0.022 →
    0.011 rad; without the option the chip is ``get_face_chip``'s."""
    import dlib
    from dlibbridge.data.align import FaceAligner

    def region(d, s=1.0):
        r = d.rect
        return (np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2]) + 0.5) * s - 0.5, r.width() * s, d.angle

    clean = FaceAligner("hog", 1)
    plain, upsampled = FaceAligner("hog", 2), FaceAligner("hog", 2, landmarks_upsampled=True)
    errors = {"plain": [], "upsampled": []}
    for f in sorted((shared_dir / "data" / "celeba-dev").glob("*/*.jpg"))[::50][:8]:
        rgb = dlib.load_rgb_image(str(f))
        faces = clean.detect(rgb)
        small = cv2.resize(rgb, (70, 70), interpolation=cv2.INTER_AREA)
        found = plain.detect(small)
        if not faces or not found:
            continue
        centre, width, angle = region(dlib.get_face_chip_details(clean.locate(rgb, faces[0]).shape, 150, 0.25),
                                      70 / rgb.shape[1])
        for name, aligner in (("plain", plain), ("upsampled", upsampled)):
            face = aligner.locate(small, Face(found[0].box, found[0].score))
            details = face.chip_details or dlib.get_face_chip_details(face.shape, 150, 0.25)
            c, _, a = region(details)
            errors[name].append((np.linalg.norm(c - centre) / width, abs(a - angle)))
            chip = aligner.chip(small, face)
            assert chip.shape == (150, 150, 3)
            if name == "plain":
                assert np.array_equal(chip, dlib.get_face_chip(small, face.shape, size=150, padding=0.25))
    assert len(errors["plain"]) >= 5
    plain_err, upsampled_err = np.mean(errors["plain"], axis=0), np.mean(errors["upsampled"], axis=0)
    assert (upsampled_err < 0.7 * plain_err).all(), (plain_err, upsampled_err)
