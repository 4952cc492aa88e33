"""The MMOD loss against dlib's own ``loss_mmod_`` (tools/dlib_oracle/zoo_oracle.cpp ``mmod_loss``)
on the same batch — loss value and gradient on the network's output —, and the fine-tuned
detector's round trip: trained a few steps on camera views, written as a .dat that
``dlib.cnn_face_detection_model_v1`` loads and that finds the torch model's boxes.

Measured: on the batch below dlib and the port agree exactly (the loss value to the last bit, every
gradient entry equal but where a truth position is also a detection's: 0 here, ~1e-12 in dlib's
float arithmetic)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlib
from dlibbridge import assets
from dlibbridge.port.mmod import cnn_face_detector
from dlibbridge.train import detector as D
import torch

SIZE = 240


@pytest.fixture(scope="module")
def det():
    return cnn_face_detector()


def _crops(det, shared_dir):
    """Crops of SIZE×SIZE around the first face of photos with faces, their CNN boxes as truth,
    plus boxes that exercise every branch of the loss: too small for the window (ignored), a
    miss, an ignore box, a duplicate of a truth box, and one suppressed by a neighbour (NMS)."""
    imgs, truth = [], []
    for f in sorted((shared_dir / "data" / "faces").glob("*.jpg"))[:6]:
        img = dlib.load_rgb_image(str(f))
        found = det([img], 0)[0]
        if not found or min(img.shape[:2]) < SIZE:
            continue
        l, t, r, b, _ = found[0]
        y0 = int(np.clip((t + b) // 2 - SIZE // 2, 0, img.shape[0] - SIZE))
        x0 = int(np.clip((l + r) // 2 - SIZE // 2, 0, img.shape[1] - SIZE))
        boxes = [D.TruthBox((a - x0, c - y0, e - x0, g - y0)) for a, c, e, g, _ in found
                 if 0 <= (a + e) // 2 - x0 < SIZE and 0 <= (c + g) // 2 - y0 < SIZE]
        first = boxes[0].box
        boxes += [D.TruthBox((10, 10, 40, 40)), D.TruthBox((150, 20, 230, 100)),
                  D.TruthBox((5, 150, 90, 235), ignore=True), D.TruthBox(first),
                  D.TruthBox((first[0] + 6, first[1] + 6, first[2] + 6, first[3] + 6))]
        imgs.append(np.ascontiguousarray(img[y0:y0 + SIZE, x0:x0 + SIZE]))
        truth.append(boxes)
    return imgs, truth


@pytest.mark.oracle
def test_mmod_loss_is_dlibs(det, shared_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "dlib_oracle"))
    import build
    binary = build.build(source="zoo_oracle.cpp")
    imgs, truth = _crops(det, shared_dir)
    assert len(imgs) >= 3
    ipath, tpath, opath = tmp_path / "i.u8", tmp_path / "t.txt", tmp_path / "o.bin"
    np.stack(imgs).tofile(ipath)
    tpath.write_text("".join(f"{i} {' '.join(map(str, t.box))} {int(t.ignore)}\n"
                             for i, boxes in enumerate(truth) for t in boxes))
    subprocess.run([str(binary), "mmod_loss", str(assets.cnn_face_detector_path()), str(ipath), str(len(imgs)),
                    str(SIZE), str(SIZE), str(tpath), str(opath)], check=True, capture_output=True)
    raw = opath.read_bytes()
    dims = np.frombuffer(raw, np.int32, 4, 0)
    n = int(np.prod(dims))
    out = np.frombuffer(raw, np.float32, n, 16).reshape(dims)
    grad = np.frombuffer(raw, np.float32, n, 32 + 4 * n).reshape(dims)
    value = float(np.frombuffer(raw, np.float64, 1, 32 + 8 * n)[0])

    # the decisions on dlib's own scores: the same loss and gradient
    x = torch.from_numpy(out.copy()).requires_grad_()
    objective, ours = D.mmod_loss(det, x, [det._canvas(im)[1] for im in imgs], truth)
    objective.backward()
    assert ours == pytest.approx(value, rel=1e-12)
    # a truth position that a detection also takes is -scale + scale in dlib's float: ~1e-12
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=0, atol=1e-9)
    assert np.count_nonzero(grad) >= 3 * len(imgs)

    # on the torch network's own output (≤ 1e-5 from dlib's), the same value
    batch, tiles = det._batch(imgs)
    with torch.no_grad():
        mine = det._forward(batch)
    assert float(np.abs(mine.numpy() - out).max()) < 1e-4
    assert D.mmod_loss(det, mine, tiles, truth)[1] == pytest.approx(value, abs=1e-3)


def test_truth_centre_outside_the_image_is_refused(det):
    img = np.zeros((120, 120, 3), np.uint8)
    _, tiles = det._canvas(img)
    with pytest.raises(D.DetectorTrainingError, match="centre outside"):
        D.truth_position(det, (150, 10, 230, 90), tiles, (1, 10, 10))


def test_finetuned_detector_round_trip_in_dlib(shared_dir, tmp_path):
    """A few SGD steps on camera views of celeba-dev photos; the exported .dat loads in dlib
    and gives the torch port's boxes (export_detector checks it before the file appears)."""
    from dlibbridge.data.camera import CameraProfile
    record = {"face_px": 40.0, "effective_px": 30.0, "blur_sigma": 0.5, "jpeg_quality": 60, "noise": 1.0,
              "brightness": 120.0, "contrast": 40.0, "channels": "gray"}
    profile = CameraProfile([record], {})
    photos = [dlib.load_rgb_image(str(f)) for f in sorted((shared_dir / "data" / "celeba-dev").glob("*/*.jpg"))[:6]]
    base = cnn_face_detector()
    cfg = D.DetectorFinetune("", "", "", steps=2, batch_size=2, holdout=2)
    tuned, report, views = D.finetune_detector(base, photos, profile, upsample=1, cfg=cfg, log=lambda *a: None)
    assert report["steps"] == 2 and {"found", "false_detections"} <= set(report["finetuned"])
    out = tmp_path / "det.dat"
    assert D.export_detector(tuned, out, [img for img, _ in views]) > 0
    assert out.read_bytes() != assets.cnn_face_detector_path().read_bytes()

    # align --detector-model runs it (torch port of that file), and refuses it without the CNN
    import json
    from dlibbridge import cli
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, img in enumerate(views[:2]):
        dlib.save_image(img, str(raw / f"{i}.png"))
    assert cli.main(["align", str(raw), str(tmp_path / "chips"), "--detector", "cnn", "--detector-model", str(out),
                     "--upsample", "0", "-q", "--jobs", "1"]) in (0, 2)
    summary = json.loads((tmp_path / "chips" / "summary.json").read_text())
    assert summary["settings"]["detector_model"] == str(out) and summary["files"] == 2
    assert cli.main(["align", str(raw), str(tmp_path / "chips2"), "--detector-model", str(out)]) == 2


def test_cli_bad_input(tmp_path, capsys):
    """One line and exit 2: a profile without a detection setting, settings out of range."""
    from dlibbridge import cli
    from dlibbridge.data.camera import CameraProfile, write_camera
    record = {"face_px": 40.0, "effective_px": 30.0, "blur_sigma": 0.5, "jpeg_quality": 60, "noise": 1.0,
              "brightness": 120.0, "contrast": 40.0, "channels": "gray"}
    cam, _ = write_camera(CameraProfile([record], {}), tmp_path / "cam.json")
    (tmp_path / "photos").mkdir()
    base = ["finetune-detector", str(tmp_path / "photos"), "--camera", str(cam), "-o", str(tmp_path / "det.dat")]
    for extra, message in (([], "no detection setting"), (["--crop", "40"], "crop must be at least 80"),
                           (["--holdout", "0"], "holdout must be")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "det.dat").exists()
