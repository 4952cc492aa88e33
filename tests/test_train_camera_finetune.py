"""End to end on the CPU with a tiny budget: estimate a camera from degraded chips, fine-tune for
it (``finetune --camera``, the cross-quality recipe), and check what the run writes: both
validation domains, the selection rule, the recommended threshold, a model.dat that dlib loads and
that gives the torch model's descriptors, and resume of a finished run."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
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
            "--quiet"]
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
    assert {"clean.tar@far", "camera.tar@far", "camera.accuracy_at_0.6", "camera.best_threshold"} <= set(rows[0])
    thr = json.loads((run / "threshold.json").read_text())
    assert 0 < thr["threshold"] < 2 and thr["domain"] == "camera"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["freeze_until"] == "level3" and cfg["config"]["optimizer"] == "adamw"
    assert cfg["recipe"]["train_from"] == "level2" and cfg["recipe"]["train_until"] == "level2"
    for f in ("model.dat", "model.pt", "curves.png", "log.csv", "feature_cache.pt"):
        assert (run / f).is_file(), f
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
    assert cli.main(["finetune", str(johns_dir), "--out", str(tmp_path / "r4"), "--camera", str(camera_json),
                     "--freeze-until", "none"]) == 2


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
