"""The built wheel carries the package data the commands rely on: the 25 sample chips that
``unfreeze --calibrate`` (no folder) and the README's main command use, and their provenance
and licence beside them."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_the_sample_chips_and_their_provenance(tmp_path):
    """Builds the wheel as a user's ``pip install .`` does (about a minute: the C++ core)."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                       capture_output=True, text=True)
    if p.returncode and "No matching distribution" in p.stderr:
        pytest.skip("the build requirements (scikit-build-core, pybind11) cannot be fetched here")
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = tmp_path.glob("dlibbridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n for n in names if n.startswith("dlibbridge/sample/johns/") and n.endswith(".jpg"))
    in_tree = sorted(f.relative_to(REPO).as_posix() for f in (REPO / "dlibbridge/sample/johns").glob("*/*.jpg"))
    assert shipped == in_tree and len(shipped) == 25
    assert "dlibbridge/sample/README.md" in names
    assert "public domain" in zipfile.ZipFile(wheel).read("dlibbridge/sample/README.md").decode()
