#!/usr/bin/env python3
"""Face detectors for ``align``, in one run on the same photos (decoded by dlib): dlib's HOG,
dlib's CNN (``cnn_face_detection_model_v1``) and dlibbridge's torch port of that CNN
(``port.mmod``), each followed by dlib's 5-point landmarks and ``get_face_chip``.

Reports photos per CPU-second (process user+sys time, so a busy shared machine does not skew
it) and per wall second, faces found (and photos with no face) against HOG, and whether the
torch detector's boxes and chips are identical to dlib's CNN pipeline.

Usage (repo root):  python tools/bench_detect.py [--photos 40] [--threads 1] [--batch 8]
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlibbridge import assets  # noqa: E402
from dlibbridge.data.align import frontal_face_detector  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    c0, t0 = cpu(), time.perf_counter()
    out = fn()
    return out, cpu() - c0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (dlib's detectors use one)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--upsample", type=int, default=1)
    args = ap.parse_args()

    import dlib
    import torch
    from dlibbridge.port.mmod import cnn_face_detector

    torch.set_num_threads(args.threads)
    celeba = REPO.parent / "shared" / "data" / "celeba-dev"
    files = sorted(random.Random(args.seed).sample(sorted(celeba.glob("*/*.jpg")), args.photos))
    imgs = [dlib.load_rgb_image(str(f)) for f in files]
    sp = dlib.shape_predictor(str(assets.landmarks5_path()))
    hog = frontal_face_detector()
    dcnn = dlib.cnn_face_detection_model_v1(str(assets.cnn_face_detector_path()))
    tcnn = cnn_face_detector()
    tcnn([imgs[0]], args.upsample)   # warm-up (oneDNN kernels, resize plans)
    up = args.upsample

    def chips(boxes_per_image):
        out = []
        for img, boxes in zip(imgs, boxes_per_image):
            out.append([dlib.get_face_chip(img, sp(img, dlib.rectangle(*b[:4])), 150, 0.25) for b in boxes])
        return out

    runs = {}
    runs["dlib HOG"] = timed(lambda: chips([[(r.left(), r.top(), r.right(), r.bottom())
                                             for r in hog(img, up)] for img in imgs]))
    dboxes, dc, dw = timed(lambda: [[(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                                     for d in dcnn(img, up)] for img in imgs])
    dchips, c2, w2 = timed(lambda: chips(dboxes))
    runs["dlib CNN"] = (dchips, dc + c2, dw + w2)
    tboxes, tc, tw = timed(lambda: tcnn(imgs, up, batch_size=args.batch))
    tchips, c3, w3 = timed(lambda: chips(tboxes))
    runs["torch CNN (dlibbridge)"] = (tchips, tc + c3, tw + w3)

    same_boxes = sum(1 for a, b in zip(tboxes, dboxes) if [x[:4] for x in a] == [x[:4] for x in b])
    conf = max([abs(a[4] - b[4]) for ta, da in zip(tboxes, dboxes) for a, b in zip(ta, da)] or [0.0])
    same_chips = sum(1 for a, b in zip(tchips, dchips)
                     if len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)))
    hog_faces = sum(len(c) for c in runs["dlib HOG"][0])
    print(f"{len(imgs)} celeba-dev photos (seed {args.seed}), upsample {up}, torch threads {args.threads}, "
          f"batch {args.batch}\n")
    print("| detector (+ landmarks + chip) | photos / CPU-s | photos / wall-s | faces | photos without a face |")
    print("|---|---|---|---|---|")
    for name, (ch, c, w) in runs.items():
        print(f"| {name} | {len(imgs) / c:.2f} | {len(imgs) / w:.2f} | {sum(len(x) for x in ch)} "
              f"(HOG {hog_faces}) | {sum(1 for x in ch if not x)} |")
    print(f"\ntorch vs dlib CNN: identical boxes on {same_boxes}/{len(imgs)} photos, identical chips on "
          f"{same_chips}/{len(imgs)}, max |Δconfidence| {conf:.2e}; speed-up per CPU-second "
          f"{(runs['dlib CNN'][1]) / runs['torch CNN (dlibbridge)'][1]:.1f}x over dlib CNN, "
          f"{runs['dlib HOG'][1] / runs['torch CNN (dlibbridge)'][1]:.2f}x over HOG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
