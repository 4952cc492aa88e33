"""End to end on the CPU with a tiny budget: estimate a camera from degraded chips, fine-tune for
it (``finetune --camera``, the cross-quality recipe), and check what the run writes: both
validation domains, the selection rule, the recommended threshold, a model.dat that dlib loads and
that gives the torch model's descriptors, and resume of a finished run."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import torch
import pytest

from dlibbridge import cli
from dlibbridge.data import augment, camera


@pytest.fixture(scope="module")
def camera_json(tmp_path_factory, johns_chips):
    """A camera profile measured on the johns chips taken by a gray, 40-pixel camera."""
    d = tmp_path_factory.mktemp("cam")
    (d / "chips").mkdir()
    for i, chip in enumerate(johns_chips[2][::3]):
        out = augment.down_up(augment.to_grayscale(chip), 40)
        cv2.imwrite(str(d / "chips" / f"{i:03d}.png"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
    path = d / "camera.json"
    camera.write_camera(camera.measure_folder(d / "chips"), path)
    return path


def test_camera_finetune_end_to_end(tmp_path, johns_dir, camera_json, capsys):
    run = tmp_path / "run"
    args = ["finetune", str(johns_dir), "--out", str(run), "--camera", str(camera_json), "-P", "2", "-K", "2",
            "--max-steps", "4", "--checkpoint-every", "2", "--camera-versions", "2", "--val-identities", "2",
            "--match-threshold", "0.6", "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "recommended distance threshold" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 4
    assert summary["export_check"]["max_abs_diff"] <= 1e-5
    assert set(summary["domains"]) == {"clean", "camera"}
    # the exported step is one whose clean TAR@FAR is within the limit of the base's
    base = summary["domains"]["clean"]["base"]["tar@far"]
    assert summary["domains"]["clean"]["exported"]["tar@far"] >= base - 0.01 - 1e-12
    with open(run / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    # the recipe exports the last step unless it fails the clean guard (then the selected one)
    last_ok = float(rows[-1]["clean.tar@far"]) >= float(rows[0]["clean.tar@far"]) - 0.01 - 1e-12
    assert (summary["exported_step"] == 4) == last_ok
    assert {"clean.tar@far", "camera.tar@far", "camera.accuracy_at_0.6", "camera.best_threshold"} <= set(rows[0])
    thr = json.loads((run / "threshold.json").read_text())
    assert 0 < thr["threshold"] < 2 and thr["domain"] == "camera"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["freeze_until"] == "none" and cfg["config"]["optimizer"] == "adamw"
    assert cfg["recipe"]["train_from"] == "stem" and cfg["recipe"]["train_until"] is None
    for f in ("model.dat", "model.pt", "curves.png", "log.csv", "feature_cache.pt"):
        assert (run / f).is_file(), f
    # the exported descriptors are scaled so that 0.6 is the best threshold on the held-out people
    from dlibbridge.port.checkpoint import load_torch
    scaling = summary["distance_scale"]
    assert scaling["match_threshold"] == 0.6 and scaling["domains"] == ["clean", "camera"]
    assert abs(scaling["scale"] - 0.6 / scaling["best_threshold_before"]) < 1e-12
    exported = load_torch(run / "model.pt")
    selected = torch.load(run / "best_state.pt", weights_only=True) if summary["exported_step"] == summary["best"]["step"] \
        else torch.load(run / "checkpoint.pt", weights_only=False)["trainer"]["student"]
    assert torch.allclose(exported.fc.weight, selected["fc.weight"] * scaling["scale"], rtol=1e-6, atol=0)
    assert torch.equal(exported.stem.unit.conv.weight, selected["stem.unit.conv.weight"])
    # a finished run resumes to the same export
    assert cli.main(["finetune", "--resume", str(run), "--quiet"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["exported_step"] == summary["exported_step"]
    assert again["domains"] == summary["domains"]


def test_camera_finetune_refusals(tmp_path, johns_dir, camera_json, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r1"), "--camera", str(bad)]) == 2
    assert "camera" in capsys.readouterr().err
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r2"), "--target-photos", str(johns_dir)]) == 2
    assert "--camera" in capsys.readouterr().err
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r3"), "--select-metric", "camera:tar@far"]) == 2
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r6"), "--export", "last-eligible"]) == 2
    assert "last-eligible" in capsys.readouterr().err
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r4"), "--camera", str(camera_json),
                     "--freeze-until", "level0"]) == 2
    assert "level0" in capsys.readouterr().err
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r5"), "--camera", str(camera_json),
                     "--freeze-until", "level3", "--train-until", "level4"]) == 2
    assert "--train-until" in capsys.readouterr().err
    assert [r for r in ("r1", "r2", "r3", "r4", "r5", "r6") if (tmp_path / r).exists()] == []


def test_a_small_set_lowers_the_recipes_identities_per_batch(capsys):
    """8 people cannot fill the recipe's 16 per batch with 2 held out: 6, said; 30 people keep 16."""
    from types import SimpleNamespace
    from dlibbridge.train.camera_finetune import _fit_identities_per_batch
    from dlibbridge.train.config import FinetuneConfig
    cfg = FinetuneConfig.for_camera("data", "run", "camera.json")
    small = _fit_identities_per_batch(cfg, SimpleNamespace(labels=np.repeat(np.arange(8), 5)))
    assert small.identities_per_batch == 6
    assert "note: -P lowered from 16 to 6" in capsys.readouterr().err
    assert _fit_identities_per_batch(cfg, SimpleNamespace(labels=np.repeat(np.arange(30), 5))) is cfg


def _chip_folder(root, johns_dir, people, chips):
    """DIR/<person>/<chip> with the johns chips ``chips`` (a slice) of each of ``people``."""
    import shutil
    for person in people:
        (root / person).mkdir(parents=True)
        for f in sorted((johns_dir / person).glob("*.jpg"))[chips]:
            shutil.copyfile(f, root / person / f.name)
    return root


def test_target_val_is_a_validation_and_selection_domain(tmp_path, johns_dir, camera_json):
    """Labeled target chips scored at every validation, selected on by default.  The johns set has
    only 5 people, so the target chips here are other chips of 2 of DATA's people (a real
    --target-val holds people DATA does not have); the test checks the plumbing, not a gain."""
    people = sorted(p.name for p in johns_dir.iterdir() if p.is_dir())
    data = _chip_folder(tmp_path / "data", johns_dir, people, slice(0, 7))
    target = _chip_folder(tmp_path / "target", johns_dir, people[:2], slice(7, None))
    run = tmp_path / "run"
    args = ["finetune", str(data), "--out", str(run), "--camera", str(camera_json), "--target-val", str(target),
            "-P", "2", "-K", "2", "--max-steps", "4", "--checkpoint-every", "2", "--camera-versions", "2",
            "--val-identities", "2", "--quiet"]
    assert cli.main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["domains"]) == {"clean", "camera", "target"}
    base = summary["domains"]["target"]["base"]
    n = sum(len(list((target / p).iterdir())) for p in people[:2])
    assert base["pairs_same"] + base["pairs_different"] == n * (n - 1) // 2
    assert summary["best"]["metric"] == "target.tar@far"
    assert summary["recommended_threshold"]["domain"] == "target"
    clean = summary["domains"]["clean"]
    assert clean["exported"]["tar@far"] >= clean["base"]["tar@far"] - 0.01 - 1e-12
    with open(run / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    # the recipe exports the last step unless it fails the clean guard (then the selected one)
    last_ok = float(rows[-1]["clean.tar@far"]) >= float(rows[0]["clean.tar@far"]) - 0.01 - 1e-12
    assert (summary["exported_step"] == 4) == last_ok
    assert {"target.tar@far", "target.accuracy_at_0.6", "target.accuracy", "target.best_threshold"} <= set(rows[0])
    # the exported step has the best target TAR@FAR among the eligible validations
    eligible = [r for r in rows if float(r["clean.tar@far"]) >= float(rows[0]["clean.tar@far"]) - 0.01 - 1e-12]
    assert summary["best"]["score"] == pytest.approx(max(float(r["target.tar@far"]) for r in eligible))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["select_metric"] == "target:tar@far"
    assert cfg["target_val"] == {"folder": str(target), "chips": n, "identities": 2}
    # a finished run resumes from its cached target features to the same export
    assert cli.main(["finetune", "--resume", str(run), "--quiet"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["domains"] == summary["domains"] and again["best"] == summary["best"]


def test_target_val_refusals(tmp_path, johns_dir, camera_json, capsys):
    people = sorted(p.name for p in johns_dir.iterdir() if p.is_dir())
    one = _chip_folder(tmp_path / "one", johns_dir, people[:1], slice(0, 4))
    thin = _chip_folder(tmp_path / "thin", johns_dir, people[:3], slice(0, 1))
    for i, bad in enumerate((tmp_path / "missing", one, thin)):
        run = tmp_path / f"r{i}"
        assert cli.main(["finetune", str(johns_dir), "--out", str(run), "--camera", str(camera_json),
                         "--target-val", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert "--target-val" in err and len(err.splitlines()) == 1, err
        assert not run.exists()
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r3"), "--target-val", str(one)]) == 2
    assert "--camera" in capsys.readouterr().err
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r4"), "--camera", str(camera_json),
                     "--select-metric", "target:tar@far"]) == 2
    assert "--target-val" in capsys.readouterr().err


def test_a_camera_run_trains_on_one_photo_people():
    """A person with one photo cannot be a positive pair of a plain run and is left out there;
    a camera run keeps them (their camera draws are the positives) and still validates only on
    people with two or more."""
    from types import SimpleNamespace
    from dlibbridge.train.config import FinetuneConfig
    from dlibbridge.train.loop import split_identities
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6])      # 4 people with 3, 3 with 1
    store = SimpleNamespace(labels=labels, identities=[f"p{i}" for i in range(7)])
    plain = split_identities(store, FinetuneConfig(data="d", out="o", identities_per_batch=2, val_identities=2), 1)
    cam = split_identities(store, FinetuneConfig.for_camera("d", "o", "c.json", identities_per_batch=2,
                                                            val_identities=2), 1)
    assert plain.dropped_single == ["p4", "p5", "p6"] and not set(labels[plain.train_rows]) & {4, 5, 6}
    assert cam.dropped_single == [] and {4, 5, 6} <= set(labels[cam.train_rows])
    assert np.array_equal(cam.val_rows, plain.val_rows) and not set(labels[cam.val_rows]) & {4, 5, 6}
    assert set(cam.train_classes) == set(labels[cam.train_rows])
