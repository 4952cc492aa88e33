#!/usr/bin/env python3
"""Face detectors for ``align``, in one run on the same photos (decoded by dlib): dlib's HOG,
dlib's CNN (``cnn_face_detection_model_v1``) and dlibbridge's torch port of that CNN
(``port.mmod``, float32 and bfloat16), at each upsample asked for, each followed by dlib's
5-point landmarks and ``get_face_chip``.

Reports photos per CPU-second (process user+sys time, so a busy shared machine does not skew
it as much as wall time), faces found and photos without a face, and for the torch rows
whether boxes and chips are those of dlib's CNN at the same upsample.  The fast rows (HOG,
torch) run ``--repeat`` times, interleaved, and report the median (min–max); dlib's CNN, 30-100x
slower, runs once.

Usage (repo root):  python tools/bench_detect.py [--photos 48] [--upsample 1 0] [--batch 1] [--stages] [--count 400]
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
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


def iou(a, b) -> float:
    inner = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inner / (area(a) + area(b) - inner)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (dlib's detectors use one)")
    ap.add_argument("--batch", type=int, default=1, help="torch batch (default 1: align passes one photo at a time)")
    ap.add_argument("--upsample", type=int, nargs="+", default=[1, 0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the fast rows (median reported)")
    ap.add_argument("--stages", action="store_true",
                    help="then the torch CNN's stages on the first 250x250 photo (CPU ms, best of 7)")
    ap.add_argument("--count", type=int, default=0, metavar="N",
                    help="then count faces (not timed) on N other photos: HOG and the torch CNN at each upsample")
    args = ap.parse_args()

    import dlibbridge
    dlibbridge.tune_cpu()           # as the `dlibbridge` command does: sleeping OpenMP pool, heap kept
    import dlib
    import torch
    from dlibbridge.port.mmod import PRECISIONS, cnn_face_detector

    torch.set_num_threads(args.threads)
    celeba = REPO.parent / "shared" / "data" / "celeba-dev"
    files = sorted(random.Random(args.seed).sample(sorted(celeba.glob("*/*.jpg")), args.photos))
    imgs = [dlib.load_rgb_image(str(f)) for f in files]
    n = len(imgs)
    sp = dlib.shape_predictor(str(assets.landmarks5_path()))
    hog = frontal_face_detector()
    dcnn = dlib.cnn_face_detection_model_v1(str(assets.cnn_face_detector_path()))
    ports = {p: cnn_face_detector(precision=p) for p in PRECISIONS}
    for det in ports.values():
        det([imgs[0]], 1)            # warm-up (oneDNN kernels)

    def with_chips(boxes_per_image):
        return [(boxes, [dlib.get_face_chip(img, sp(img, dlib.rectangle(*b[:4])), 150, 0.25) for b in boxes])
                for img, boxes in zip(imgs, boxes_per_image)]

    def run_hog(up):
        return with_chips([[(r.left(), r.top(), r.right(), r.bottom()) for r in hog(img, up)] for img in imgs])

    def run_dlib_cnn(up):
        return with_chips([[(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                            for d in dcnn(img, up)] for img in imgs])

    def run_port(precision, up):
        return with_chips(ports[precision](imgs, up, batch_size=args.batch))

    fast = [("dlib HOG", up, lambda up=up: run_hog(up)) for up in args.upsample]
    fast += [(f"torch CNN {p}", up, lambda p=p, up=up: run_port(p, up)) for up in args.upsample for p in PRECISIONS]
    cpu_s: dict = {(name, up): [] for name, up, _ in fast}
    wall_s: dict = {(name, up): [] for name, up, _ in fast}
    results: dict = {}
    for _ in range(args.repeat):
        for name, up, fn in fast:
            results[name, up], c, w = timed(fn)
            cpu_s[name, up].append(c)
            wall_s[name, up].append(w)
    for up in args.upsample:
        results["dlib CNN", up], c, w = timed(lambda: run_dlib_cnn(up))
        cpu_s["dlib CNN", up], wall_s["dlib CNN", up] = [c], [w]

    def rate(key):
        med = statistics.median(cpu_s[key])
        spread = f" ({n / max(cpu_s[key]):.2f}–{n / min(cpu_s[key]):.2f})" if len(cpu_s[key]) > 1 else ""
        return n / med, f"{n / med:.2f}{spread}"

    hog_rate = rate(("dlib HOG", 1))[0] if 1 in args.upsample else None
    print(f"{n} celeba-dev photos (seed {args.seed}), torch threads {args.threads}, batch {args.batch}, "
          f"fast rows: median of {args.repeat} interleaved runs (min–max)\n")
    print("| detector (+ landmarks + chip) | upsample | photos / CPU-s | × HOG at 1 | photos / wall-s | faces "
          "| photos without a face | vs dlib CNN at the same upsample |")
    print("|---|---|---|---|---|---|---|---|")
    order = [("dlib HOG", up) for up in args.upsample] + [("dlib CNN", up) for up in args.upsample]
    order += [(f"torch CNN {p}", up) for up in args.upsample for p in PRECISIONS]
    for key in order:
        name, up = key
        r, shown = rate(key)
        res = results[key]
        faces = sum(len(b) for b, _ in res)
        empty = sum(1 for b, _ in res if not b)
        versus = ""
        if name.startswith("torch"):
            ref = results["dlib CNN", up]
            same_boxes = sum(1 for (a, _), (b, _) in zip(res, ref) if [x[:4] for x in a] == [x[:4] for x in b])
            same_chips = sum(1 for (_, a), (_, b) in zip(res, ref)
                             if len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)))
            pairs = [(x, y) for (a, _), (b, _) in zip(res, ref) if len(a) == len(b) for x, y in zip(a, b)]
            conf = max([abs(x[4] - y[4]) for x, y in pairs] or [0.0])
            low = min([iou(x, y) for x, y in pairs] or [1.0])
            counts = sum(1 for (a, _), (b, _) in zip(res, ref) if len(a) != len(b))
            versus = (f"boxes {same_boxes}/{n}, chips {same_chips}/{n}, max \\|Δconf\\| {conf:.1e}, min IoU {low:.2f}"
                      + (f", face count differs on {counts}" if counts else ""))
        ratio = f"{r / hog_rate:.2f}" if hog_rate else ""
        print(f"| {name} | {up} | {shown} | {ratio} | {n / statistics.median(wall_s[key]):.2f} | {faces} | {empty} "
              f"| {versus} |")
    if args.stages:
        stages(args, imgs, ports)
    if args.count:
        count_faces(args, files, hog, ports)
    return 0


def stages(args, imgs, ports) -> None:
    """Where a photo's time goes in the torch CNN: CPU ms per stage, best of 7."""
    import torch
    from dlibbridge.port.mmod import pyramid_up

    def best(fn):
        times = []
        for _ in range(7):
            c0 = cpu()
            out = fn()
            times.append(cpu() - c0)
        return 1000 * min(times), out

    def upsampled(img, up):
        for _ in range(up):
            img = pyramid_up(img)
        return img

    img = next(i for i in imgs if i.shape[:2] == (250, 250))
    print("\none 250x250 photo, CPU ms, best of 7\n")
    print("| precision | upsample | pyramid_up | canvas → network input | network | decoding | whole call |")
    print("|---|---|---|---|---|---|---|")
    for up in args.upsample:
        for p, det in ports.items():
            t_up, big = best(lambda: upsampled(img, up))
            t_in, (x, tiles) = best(lambda: det._batch([big]))
            with torch.inference_mode():
                t_net, out = best(lambda: det._forward(x))
            t_dec, _ = best(lambda: det._decode(out[0], tiles[0], 0.0))
            t_all, _ = best(lambda: det([img], up))
            print(f"| {p} | {up} | {t_up:.1f} | {t_in:.1f} | {t_net:.1f} | {t_dec:.1f} | {t_all:.1f} |")


def count_faces(args, timed_files, hog, ports) -> None:
    """Faces found on a larger sample (photos not in the timed set), without timing: whether
    a faster setting finds as many faces.  dlib's own CNN is left out (minutes per 100
    photos); the torch float32 rows stand for it (identical boxes in the timed table)."""
    import dlib
    celeba = REPO.parent / "shared" / "data" / "celeba-dev"
    rest = sorted(set(sorted(celeba.glob("*/*.jpg"))) - set(timed_files))
    files = sorted(random.Random(args.seed + 1).sample(rest, args.count))
    counts = {}
    for f in files:
        img = dlib.load_rgb_image(str(f))
        for up in args.upsample:
            counts.setdefault(("dlib HOG", up), []).append(len(hog(img, up)))
            for p, det in ports.items():
                counts.setdefault((f"torch CNN {p}", up), []).append(len(det([img], up)[0]))
    print(f"\nfaces on {len(files)} other celeba-dev photos (seed {args.seed + 1}), not timed\n")
    print("| detector | upsample | faces | photos without a face |")
    print("|---|---|---|---|")
    for (name, up), c in sorted(counts.items(), key=lambda kv: (kv[0][0] != "dlib HOG", -kv[0][1], kv[0][0])):
        print(f"| {name} | {up} | {sum(c)} | {sum(1 for x in c if x == 0)} |")


if __name__ == "__main__":
    sys.exit(main())
