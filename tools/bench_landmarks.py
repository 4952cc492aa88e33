#!/usr/bin/env python3
"""dlib's 5-point landmarks on small camera faces: their error against the clean photo's landmarks
(scaled to the camera photo), per detector upsampling, and what reduces it.

Each celeba-dev photo (decoded by dlib) gives the truth: dlib's CNN box (upsample 1) and 5-point
landmarks on the clean photo.  The camera photo is that photo shrunk by ``--scale`` (area
averaging), gray, JPEG ``--quality``; the truth landmarks are scaled the same way (pixel centres:
``(p + 0.5)·s − 0.5``).  On the camera photo the torch port of dlib's CNN detects at each upsampling
(the box nearest the scaled truth, IoU > 0.3; else the face counts as missed) and the landmarks are
predicted by

* ``photo``: dlib's shape predictor on the camera photo with the detector's box (what ``align``
  does);
* ``upsampled``: on the camera photo upsampled as the detector saw it (dlib's ``pyramid_up``, the
  box where the detector found it there: ``rect_up`` of the returned one), the points mapped back
  by the resize's own pixel map (``resize_image`` to 2·nr+1 × 2·nc+2 maps x to
  x·(2·nc+1)/(nc−1), not ``rect_up``'s (x + 1.25)·2);
* ``jitter``: the mean of ``photo`` over the box and 8 copies shifted by ±4 % and scaled by ±4 %.

The chip is then cut from the camera photo by ``get_face_chip`` with the predicted points: dlib's
chip geometry is unchanged, only the points feeding it differ (``photo`` and ``upsampled`` are
``align``'s own ``FaceAligner``, without and with ``--landmarks-upsampled``); the chip's descriptor
(dlib's face model) is compared with the clean photo's chip.  Error: per face the mean distance
of the 5 points to the truth, divided by the truth's eye distance (mean of the two eyes' corner
pairs), reported as median and mean over the faces found, with the faces found.

Usage (repo root): nice python tools/bench_landmarks.py [--photos 100] [--scale 0.28] [--quality 50]
    [--upsample 1 2 3]
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dlibbridge  # noqa: E402,F401  (before torch: thread policy)
from dlibbridge import assets  # noqa: E402
from dlibbridge.train.detector import iou  # noqa: E402

#: (dx, dy, scale) of the jittered boxes, as fractions of the box side.
JITTERS = [(dx, dy, 1.0) for dx in (-0.04, 0.04) for dy in (-0.04, 0.04)] + [(0, 0, 0.96), (0, 0, 1.04),
                                                                             (0.04, 0, 1.0), (-0.04, 0, 1.0)]


def points(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)


def eye_distance(p: np.ndarray) -> float:
    return float(np.linalg.norm(p[0:2].mean(0) - p[2:4].mean(0)))


def camera_photo(rgb: np.ndarray, scale: float, quality: int) -> np.ndarray:
    import cv2
    from dlibbridge.data import augment
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return augment.jpeg(augment.to_grayscale(small), quality)


def predict(predictor, rgb: np.ndarray, box) -> np.ndarray:
    import dlib
    return points(predictor(rgb, dlib.rectangle(*[int(round(v)) for v in box])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--scale", type=float, default=0.28, help="camera photo / clean photo side (0.28: faces ~31 px)")
    ap.add_argument("--quality", type=int, default=50)
    ap.add_argument("--upsample", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()

    import dlib
    from dlibbridge.data.align import Face, FaceAligner
    from dlibbridge.port.mmod import cnn_face_detector, pyramid_up
    det = cnn_face_detector()
    predictor = dlib.shape_predictor(str(assets.landmarks5_path()))
    face_net = dlib.face_recognition_model_v1(str(assets.resolve_model("default")))

    def descriptor(chip: np.ndarray) -> np.ndarray:
        return np.array(face_net.compute_face_descriptor(chip))
    files = sorted((REPO.parent / "shared" / "data" / "celeba-dev").glob("*/*.jpg"))
    files = [files[i] for i in np.linspace(0, len(files) - 1, args.photos).round().astype(int)]
    s = args.scale
    faces = []
    for f in files:
        rgb = dlib.load_rgb_image(str(f))
        found = det([rgb], 1)[0]
        if not found:
            continue
        box = max(found, key=lambda d: (d[2] - d[0]) * (d[3] - d[1]))[:4]
        truth = predict(predictor, rgb, box)
        clean_chip = dlib.get_face_chip(rgb, predictor(rgb, dlib.rectangle(*box)), size=150, padding=0.25)
        cam = camera_photo(rgb, s, args.quality)
        faces.append((cam, (truth + 0.5) * s - 0.5, tuple((np.array(box) + 0.5) * s - 0.5), descriptor(clean_chip)))
    chip_px = np.median([eye_distance(t) for _, t, _, _ in faces])
    print(f"{len(faces)} faces of {len(files)} photos; camera: scale {s}, gray, JPEG {args.quality}; "
          f"median eye distance on the camera photo {chip_px:.1f} px", file=sys.stderr)

    rows = []
    for up in args.upsample:
        errors = {"photo": [], "upsampled": [], "jitter": []}
        distances = {"photo": [], "upsampled": []}
        aligners = {"photo": FaceAligner("cnn", up, lambda: det),
                    "upsampled": FaceAligner("cnn", up, lambda: det, landmarks_upsampled=True)}
        t0 = time.perf_counter()
        for cam, truth, tbox, clean_descriptor in faces:
            dets = det([cam], up)[0]
            best = max(dets, key=lambda d: iou(d[:4], tuple(int(round(v)) for v in tbox)), default=None)
            if best is None or iou(best[:4], tuple(int(round(v)) for v in tbox)) <= 0.3:
                continue
            box = np.array(best[:4], np.float64)
            norm = eye_distance(truth)
            err = lambda p: float(np.linalg.norm(p - truth, axis=1).mean() / norm)  # noqa: E731
            errors["photo"].append(err(predict(predictor, cam, box)))
            big, ubox, sizes = cam, box.copy(), []
            for _ in range(up):
                sizes.append(big.shape[:2])
                big = pyramid_up(big)
                ubox = (ubox + np.array([1.25, 0.75, 1.25, 0.75])) * 2     # the box the detector found there
            p = predict(predictor, big, ubox)
            for nr, nc in reversed(sizes):      # resize_image's own pixel map: (n - 1)/(N - 1)
                p = p * np.array([(nc - 1) / (2 * nc + 1), (nr - 1) / (2 * nr)])
            errors["upsampled"].append(err(p))
            side = box[2] - box[0] + 1
            jittered = [predict(predictor, cam, (box + np.array([dx, dy, dx, dy]) * side) * 1.0
                                + np.array([-1, -1, 1, 1]) * (sc - 1) * side / 2) for dx, dy, sc in JITTERS]
            errors["jitter"].append(err(np.mean([predict(predictor, cam, box)] + jittered, axis=0)))
            for name, aligner in aligners.items():          # the chip align makes, against the clean chip
                face = aligner.locate(cam, Face(tuple(int(v) for v in box), best[4]))
                distances[name].append(float(np.linalg.norm(descriptor(aligner.chip(cam, face)) - clean_descriptor)))
        seconds = time.perf_counter() - t0
        for name, e in errors.items():
            d = distances.get(name)
            rows.append((up, name, len(e), float(np.median(e)) if e else float("nan"),
                         float(np.mean(e)) if e else float("nan"),
                         f"{np.median(d):.3f} / {np.mean(np.array(d) > 0.6):.0%}" if d else "–"))
        print(f"upsample {up}: {seconds:.0f} s", file=sys.stderr)

    print(f"| upsample | landmarks | faces found (of {len(faces)}) | error median | error mean | "
          "chip vs clean chip: median distance / share > 0.6 |")
    print("|---|---|---|---|---|---|")
    for up, name, n, med, mean, dist in rows:
        print(f"| {up} | {name} | {n} | {med:.3f} | {mean:.3f} | {dist} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
