"""tools/setup.sh rerun with nothing changed: it checks the imports and stops, pip never runs
(pip is made to fail here, so a rerun that reached it would fail the test)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_a_rerun_with_nothing_changed_does_not_run_pip(tmp_path):
    if not (REPO / ".venv" / ".dlibbridge-setup-stamp").is_file():
        pytest.skip("tools/setup.sh has not written its stamp in this checkout's .venv")
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nif sys.orig_argv[1:3] == ['-m', 'pip']:\n    sys.exit('pip ran')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run(["bash", "tools/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "pip ran" not in p.stderr
