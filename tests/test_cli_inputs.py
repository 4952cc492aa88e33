"""cli: inputs that are the wrong kind of thing get one message, up front, the same in every
command: a directory where a model file is expected, a model file swallowed as the
optional folder of ``unfreeze --calibrate``."""
from __future__ import annotations

import pytest

from dlibbridge.cli import main


def _model_commands(d: str, johns: str, tmp) -> dict[str, list[str]]:
    """command -> argv with the directory ``d`` where the model file goes."""
    return {
        "inspect": ["inspect", d],
        "unfreeze": ["unfreeze", d, "-o", str(tmp / "t.dat"), "-q"],
        "freeze": ["freeze", d, "-o", str(tmp / "f.dat")],
        "embed": ["embed", d, johns, "-o", str(tmp / "e.npz"), "-q"],
        "export": ["export", d, "-o", str(tmp / "m.dat")],
        "evaluate": ["evaluate", d, "--data", johns, "--gen-pairs", "40", "--folds", "2", "--no-cache", "-q",
                     "-o", str(tmp / "r.json")],
        "finetune": ["finetune", johns, "--base", d, "--out", str(tmp / "run"), "-q"],
    }


@pytest.mark.parametrize("name", ["inspect", "unfreeze", "freeze", "embed", "export", "evaluate", "finetune"])
def test_a_directory_as_model_is_one_message_in_every_command(name, tmp_path, johns_dir, capsys, monkeypatch):
    from dlibbridge.port import calibrate
    monkeypatch.setattr(calibrate, "load_chips", lambda *a, **k: pytest.fail("worked before checking the model"))
    d = tmp_path / "models"
    d.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    argv = _model_commands(str(d), str(johns_dir), out)[name]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{d} is a directory, expected a model file" in err, err
    assert list(out.iterdir()) == [], "nothing is written for a refused model"


def test_unfreeze_calibrate_followed_by_a_model_file_says_what_happened(tmp_path, face_model_path, capsys, monkeypatch):
    """``--calibrate`` takes an optional folder, so ``unfreeze --calibrate model.dat`` reads the
    model as the chips folder; the user meant the model, and is told so."""
    from dlibbridge.port import calibrate
    monkeypatch.setattr(calibrate, "load_chips", lambda *a, **k: pytest.fail("calibrated on a model file"))
    monkeypatch.chdir(tmp_path)
    assert main(["unfreeze", "--calibrate", str(face_model_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"dlibbridge unfreeze {face_model_path} --calibrate" in err, err     # the command meant
    assert list(tmp_path.iterdir()) == []
