"""The README's "Typical command-line workflow" block, run as written, line by line, in a
scratch folder holding a small photo set made from ../shared: photos/ (8 celeba-dev people x 6
photos) and cctv_photos/ (12 photos of 6 other people).  A set this small is what a new user
tries first; every line must work on it (several minutes: the two fine-tunes)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _workflow_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"Typical command-line workflow.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _small_photo_set(celeba: Path, work: Path) -> None:
    people = [d for d in sorted(celeba.iterdir()) if d.is_dir() and len(list(d.glob("*.jpg"))) >= 6]
    for d in people[:8]:
        (work / "photos" / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:6]:
            shutil.copy(f, work / "photos" / d.name / f.name)
    (work / "cctv_photos").mkdir()
    for d in people[8:14]:
        for f in sorted(d.glob("*.jpg"))[:2]:
            shutil.copy(f, work / "cctv_photos" / f"{d.name}_{f.name}")


@pytest.mark.slow
def test_the_readme_workflow_runs_as_written_on_a_small_photo_set(shared_dir, tmp_path):
    import dlib
    lines = _workflow_block()
    assert len(lines) >= 9 and all(line.startswith("dlibbridge ") for line in lines)
    work = tmp_path / "work"
    work.mkdir()
    _small_photo_set(shared_dir / "data" / "celeba-dev", work)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dlibbridge").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dlibbridge "$@"\n')
    (bin_dir / "dlibbridge").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", XDG_CACHE_HOME=str(tmp_path / "cache"))
    said = {}
    for line in lines:
        p = subprocess.run(line, shell=True, cwd=work, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{line}\n{p.stderr[-3000:]}"
        said[line.split()[1] + (" --camera" if "--camera" in line else "")] = p.stdout + p.stderr
    assert "note: no --pairs given: pairs generated from the person folders" in said["evaluate"]
    assert "note: --folds 10 lowered to 4" in said["evaluate"] and "--gen-pairs 6000 lowered to" in said["evaluate"]
    assert "note: -P lowered from 16 to 6" in said["finetune --camera"]
    if "exported step 0 " in said["finetune"]:
        assert "note: the exported model is the base model (step 0)" in said["finetune"]
    for f in ("run/model.dat", "run/model.pt", "cam/model.dat", "cam/threshold.json", "camera.json",
              "report/report.html", "model.onnx", "model.ts", "ids.csv", "clusters/summary.json", "photos.npz"):
        assert (work / f).is_file(), f
    threshold = json.loads((work / "cam" / "threshold.json").read_text())["threshold"]
    assert f"at threshold {threshold:.4f} (the run's recommended threshold" in said["identify"]
    assert json.loads((work / "clusters" / "summary.json").read_text())["threshold"] == threshold
    assert all(p.is_symlink() for p in (work / "clusters").glob("cluster_*/*"))
    for f in ("run/model.dat", "cam/model.dat", "model.dat", "deployed.dat"):
        dlib.face_recognition_model_v1(str(work / f))
    people = np.load(work / "photos.npz")["identities"].tolist()        # embed labels each photo's person
    assert sorted(set(people)) == sorted(d.name for d in (work / "photos").iterdir()) and len(people) <= 48
