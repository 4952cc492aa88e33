"""The README's code, run as written: every ```python block executed in a scratch folder, and
the main command of "Two commands" run in a folder with nothing beside it (no ../shared)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _dlibbridge_on_path(bin_dir: Path) -> Path:
    """A ``dlibbridge`` command running this interpreter (a copied venv's console script may
    name another one in its #! line)."""
    bin_dir.mkdir()
    exe = bin_dir / "dlibbridge"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dlibbridge "$@"\n')
    exe.chmod(0o755)
    return bin_dir


def test_every_python_block_runs_as_written(tmp_path, monkeypatch, face_model_path):
    import dlib
    blocks = _blocks("python")
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    # the snippet's claims: descriptors equal dlib's, the written file loads in dlib
    emb = scope["emb"].detach().numpy()
    rec = dlib.face_recognition_model_v1(str(face_model_path))
    want = np.array([rec.compute_face_descriptor(c) for c in scope["chips_uint8_nhwc"]])
    assert np.abs(emb - want).max() < 1e-4
    dlib.face_recognition_model_v1("mine.dat")
    assert (tmp_path / "copy.dat").read_bytes() == face_model_path.read_bytes()


def test_the_main_command_needs_nothing_beside_the_clone(tmp_path):
    """The README's main command (its `dlibbridge unfreeze` part; tools/setup.sh made the
    environment this test runs in) in an empty folder, with `dlibbridge` on PATH."""
    (main,) = [line for line in _blocks("bash")[0].splitlines() if "dlibbridge unfreeze" in line]
    command = main.split("&&", 1)[1].strip().replace(".venv/bin/dlibbridge", "dlibbridge")
    assert "../shared" not in command
    env = dict(os.environ, PATH=str(_dlibbridge_on_path(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (work / "dlib_face_recognition_resnet_model_v1_trainable.dat").is_file()
    assert "calibrated 29 batch-norm layers on 25 chips" in p.stdout
