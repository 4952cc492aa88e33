"""dlib's MMOD loss (``loss_mmod_``) in torch, for fine-tuning the CNN face detector.

dlib trains ``mmod_human_face_detector.dat`` with ``loss_mmod_`` (dlib/dnn/loss.h, read for
reference): a structured-SVM loss over the sliding windows of the tiled image pyramid.  For
each image it scans every window scoring above ``−loss_per_false_alarm`` (the loss-augmented
detections: hard negatives come from the network's own scores), runs its greedy non-max
suppression, and charges

* ``loss_per_missed_target − score`` for every truth box, at the one output position whose
  window covers the box at the pyramid level that makes it the window's size;
* ``loss_per_false_alarm + score`` for every kept detection that hits no truth box (or hits one
  already taken, when that box's detections are worth keeping), ``score − loss_per_missed_target``
  for the first detection of a truth box;

and writes the gradient ``±1/(rows·cols·images·windows)`` at those positions.  :func:`mmod_loss`
does the same decisions in the same order (so the same hard negatives, the same ignored truth
boxes) and returns an objective whose autograd gradient on the network's output is dlib's, with
dlib's loss value beside it; tests/test_train_detector.py checks both against dlib's own
``loss_mmod_`` (tools/dlib_oracle/zoo_oracle.cpp ``mmod_loss``) on the same batch.

Bounding-box regression (unused by dlib's face detector) is not supported; the detector must have
one detection window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DlibbridgeError
from .detector_config import DetectorFinetune
from ..port.arch import DlibAffine
from ..port.mmod import CnnFaceDetector, _folded_chain, _lround, box_overlap, tensor_to_image

#: dlib's ``pyramid_down<6>``: each level is 5/6 of the one before.
PYRAMID_RATE = 5 / 6


class DetectorTrainingError(DlibbridgeError, ValueError):
    """Labels or a detector file the MMOD loss cannot train on; one line for the user."""


@dataclass(frozen=True)
class TruthBox:
    """A labelled face: (left, top, right, bottom), inclusive as dlib's rectangle; ``ignore``
    boxes are neither rewarded nor do detections on them count as false alarms."""
    box: tuple[int, int, int, int]
    ignore: bool = False


@dataclass(frozen=True)
class MmodOptions:
    """The ``mmod_options`` a detector file carries (its loss layer's record)."""
    loss_per_false_alarm: float
    loss_per_missed_target: float
    truth_match_iou_threshold: float
    nms: tuple[float, float]
    ignore: tuple[float, float]

    @classmethod
    def of(cls, detector: CnnFaceDetector) -> "MmodOptions":
        meta = detector.net.dlib_meta
        return cls(meta["loss_per_false_alarm"], meta["loss_per_missed_target"], meta["truth_match_iou_threshold"],
                   (meta["overlaps_nms_iou_thresh"], meta["overlaps_nms_percent_covered_thresh"]),
                   (meta["overlaps_ignore_iou_thresh"], meta["overlaps_ignore_percent_covered_thresh"]))


def _area(r) -> int:
    return max(0, r[2] - r[0] + 1) * max(0, r[3] - r[1] + 1)


def iou(a, b) -> float:
    """dlib's ``box_intersection_over_union`` of two integer rectangles."""
    inner = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return 0.0 if inner == 0 else inner / (_area(a) + _area(b) - inner)


def _center(r) -> tuple[int, int]:
    """dlib's ``center`` of an integer rectangle (rounds halves down)."""
    return (r[0] + r[2] + 1) // 2, (r[1] + r[3] + 1) // 2


def truth_position(detector: CnnFaceDetector, box: tuple[int, int, int, int], rects, out_shape) -> int | None:
    """``loss_mmod_::image_rect_to_feat_coord``: the offset in one image's output (K, R, C) of
    the window that stands for ``box``, or None when no window can (smaller than the window at
    the pyramid's first level, an aspect the window cannot match, or too near the border)."""
    h0, w0 = rects[0][3] - rects[0][1] + 1, rects[0][2] - rects[0][0] + 1
    cx, cy = _center(box)
    if not (0 <= cx < w0 and 0 <= cy < h0):
        raise DetectorTrainingError(f"a truth box {box} has its centre outside the {w0}x{h0} image")
    win = detector.windows[0]
    scale = min(1.0, max(win.width / (box[2] - box[0] + 1), win.height / (box[3] - box[1] + 1)))
    level = min(max(int(_lround(np.array(math.log(scale) / math.log(PYRAMID_RATE)))), 0), len(rects) - 1)
    p = np.array(box, np.float64)
    for _ in range(level):
        p = (p - 0.3) * PYRAMID_RATE
    mapped = _lround(p + np.array(rects[level][:2] * 2, np.float64))
    tx, ty = _center(mapped)
    left, top = tx - win.width // 2, ty - win.height // 2
    window = np.array([[left, top, left + win.width - 1, top + win.height - 1]], np.float64)
    if iou(box, tuple(_lround(tensor_to_image(window, rects))[0])) <= MmodOptions.of(detector).truth_match_iou_threshold:
        return None
    x, y = float(tx), float(ty)
    for (sy, sx), (py, px), (ky, kx) in reversed(detector.geometry):      # input side first
        x, y = (x + px - kx // 2) / sx, (y + py - ky // 2) / sy
    x, y = math.floor(x + 0.5), math.floor(y + 0.5)
    _, rows, cols = out_shape
    if not (0 <= x < cols and 0 <= y < rows):
        return None
    return y * cols + x


def _best_match(truth: list[TruthBox], hit: list[bool], rect) -> tuple[float, int]:
    """``find_best_match``: the best IoU with an unhit, not ignored truth box; a hit one only
    when no unhit box overlaps at all."""
    match, best = 0.0, 0
    for allow_hit in (False, True):
        if match != 0:
            break
        for i, t in enumerate(truth):
            if t.ignore or (hit[i] and not allow_hit):
                continue
            m = iou(rect, t.box)
            if m > match:
                match, best = m, i
    return match, best


def _image_loss(detector: CnnFaceDetector, opts: MmodOptions, out: np.ndarray, rects, truth: list[TruthBox],
                threshold: float, coeff: np.ndarray) -> tuple[float, list]:
    """One image of ``compute_loss_value_and_gradient``: fills ``coeff`` (the gradient without
    its scale, flat over (K, R, C)) and returns the loss's constant part and the detections."""
    dets = detector.scan(torch.from_numpy(out), rects, threshold)
    max_dets = 50 + 5 * len(truth)
    const = len(truth) * opts.loss_per_missed_target
    positions: list[int | None] = []
    taken: set[int] = set()
    for t in truth:
        pos = None if t.ignore else truth_position(detector, t.box, rects, out.shape)
        if pos is None or pos in taken:
            const -= opts.loss_per_missed_target
            positions.append(None)
            continue
        coeff[pos] = -1.0
        positions.append(pos)
        taken.add(pos)

    def nms_pass():
        """The detections kept by dlib's NMS, in order, until ``max_dets`` are kept."""
        kept = []
        for d in dets:
            if len(kept) >= max_dets:
                return
            if any(box_overlap(k[1], d[1], *opts.nms) for k in kept):
                continue
            yield d, kept

    # truth boxes' best loss-augmented score sums
    hits, hit = [0.0] * len(truth), [False] * len(truth)
    for d, kept in nms_pass():
        match, j = _best_match(truth, hit, d[1])
        kept.append(d)
        if match > opts.truth_match_iou_threshold:
            hits[j] += d[0] if not hit[j] else d[0] + opts.loss_per_false_alarm
            hit[j] = True
    # truth boxes another truth box suppresses by NMS cannot be found: ignored
    for i, t in enumerate(truth):
        if hit[i] or t.ignore:
            continue
        match, j = 0.0, 0
        for k, other in enumerate(truth):
            if not other.ignore and k != i and iou(t.box, other.box) > match:
                match, j = iou(t.box, other.box), k
        if j == i or truth[j].ignore or not box_overlap(truth[j].box, t.box, *opts.nms):
            continue
        if positions[i] is not None:
            const -= opts.loss_per_missed_target
            coeff[positions[i]] = 0.0
    # the loss-maximising detections
    hit = [False] * len(truth)
    final = []
    for d, kept in nms_pass():
        match, j = _best_match(truth, hit, d[1])
        if match > opts.truth_match_iou_threshold:
            if hits[j] > opts.loss_per_missed_target:
                const += opts.loss_per_false_alarm if hit[j] else -opts.loss_per_missed_target
                hit[j] = True
                kept.append(d)
        elif not any(t.ignore and box_overlap(t.box, d[1], *opts.ignore) for t in truth):
            const += opts.loss_per_false_alarm
            kept.append(d)
        final = kept
    for d in final:
        coeff[d[3]] += 1.0
    return const, dets


def mmod_loss(detector: CnnFaceDetector, out: torch.Tensor, tiles: list, truth: list[list[TruthBox]],
              opts: MmodOptions | None = None) -> tuple[torch.Tensor, float]:
    """dlib's ``loss_mmod_`` on a batch: ``out`` the network's output (N, K, R, C) for canvases
    whose tiles are ``tiles`` (as :meth:`CnnFaceDetector._batch` gives them), ``truth`` the
    boxes of each image.  Returns (objective, value): the objective's gradient on ``out`` is the
    gradient dlib writes, ``value`` the loss dlib returns (mistakes per image)."""
    if len(detector.windows) != 1:
        raise DetectorTrainingError("the MMOD loss here supports detectors with one detection window")
    opts = opts or MmodOptions.of(detector)
    n, k, rows, cols = out.shape
    scores = out.detach().float().cpu().numpy()
    coeff = np.zeros(scores.shape, np.float32)
    total, speed_adjust = 0.0, 0.0
    for i in range(n):
        const, dets = _image_loss(detector, opts, scores[i], tiles[i], truth[i],
                                  -opts.loss_per_false_alarm + speed_adjust, coeff[i].reshape(-1))
        cap = (50 + 5 * len(truth[i])) * 100          # dlib bounds the scan of the next images
        if len(dets) > cap:
            speed_adjust = max(speed_adjust, dets[cap][0] + opts.loss_per_false_alarm)
        total += const + float((coeff[i].astype(np.float64) * scores[i]).sum())
    weights = torch.from_numpy(coeff).to(out.device, out.dtype)
    objective = (weights * out).sum() / (rows * cols * n * k)
    return objective, total / n


# --------------------------------------------------------------------------------------------
# Fine-tuning for a camera: clean detections as labels, the camera's degradation as input
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledPhoto:
    """A clean photo, the base detector's boxes on it, and its largest face's chip-region side
    (``get_face_chip_details(shape, 150, 0.25).rect.width()``: the size a camera profile's
    ``face_px`` measures)."""
    rgb: np.ndarray
    boxes: tuple[tuple[int, int, int, int], ...]
    face_px: float


def label_photos(detector: CnnFaceDetector, photos: list[np.ndarray], upsample: int = 1) -> list[LabelledPhoto]:
    """The base detector's boxes on clean photos (the labels: dlib's own detections where the
    faces are large) and the chip-region side of each photo's largest face; photos without a
    face are left out."""
    from ..data.align import Face, FaceAligner
    import dlib
    aligner = FaceAligner("cnn", upsample, cnn_factory=lambda: detector)
    out = []
    for rgb in photos:
        faces = aligner.detect(rgb)
        if not faces:
            continue
        largest = aligner.locate(rgb, max(faces, key=lambda f: f.area))
        side = dlib.get_face_chip_details(largest.shape, 150, 0.25).rect.width()
        out.append(LabelledPhoto(rgb, tuple(f.box for f in faces), float(side)))
    return out


def camera_view(photo: LabelledPhoto, sample, upsample: int, rng: np.random.Generator):
    """The photo as the camera takes it (``data.camera.degrade_photo``), upsampled ``upsample``
    times as the detector will see it (dlib's ``pyramid_up``), and its boxes moved along
    (``rect_up``: ``(p + (1.25, 0.75))·2`` per doubling)."""
    from ..data.camera import degrade_photo
    from ..port.mmod import pyramid_up
    img, scale = degrade_photo(sample, photo.rgb, photo.face_px, rng)
    boxes = np.array(photo.boxes, np.float64) * scale
    for _ in range(upsample):
        img = pyramid_up(img)
        boxes = (boxes + np.array([1.25, 0.75, 1.25, 0.75])) * 2
    return img, [tuple(int(v) for v in b) for b in _lround(boxes)]


def random_crop(img: np.ndarray, boxes: list, size: int, rng: np.random.Generator):
    """A ``size``×``size`` crop around a random face (zero-padded where the photo is smaller),
    with the boxes whose centre falls inside it, in crop coordinates."""
    h, w = img.shape[:2]
    l, t, r, b = boxes[int(rng.integers(len(boxes)))]
    cx, cy = (l + r) // 2, (t + b) // 2
    x0 = int(np.clip(cx - rng.integers(size // 4, 3 * size // 4 + 1), min(0, w - size), max(0, w - size)))
    y0 = int(np.clip(cy - rng.integers(size // 4, 3 * size // 4 + 1), min(0, h - size), max(0, h - size)))
    crop = np.zeros((size, size, 3), np.uint8)
    sx, sy = max(0, x0), max(0, y0)
    part = img[sy:min(h, y0 + size), sx:min(w, x0 + size)]
    crop[sy - y0:sy - y0 + part.shape[0], sx - x0:sx - x0 + part.shape[1]] = part
    kept = []
    for l, t, r, b in boxes:
        c = _center((l - x0, t - y0, r - x0, b - y0))
        if 0 <= c[0] < size and 0 <= c[1] < size:
            kept.append(TruthBox((l - x0, t - y0, r - x0, b - y0)))
    return crop, kept


def match_counts(found: list, truth: list, iou_threshold: float = 0.5) -> tuple[int, int]:
    """(truth boxes found, false detections): greedy one-to-one matching at IoU > threshold."""
    free = list(truth)
    hits = 0
    for f in found:
        best = max(free, key=lambda t: iou(f[:4], t), default=None)
        if best is not None and iou(f[:4], best) > iou_threshold:
            free.remove(best)
            hits += 1
    return hits, len(found) - hits


def evaluate_on_camera(detector: CnnFaceDetector, views: list[tuple[np.ndarray, list]]) -> dict:
    """Faces found and false detections of ``detector`` on camera views (already upsampled:
    run at upsample 0), against the clean photos' boxes moved along."""
    found = false = total = 0
    for img, boxes in views:
        dets = detector([img], 0)[0]
        f, x = match_counts(dets, boxes)
        found, false, total = found + f, false + x, total + len(boxes)
    return {"photos": len(views), "faces": total, "found": found, "found_share": round(found / max(total, 1), 4),
            "false_detections": false, "false_per_100_photos": round(100 * false / max(len(views), 1), 2)}


def finetune_detector(detector: CnnFaceDetector, photos: list[np.ndarray], profile, upsample: int,
                      cfg: DetectorFinetune, log=print) -> tuple[CnnFaceDetector, dict, list]:
    """Fine-tune ``detector``'s network (in place) on ``photos`` seen through the camera of
    ``profile`` at ``upsample``: SGD with momentum on :func:`mmod_loss`, labels the base
    detector's clean boxes.  The last ``cfg.holdout`` photos are never trained on: base and
    fine-tuned detections on their camera views (one draw each, fixed seed) are the report.
    Returns the fine-tuned detector, the report and those views (image, boxes)."""
    import time
    rng = np.random.default_rng(cfg.seed)
    labelled = label_photos(detector, photos)
    if len(labelled) <= cfg.holdout:
        raise DetectorTrainingError(f"{len(labelled)} photos with a face; need more than the {cfg.holdout} held out")
    train, unseen = labelled[:-cfg.holdout], labelled[-cfg.holdout:]
    eval_rng = np.random.default_rng(cfg.seed + 1)
    views = [camera_view(p, profile.sample(eval_rng), upsample, eval_rng) for p in unseen]
    base = evaluate_on_camera(detector, views)
    log(f"base on {len(views)} unseen camera photos: {base}")
    chain = [detector.net.layers[st.module] for st in detector.net.steps if st.op == "layer"]
    net = torch.nn.Sequential(*_folded_chain(chain))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
    opts = MmodOptions.of(detector)
    started, losses = time.time(), []
    for step in range(cfg.steps):
        batch, truth = [], []
        while len(batch) < cfg.batch_size:
            p = train[int(rng.integers(len(train)))]
            img, boxes = camera_view(p, profile.sample(rng), upsample, rng)
            if not boxes:
                continue
            crop, kept = random_crop(img, boxes, cfg.crop, rng)
            batch.append(crop)
            truth.append(kept)
        canvases = [detector._canvas(c) for c in batch]
        x = torch.from_numpy(np.stack([c for c, _ in canvases]))
        out = net(x)
        objective, value = mmod_loss(detector, out, [r for _, r in canvases], truth, opts)
        opt.zero_grad()
        objective.backward()
        opt.step()
        losses.append(value)
        if (step + 1) % 20 == 0:
            log(f"step {step + 1}/{cfg.steps}: loss {np.mean(losses[-20:]):.3f} ({time.time() - started:.0f} s)")
    _unfold(chain, list(net))
    tuned = _rebuilt(detector)
    report = {"upsample": upsample, "train_photos": len(train), "steps": cfg.steps, "loss_first_20": float(np.mean(losses[:20])),
              "loss_last_20": float(np.mean(losses[-20:])), "seconds": round(time.time() - started, 1),
              "base": base, "finetuned": evaluate_on_camera(tuned, views)}
    log(f"fine-tuned on the same photos: {report['finetuned']}")
    return tuned, report, views


def _unfold(chain: list[torch.nn.Module], folded: list[torch.nn.Module]) -> None:
    """Write the trained folded convolutions back into the network dlib stores: a conv that
    an affine follows gets ``W/scale`` and ``(b − shift)/scale`` (the affine is kept), so the
    deployed file has dlib's layer types.  Training runs on the folded form because the
    deployed convolutions carry the batch-norm scale in their affine: their weights are ~1e-4
    and their gradients ~5x their norm, which no single SGD step size suits."""
    convs = iter(m for m in folded if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        for i, m in enumerate(chain):
            if not isinstance(m, torch.nn.Conv2d):
                continue
            f = next(convs)
            after = chain[i + 1] if i + 1 < len(chain) else None
            if isinstance(after, DlibAffine):
                scale, shift = after.scale.reshape(-1), after.shift.reshape(-1)
                m.weight.copy_(f.weight / scale.view(-1, 1, 1, 1))
                m.bias.copy_((f.bias - shift) / scale)
            elif f is not m:
                m.weight.copy_(f.weight)
                m.bias.copy_(f.bias)


def _rebuilt(detector: CnnFaceDetector) -> CnnFaceDetector:
    """A fresh inference detector (folded chain) from the trained network's dlib bytes."""
    from ..codec import tree
    from ..port import generic
    return CnnFaceDetector(tree.dumps(generic.to_dlib_tree(detector.net)))


def export_detector(detector: CnnFaceDetector, path, check_images: list[np.ndarray]) -> int:
    """Write the detector as a dlib ``.dat`` (the records whose numbers changed rewritten), and
    before it replaces ``path`` check that ``dlib.cnn_face_detection_model_v1`` loads it and
    finds the torch port's boxes on ``check_images`` (upsample 0); returns the boxes compared."""
    import dlib
    from .._io import replace_verified
    from ..codec import tree
    from ..port import generic
    data = tree.dumps(generic.to_dlib_tree(detector.net))

    def verify(tmp) -> int:
        theirs = dlib.cnn_face_detection_model_v1(str(tmp))
        ours = CnnFaceDetector(tmp)
        n = 0
        for img in check_images:
            a = [d[:4] for d in ours([img], 0)[0]]
            b = [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in theirs(img, 0)]
            if a != b:
                raise DetectorTrainingError(f"the exported detector's boxes in dlib {b} differ from torch's {a}")
            n += len(a)
        return n
    return replace_verified(path, data, verify)


def run(cfg: DetectorFinetune, log=print) -> dict:
    """``dlibbridge finetune-detector``: read the profile and the photos, fine-tune at the
    profile's upsampling, export ``cfg.out`` (checked in dlib on the unseen camera views) and
    write the report beside it as ``.json``."""
    from pathlib import Path

    from .._io import write_json
    from ..data.camera import load_camera
    from ..data.images import ImageReadError, is_image_file, read_image, walk_files
    profile = load_camera(cfg.camera)
    setting = (profile.detection or {}).get("setting")
    if not setting:
        raise DetectorTrainingError(f"{cfg.camera}: no detection setting in the camera profile; run "
                                    "dlibbridge camera on the camera's photos")
    root = Path(cfg.photos_dir)
    if not root.is_dir():
        raise DetectorTrainingError(f"{root}: not a folder")
    files = [root / rel for rel in walk_files(root) if is_image_file(rel)]
    if cfg.max_photos is not None and len(files) > cfg.max_photos:
        files = [files[i] for i in np.linspace(0, len(files) - 1, cfg.max_photos).round().astype(int)]
    photos = []
    for f in files:
        try:
            photos.append(read_image(f).rgb)
        except ImageReadError:
            continue
    detector = CnnFaceDetector(cfg.base)
    tuned, report, views = finetune_detector(detector, photos, profile, setting["upsample"], cfg, log)
    report["export_boxes_checked_in_dlib"] = export_detector(tuned, cfg.out, [img for img, _ in views])
    report["camera"] = str(cfg.camera)
    write_json(Path(cfg.out).with_suffix(".json"), report, indent=1)
    return report
