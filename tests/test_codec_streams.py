"""The codec's boundary with the user: a file that is not a dlib DNN file at all is called
so; pipes and /dev/stdin are read like files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dlibbridge
from dlibbridge import cli

REPO = Path(__file__).resolve().parents[1]


def test_random_bytes_are_called_not_a_dlib_file(tmp_path, capsys):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(bytes([0xCD]) + os.urandom(3000))
    with pytest.raises(dlibbridge.DlibFormatError, match=r"^this is not a dlib DNN file: .*\(at byte 0"):
        dlibbridge.load(junk)
    assert cli.main(["inspect", str(junk)]) == 2
    assert "this is not a dlib DNN file" in capsys.readouterr().err


def test_a_damaged_real_file_is_not_called_foreign(face_model_bytes):
    with pytest.raises(dlibbridge.DlibFormatError) as e:
        dlibbridge.loads(face_model_bytes[:5000])
    assert "not a dlib DNN file" not in str(e.value)


@pytest.mark.parametrize("arg", ["-", "/dev/stdin"])
def test_inspect_reads_a_pipe(arg, face_model_path):
    with open(face_model_path, "rb") as f:
        data = f.read()
    p = subprocess.run([sys.executable, "-m", "dlibbridge", "inspect", arg, "--json"], input=data,
                       capture_output=True, cwd=REPO)
    assert p.returncode == 0, p.stderr.decode()
    assert b'"size": 22466066' in p.stdout.replace(b"\n", b"").replace(b"  ", b" ") or b"22466066" in p.stdout


def test_a_directory_as_a_model_file_is_one_clear_line(tmp_path, capsys):
    for argv in (["inspect", str(tmp_path)], ["export", str(tmp_path), "-o", str(tmp_path / "x.dat")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dlibbridge {argv[0]}: model {tmp_path} is a directory, expected a model file"), err
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["export", "default", "--onnx", "m.onnx"],
                                  ["finetune", "data", "--out", "run", "--onnx"]])
def test_onnx_without_the_extra_names_it(tmp_path, argv):
    """onnx made unimportable (as on an install without the [onnx] extra): one line naming
    the extra, before any work, nothing written."""
    (tmp_path / "data").mkdir()
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['onnx'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "dlibbridge", *argv], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "pip install 'dlibbridge[onnx]'" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["__pycache__", "data", "sitecustomize.py"] or \
        sorted(x.name for x in tmp_path.iterdir()) == ["data", "sitecustomize.py"]
