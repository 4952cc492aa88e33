"""Evaluation: pairs files, metrics with known answers (cross-checked against scikit-learn),
identification, engines, the cache, the report, and the end-to-end proof that dlib's own
package and the torch port give the same numbers on aligned celeba-dev photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dlibbridge.eval import embedders as emb
from dlibbridge.eval import evaluate as ev
from dlibbridge.eval import pairs as pr





# ---------------------------------------------------------------------------- pairs files



















# ---------------------------------------------------------------------------- metrics, known answers

# same-person distances 0.1 0.2 0.3 0.7; different-person 0.5 0.8 0.9 1.0












# ---------------------------------------------------------------------------- identification





# ---------------------------------------------------------------------------- engines and cache













# ---------------------------------------------------------------------------- end to end

def _subset(src: Path, dst: Path, n_ids: int, per_id: int) -> Path:
    """The first ``n_ids`` identities with >= per_id photos, ``per_id`` photos each (copied:
    the alignment pipeline works on a whole folder)."""
    taken = 0
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.jpg"))
        if len(files) >= per_id:
            (dst / d.name).mkdir(parents=True)
            for f in files[:per_id]:
                shutil.copy(f, dst / d.name / f.name)
            taken += 1
            if taken == n_ids:
                return dst
    raise AssertionError("not enough identities")


@pytest.fixture(scope="module")
def celeba_eval(shared_dir, tmp_path_factory):
    """300 generated pairs (10 folds) over 20 celeba-dev identities x 6 loose crops, aligned
    by the pipeline, embedded by dlib's package and by the torch port in one run."""
    tmp = tmp_path_factory.mktemp("celeba")
    data = _subset(shared_dir / "data" / "celeba-dev", tmp / "data", 20, 6)
    cfg = ev.EvalConfig(models=[emb.ModelSpec.parse("dlib:default"), emb.ModelSpec.parse("torch:default")],
                        data=data, gen_pairs=300, seed=0, report=tmp / "report", cache_dir=tmp / "cache",
                        workers=2, progress=False)
    return cfg, ev.run(cfg)


def test_dlib_and_torch_port_give_the_same_numbers_on_celeba_dev(celeba_eval):
    cfg, res = celeba_eval
    img = res.results["images"]
    assert (img["total"], img["not_in_pairs"]) == (119, 1)           # the pairs name 119 of the 120 photos
    assert img["detected"] + img["fallback"] == 119
    d, t = res.results["models"]
    assert (d["engine"], t["engine"]) == ("dlib", "torch")
    assert d["n_pairs"] == t["n_pairs"] == 300 and d["skipped_pairs"] == 0
    assert d["accuracy"] < 1.0, "a test that cannot fail proves nothing: this set must have errors"
    exact = ["accuracy", "accuracy_std", "accuracy_at_0.6", "accuracy_at_best_threshold", "auc", "eer", "tar_at_far"]
    for k in exact:
        assert d[k] == t[k], k                        # to the last digit
    assert d["folds"]["accuracy"] == t["folds"]["accuracy"]
    np.testing.assert_allclose(d["folds"]["threshold"], t["folds"]["threshold"], atol=1e-5)
    for k in ("best_threshold", "eer_threshold"):
        assert d[k] == pytest.approx(t[k], abs=1e-5)
    assert d["identification"] == t["identification"] or (
        d["identification"]["rank1"] == t["identification"]["rank1"]
        and d["identification"]["clustering"]["n_clusters"] == t["identification"]["clustering"]["n_clusters"])
    np.testing.assert_array_equal(res.outcomes[0].decided_same, res.outcomes[1].decided_same)
    np.testing.assert_allclose(res.outcomes[0].dist, res.outcomes[1].dist, atol=1e-5)


def test_results_json_schema(celeba_eval):
    cfg, res = celeba_eval
    on_disk = json.loads(res.results_file.read_text())
    assert res.results_file == cfg.report / "results.json"
    assert on_disk["schema_version"] == 1
    assert on_disk["pairs"]["n_folds"] == 10 and on_disk["pairs"]["per_fold"] == 15
    assert on_disk["pairs"]["generated"] == {"n": 300, "seed": 0}
    assert Path(on_disk["pairs"]["file"]).is_file()       # generated pairs are kept for reuse
    for m in on_disk["models"]:
        for key in ("name", "accuracy", "accuracy_std", "accuracy_at_0.6", "auc", "eer", "eer_threshold",
                    "best_threshold", "folds", "skipped_pairs", "identification"):
            assert key in m
        assert set(m["tar_at_far"]) == {"1e-3", "1e-4"}
        assert len(m["folds"]["accuracy"]) == 10
        assert m["accuracy"] == pytest.approx(np.mean(m["folds"]["accuracy"]))
        assert set(m["identification"]) == {"rank1", "n_probes", "n_gallery", "clustering"}
        assert m["identification"]["n_probes"] == 99         # 119 images in pairs, one gallery image per person


def test_report_files(celeba_eval):
    import cv2
    from dlibbridge.eval.report import write_report
    cfg, res = celeba_eval
    html = write_report(res, cfg.report)
    out = cfg.report
    assert html == out / "report.html"
    for name in ("roc.png", "distances.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
    errors = sorted((out / "errors").rglob("*.png"))
    assert errors, "the celeba subset has mistakes; they must be shown"
    for f in errors:
        img = cv2.imread(str(f))
        assert img.shape == (150, 306, 3)                 # two chips and a gutter
    md = (out / "report.md").read_text()
    page = html.read_text()
    for f in ["roc.png", "distances.png"] + [str(p.relative_to(out)) for p in errors]:
        assert f"({f})" in md and f"src='{f}'" in page
    assert "dlib_face_recognition_resnet_model_v1 [dlib]" in md and "dlib_face_recognition_resnet_model_v1 [torch]" in page


def test_reusing_generated_pairs_and_refusing_to_overwrite(celeba_eval, tmp_path):
    cfg, res = celeba_eval
    pairs_file = Path(res.results["pairs"]["file"])
    again = ev.run(ev.EvalConfig(models=[emb.ModelSpec.parse("torch:default")], data=cfg.data, pairs=pairs_file,
                                 out=tmp_path / "r.json", cache_dir=cfg.cache_dir, progress=False,
                                 identification=False))
    assert again.results["models"][0]["accuracy"] == res.results["models"][1]["accuracy"]
    assert again.results["models"][0]["identification"] is None
    other = tmp_path / "mine.txt"
    other.write_text("1\nA\t1\t2\nA\t1\tB\t1\n")
    with pytest.raises(FileExistsError, match="differs"):
        ev.run(ev.EvalConfig(models=[emb.ModelSpec.parse("torch:default")], data=cfg.data, pairs=other,
                             gen_pairs=300, cache_dir=cfg.cache_dir, progress=False))
    assert other.read_text() == "1\nA\t1\t2\nA\t1\tB\t1\n"


def test_cli_evaluate_on_johns(tmp_path, johns_dir, capsys):
    from dlibbridge.cli import main
    rc = main(["evaluate", "default", "--data", str(johns_dir), "--gen-pairs", "40", "--folds", "2",
               "--json", str(tmp_path / "r.json"),      # the older spelling of -o, still accepted
               "--pairs", str(tmp_path / "p.txt"),
               "--cache", str(tmp_path / "cache"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "acc 2-fold" in out and "dlib_face_recognition_resnet_model_v1 [torch]" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == {"total": 45, "chip": 45, "detected": 0, "fallback": 0, "failed": 0, "not_in_pairs": 10}
    assert pr.read_pairs(tmp_path / "p.txt").n_folds == 2


def test_cli_evaluate_adapts_the_defaults_to_a_small_set_and_says_so(tmp_path, johns_dir, capsys):
    """5 people: the default 10 folds become 2, and 3000 pairs what those folds hold."""
    from dlibbridge.cli import main
    rc = main(["evaluate", "default", "--data", str(johns_dir), "--gen-pairs", "3000", "-q",
               "-o", str(tmp_path / "r.json"), "--cache", str(tmp_path / "cache")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "note: --folds 10 lowered to 2: 5 identities" in cap.err
    assert "note: --gen-pairs 3000 lowered to " in cap.err and "acc 2-fold" in cap.out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pairs"]["n_folds"] == 2 and r["pairs"]["generated"]["n"] == r["pairs"]["n_pairs"] < 3000
    assert Path(r["pairs"]["file"]).name == f"pairs-{r['pairs']['n_pairs']}-seed0.txt"


def test_cli_evaluate_without_pairs_generates_them_from_the_person_folders(tmp_path, johns_dir, capsys):
    """No --pairs and no --gen-pairs: LFW's 6000 pairs asked of the person folders, lowered to
    what 5 people hold, each step said; --json prints the results instead of the table."""
    from dlibbridge.cli import main
    rc = main(["evaluate", "default", "--data", str(johns_dir), "-q", "--json", "-o", str(tmp_path / "r.json"),
               "--cache", str(tmp_path / "cache")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"note: no --pairs given: pairs generated from the person folders of {johns_dir} (as --gen-pairs 6000)" \
        in cap.err
    assert "note: --folds 10 lowered to 2: 5 identities" in cap.err and "note: --gen-pairs 6000 lowered to " in cap.err
    printed = json.loads(cap.out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["pairs"]["n_folds"] == 2 and printed["pairs"]["generated"]["n"] == printed["pairs"]["n_pairs"]
    assert Path(printed["pairs"]["file"]).is_file() and "acc 2-fold" not in cap.out


@pytest.mark.parametrize("model, extra, words", [
    ("default", ["--pairs", "{bad}"], "bad.txt:1: header"),
    ("default", ["--json", "{good}"], "--json is a switch"),
    ("default", ["--gen-pairs", "40", "--json", "x.json"], "--json PATH and -o both"),
    ("default", ["--gen-pairs", "30"], "multiple of 20"),
    ("default", ["--pairs", "{missing}"], "not found"),
    ("default", ["--pairs", "{wrong_person}"], "John_Stockton"),
    ("{garbage}", ["--pairs", "{good}", "--engine", "dlib"], "dlib cannot load"),
    ("{garbage}", ["--pairs", "{good}"], "garbage.dat"),
    ("{missing}", ["--pairs", "{good}"], "model file"),
])
def test_cli_evaluate_bad_input_is_a_clear_error(tmp_path, johns_dir, capsys, model, extra, words):
    from dlibbridge.cli import main
    files = {"bad": "hello\n", "good": "1\nJohn_Salley\t1\t2\nJohn_Salley\t1\tJohn_Savage\t1\n",
             "wrong_person": "1\nJohn_Salley\t1\t2\nJohn_Salley\t1\tJohn_Stockton\t1\n",
             "garbage": "\x01\x02 not a dlib network"}
    paths = {k: tmp_path / (k + (".dat" if k == "garbage" else ".txt")) for k in list(files) + ["missing"]}
    for k, text in files.items():
        paths[k].write_text(text)
    rc = main(["evaluate", model.format(**paths), "--data", str(johns_dir), "--no-cache", "-q",
               "-o", str(tmp_path / "r.json")] + [a.format(**paths) for a in extra])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_pairs_file_aligns_and_embeds_only_the_images_it_names(shared_dir, tmp_path, capsys):
    """3 people x 3 photos, a pairs file naming 4 of the 9: the alignment and the
    descriptors cover those 4, and one line says how many were left out."""
    from dlibbridge.cli import main
    from dlibbridge.data.align import read_manifest
    data = _subset(shared_dir / "data" / "celeba-dev", tmp_path / "data", 3, 3)
    a, b, c = sorted(p.name for p in data.iterdir())
    fa, fb = sorted((data / a).iterdir()), sorted((data / b).iterdir())
    (tmp_path / "p.txt").write_text(f"2\n{a}\t{fa[0].name}\t{fa[1].name}\n{b}\t{fb[0].name}\t{fb[1].name}\n"
                                    f"{a}\t{fa[0].name}\t{b}\t{fb[0].name}\n{a}\t{fa[1].name}\t{b}\t{fb[1].name}\n")
    rc = main(["evaluate", "default", "--data", str(data), "--pairs", str(tmp_path / "p.txt"), "-q",
               "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("are in no pair") == 1 and "5 of the 9 images" in err, err
    (manifest,) = (tmp_path / "cache" / "chips").glob("*/manifest.csv")
    assert sorted(r["source"] for r in read_manifest(manifest)) == sorted(
        f"{p.parent.name}/{p.name}" for p in (fa[0], fa[1], fb[0], fb[1]))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"]["total"] == 4 and r["images"]["not_in_pairs"] == 5
    assert r["models"][0]["identification"]["n_probes"] + r["models"][0]["identification"]["n_gallery"] == 4


def test_report_labels_same_named_models_apart_and_keeps_files_it_did_not_write(tmp_path, johns_dir, face_model_path,
                                                                                   capsys):
    """Two model.dat in different folders get two rows and two errors folders; a rerun into
    the report folder replaces only its own files, and a user's file there is refused before
    any work, untouched."""
    from dlibbridge.cli import main
    from dlibbridge.eval.report import MANIFEST
    for d in ("run", "cam"):
        (tmp_path / d).mkdir()
        shutil.copy(face_model_path, tmp_path / d / "model.dat")
    rep = tmp_path / "rep"
    argv = ["evaluate", str(tmp_path / "run/model.dat"), str(tmp_path / "cam/model.dat"), "--data", str(johns_dir),
            "--gen-pairs", "40", "--folds", "2", "-q", "--cache", str(tmp_path / "cache"), "--report", str(rep),
            "--no-identification"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "run/model.dat [torch]" in out and "cam/model.dat [torch]" in out
    md = (rep / "report.md").read_text()
    assert "## Worst mistakes: run/model.dat [torch]" in md and "## Worst mistakes: cam/model.dat [torch]" in md
    assert (rep / MANIFEST).is_file()
    assert main(argv) == 0, capsys.readouterr().err         # its own files are replaced
    capsys.readouterr()
    mine = rep / "errors" / "run_model.dat_torch" / "false_accept_99.png"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"my own picture")
    before = {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mine) in err and "refusing to replace it" in err, err
    assert {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------- worker processes

def test_loading_in_worker_processes_gives_what_the_serial_path_gives(shared_dir, johns_dir, tmp_path, face_model_path,
                                                                      monkeypatch):
    """Photos to align, aligned chips, an unreadable file and a copy of a photo, in batches
    that cut across the workers' tasks: the same descriptors (bit for bit), statuses, chips and
    manifest with 2 workers as with none; a second run reads the chips the first aligned."""
    data = _subset(shared_dir / "data" / "celeba-dev", tmp_path / "data", 3, 3)
    shutil.copytree(johns_dir / "John_Salley", data / "John_Salley")
    first = sorted(data.glob("*/*.jpg"))[0]
    copy = first.with_name("copy_of_first.jpg")
    shutil.copy(first, copy)
    (data / "John_Salley" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths = sorted(p for p in data.glob("*/*") if p.is_file())
    monkeypatch.setattr(ev.ChipSource, "CHUNK", 3)
    runs = {}
    for workers in (0, 2):
        loader = ev.ChipSource(data, tmp_path / f"chips{workers}", workers=workers)
        embedder = emb.make_embedder(emb.ModelSpec.parse(str(face_model_path)), batch_size=4)
        (e,), status = ev.compute_embeddings(paths, [embedder], loader, None, batch_size=5, progress=False)
        runs[workers] = e, status, loader
    (serial, status, loader0), (parallel, status2, loader2) = runs[0], runs[2]
    assert status == status2
    assert {"chip", "detected"} <= set(status) and any(s.startswith("failed:") for s in status), status
    np.testing.assert_array_equal(serial, parallel)              # NaN rows in the same places
    np.testing.assert_array_equal(serial[paths.index(first)], serial[paths.index(copy)])
    m0, m2 = ((d / "manifest.csv").read_text() for d in (loader0.chips_dir, loader2.chips_dir))
    assert m0 == m2 and m0.count("\n") == 1 + 10                  # header, the 9 photos and the broken file
    chips = sorted(loader0.chips_dir.rglob("*.png"))
    assert len(chips) == 9
    for chip in chips:
        assert chip.read_bytes() == (loader2.chips_dir / chip.relative_to(loader0.chips_dir)).read_bytes()
    journal = next(loader0.chips_dir.glob(".align/journal.jsonl"))
    before = journal.read_text()
    rest = [p for p in paths if p != copy]
    for workers in (0, 2):                                         # the chips are read, nothing is aligned again
        loaded = list(ev.ChipSource(data, loader0.chips_dir, workers=workers).load(rest))
        assert [s for _, s in loaded] == [s for p, s in zip(paths, status) if p != copy]
        got = np.stack([c for c, _ in loaded if c is not None])
        assert len(got) == len(rest) - 1
    assert journal.read_text() == before


def test_evaluate_without_workers_gives_the_same_numbers(celeba_eval, tmp_path):
    """The celeba-dev run (2 workers aligning while the network runs) again, serially, from
    an empty cache: every number of results.json is the same."""
    cfg, res = celeba_eval
    serial = ev.run(ev.EvalConfig(models=[emb.ModelSpec.parse("torch:default")], data=cfg.data,
                                  pairs=Path(res.results["pairs"]["file"]), out=tmp_path / "r.json",
                                  cache_dir=tmp_path / "cache", workers=0, progress=False))
    assert serial.results["images"] == res.results["images"]
    assert serial.results["models"][0] == res.results["models"][1]


@pytest.mark.slow
def test_evaluate_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path, shared_dir, ctrl_c_popen):
    """A real Ctrl-C (SIGINT to the whole process group) while 2 workers align: one line, no
    traceback from any process, the aligned photos kept; the rerun aligns only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time
    data = _subset(shared_dir / "data" / "celeba-dev", tmp_path / "data", 10, 6)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dlibbridge", "evaluate", "default", "--data", str(data), "--gen-pairs", "100",
           "--folds", "5", "--cache", str(cache), "-o", str(tmp_path / "r.json"), "--workers", "2", "-q",
           "--batch-size", "8"]
    repo = Path(__file__).resolve().parents[1]
    proc = ctrl_c_popen(cmd, cwd=repo)
    deadline = time.time() + 120
    journal = None
    while time.time() < deadline and proc.poll() is None:
        found = list(cache.glob("chips/*/.align/journal.jsonl"))
        if found and found[0].stat().st_size > 0:
            journal = found[0]
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert journal is not None and proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    done = len(journal.read_text().splitlines())
    assert 0 < done < 60
    rerun = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lines = journal.read_text().splitlines()           # every photo aligned once, over the two runs
    r = json.loads((tmp_path / "r.json").read_text())
    assert len({json.loads(line)["source"] for line in lines}) == len(lines) == r["images"]["total"]


def test_evaluate_under_torchrun_equals_one_process(shared_dir, tmp_path):
    """Photos aligned and embedded by 2 CPU processes (gloo), each its share; rank 0 gathers:
    the numbers and the descriptor cache are one process's, and the ranks' own cache files are
    folded into the shared one."""
    from conftest import torchrun
    from dlibbridge import cli
    data = _subset(shared_dir / "data" / "celeba-dev", tmp_path / "data", 4, 3)
    common = ["default", "--data", str(data), "--gen-pairs", "20", "--folds", "2", "--batch-size", "4", "-q",
              "--workers", "0"]
    assert cli.main(["evaluate", *common, "--cache", str(tmp_path / "c1"), "--json", str(tmp_path / "r1.json")]) == 0
    p = torchrun("evaluate", *common, "--cache", "c2", "--json", "r2.json", cwd=tmp_path)
    assert p.stdout.count("results: r2.json") == 1
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("r1.json", "r2.json"))
    assert r1["images"] == r2["images"] and r1["images"]["detected"] > 0
    for m1, m2 in zip(r1["models"], r2["models"]):
        assert {k: v for k, v in m1.items() if k != "path"} == {k: v for k, v in m2.items() if k != "path"}
    (c1,), (c2,) = ((tmp_path / c / "embeddings").glob("*.npz") for c in ("c1", "c2"))
    assert c1.name == c2.name and not list((tmp_path / "c2" / "embeddings").glob("*rank*"))
    with np.load(c1) as a, np.load(c2) as b:
        k1, k2 = a["keys"].tolist(), b["keys"].tolist()
        assert sorted(k1) == sorted(k2)
        np.testing.assert_array_equal(a["embeddings"][np.argsort(k1)], b["embeddings"][np.argsort(k2)])
    assert sorted(d.name.rsplit(".", 1)[1] for d in (tmp_path / "c2" / "chips").iterdir()) == ["rank0of2", "rank1of2"]


def test_cli_evaluate_enrolled_photos_against_camera_probes(tmp_path, johns_dir, capsys):
    """--probes: the johns as a 40-pixel gray camera takes them.  Every enrolled photo against
    every probe but its own picture; identification in a gallery of one photo per person."""
    import cv2
    from dlibbridge.cli import main
    from dlibbridge.data import augment
    probes = tmp_path / "camera"
    for f in sorted(johns_dir.glob("*/*.jpg")):
        (probes / f.parent.name).mkdir(parents=True, exist_ok=True)
        chip = cv2.imread(str(f))
        cv2.imwrite(str(probes / f.parent.name / (f.stem + ".png")), augment.down_up(augment.to_grayscale(chip), 40))
    rc = main(["evaluate", "default", "--data", str(johns_dir), "--gen-pairs", "40", "--folds", "2",
               "--probes", str(probes), "--json", str(tmp_path / "r.json"), "--pairs", str(tmp_path / "p.txt"),
               "--cache", str(tmp_path / "cache"), "-q"])
    assert rc == 0
    assert "enrolled (--data) vs probe (--probes): TAR@1e-3" in capsys.readouterr().out
    ep = json.loads((tmp_path / "r.json").read_text())["models"][0]["enrolled_vs_probe"]
    v, i = ep["verification"], ep["identification"]
    assert ep["n_probe_images"] == ep["n_probes_embedded"] == 55
    assert v["n_pairs"] == 45 * 55 - 45                 # 45 enrolled photos (those of the pairs), own picture out
    assert i["n_gallery"] == 5 and i["n_probes"] == 55 - 5
    assert 0.5 < i["rank1"] <= 1 and 0 <= i["tpir"] <= i["rank1"] and 0.5 < v["accuracy_at_0.6"] <= 1
    assert main(["evaluate", "default", "--data", str(johns_dir), "--gen-pairs", "40", "--folds", "2",
                 "--probes", str(tmp_path / "none"), "--json", str(tmp_path / "r2.json"),
                 "--pairs", str(tmp_path / "p.txt"), "--cache", str(tmp_path / "cache"), "-q"]) == 2
