"""port.calibrate: calibrated unfreeze keeps inference and fixes dlib's training-mode normalisation."""
from __future__ import annotations

import numpy as np
import pytest

import dlib
from dlibbridge import cli
from dlibbridge.codec import tree as fmt
from dlibbridge.codec.rewrite import BatchNormError
from parity import dlib_embed

EPS = 1e-4   # dlib DEFAULT_BATCH_NORM_EPS


def test_calibration_keeps_inference_and_fixes_training_mode(calibrated_face_model, johns_chips, johns_reference):
    path, report = calibrated_face_model
    # Python dlib (inference form) on all johns: unchanged up to float rounding.
    got = dlib_embed(path, johns_chips[2])
    assert np.abs(got - johns_reference).max() <= 1e-6
    # The torch port's training-mode measurement (dlib's batch statistics on batches of 25).
    assert report.layers == 29 and report.chips == 55 and report.batch_size == 25
    assert report.train_before[0] > 0.5 and report.train_before[1] > 2
    assert report.train_after[0] <= 0.01 and report.train_after[1] <= 0.1
    assert report.inference_max <= 1e-6
    # Only bn numbers changed: statistics now per channel, not the §6.7 placeholders.
    model = fmt.load(path)
    bns = [e.details for e in model.layers() if e.details is not None and e.details.version == "bn_con2"]
    assert len(bns) == 29
    assert all(np.any(d["running_means"] != 0) and np.all(d["running_variances"] > 0) for d in bns)
    assert all(d["num_updates"] == 100 and d["eps"] == EPS for d in bns)


def test_calibrate_refuses_unusable_chips(face_model_path):
    from dlibbridge.port import calibrate, convert
    module = convert.to_torch(face_model_path, trainable=True)
    with pytest.raises(BatchNormError, match="uint8 N×150×150×3"):
        calibrate.calibrate(module, np.zeros((4, 100, 100, 3), np.uint8))
    with pytest.raises(BatchNormError, match="at least 2 chips"):
        calibrate.calibrate(module, np.zeros((1, 150, 150, 3), np.uint8))
    with pytest.raises(BatchNormError, match="frozen affine"):
        calibrate.calibrate(convert.to_torch(face_model_path), np.zeros((4, 150, 150, 3), np.uint8))


def test_cli_unfreeze_with_calibration_from_a_chip_folder(tmp_path, johns_dir, capsys):
    # 12 johns chips (quick; the full calibration is tested above) and one broken file
    faces = tmp_path / "faces"
    for f in sorted(johns_dir.glob("*/*.jpg"))[::4][:12]:
        (faces / f.parent.name).mkdir(parents=True, exist_ok=True)
        (faces / f.parent.name / f.name).write_bytes(f.read_bytes())
    (faces / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "cal.dat"
    assert cli.main(["unfreeze", "--calibrate", str(faces), "--batch-size", "6", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "skipped 1 unreadable calibration files: broken.jpg" in text
    assert "calibrated 29 batch-norm layers on 12 chips" in text
    assert "training-mode deviation from inference (12 chips in batches of 6): before mean" in text
    assert "python dlib descriptors vs original" in text and out.is_file()


def test_cli_calibration_folder_errors_are_clear(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    dlib.save_image(np.zeros((200, 300, 3), np.uint8), str(photos / "a.png"))
    dlib.save_image(np.zeros((200, 300, 3), np.uint8), str(photos / "b.png"))
    assert cli.main(["unfreeze", "--calibrate", str(photos), "-o", str(tmp_path / "o.dat"), "-q"]) == 2
    assert "not an aligned 150x150 chip" in capsys.readouterr().err
    assert cli.main(["unfreeze", "--calibrate", str(tmp_path / "nope"), "-o", str(tmp_path / "o.dat")]) == 2
    assert "calibration folder " + str(tmp_path / "nope") + " does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.dat").exists()


def test_unfreeze_calibrates_on_the_shipped_sample_without_a_folder(tmp_path, capsys):
    """`--calibrate` alone uses the 25 chips inside the package: the README's main command
    works on a fresh clone with nothing beside it; the last line says what to do next."""
    from dlibbridge import assets
    chips = sorted(assets.sample_chips_dir().glob("*/*.jpg"))
    assert len(chips) == 25 and len({c.parent.name for c in chips}) == 5
    out = tmp_path / "cal.dat"
    assert cli.main(["unfreeze", "--calibrate", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "calibrated 29 batch-norm layers on 25 chips" in text and out.is_file()
    assert "uncalibrated" not in text
    assert text.strip().splitlines()[-1].startswith("next: train") and "dlibbridge finetune" in text


def test_uncalibrated_unfreeze_says_what_that_means_for_training(tmp_path, capsys):
    assert cli.main(["unfreeze", "-o", str(tmp_path / "u.dat"), "-q"]) == 0
    text = capsys.readouterr().out
    assert "uncalibrated" in text and "batch statistics" in text and "--calibrate" in text


def test_calibration_progress_counts_what_it_names(capsys):
    """The bar counts chip forward passes (statistics + the before/after checks), and says so."""
    from dlibbridge import assets
    from dlibbridge.codec.tree import load
    from dlibbridge.port import calibrate
    chips, _ = calibrate.load_chips(assets.sample_chips_dir(), limit=6)
    calibrate.unfreeze(load(assets.face_model_path()), chips, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "calibrating on 6 chips" in err and "chip passes" in err
