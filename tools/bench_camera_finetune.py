"""Does fine-tuning for a worse camera help, on people it never saw?  Research harness and the
benchmark recorded in docs/benchmarks.md.

    python tools/bench_camera_finetune.py prepare --chips ALIGNED_CELEBA_DEV
    python tools/bench_camera_finetune.py eval-base
    python tools/bench_camera_finetune.py run NAME [--method xq|degrade|adabn|xq+adabn] [xq options]
    python tools/bench_camera_finetune.py table

Protocol:

* chips: ``dlibbridge align`` output of celeba-dev (status ``ok``); identities split by seed
  (``--test-ids`` of them never trained on, reported in ``WORK/split.json``).
* target cameras, applied to the clean chips with known parameters (the first is the one the
  runs target unless ``--camera`` says otherwise):
  ``A`` low-resolution grayscale JPEG — gray, chip sampled at 40 px (face ~27 px), noise 3, JPEG q 40 at that size;
  ``B`` blurry noisy colour — blur sigma 2.2, noise sigma 8 grey levels, JPEG q 35.
  Each test chip gets one fixed degradation per camera (seeded by chip index).
* metrics per domain (clean, A, B) on the test ids: TAR at FAR = 1e-3 and accuracy at dlib's 0.6
  threshold and at the best threshold on all pairs of the test chips, 10-fold accuracy on
  ``--pairs`` generated pairs (LFW protocol).
* methods (``run``): see :mod:`dlibbridge.xq`.  Every run's model, log, wall times and metrics
  go to ``WORK/runs/NAME/``; ``table`` prints the Markdown table of every finished run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dlibbridge  # noqa: E402

dlibbridge.tune_cpu()        # before torch, as the `dlibbridge` command does: sleeping OpenMP pool, heap kept

import torch  # noqa: E402

from dlibbridge._load import read_torch  # noqa: E402
from dlibbridge.data import augment  # noqa: E402
from dlibbridge.eval.metrics import (accuracy_at, best_threshold, kfold_accuracy, pair_distances,  # noqa: E402
                                tar_at_far)
from dlibbridge.eval.pairs import generate_pairs  # noqa: E402

WORK = Path(os.environ.get("DLIBBRIDGE_BENCH_WORK", "/work/cache/xq"))
from dlibbridge.train.xq import XQConfig as XQ  # noqa: E402


# ---- target cameras (known parameters) ------------------------------------------------------

def add_noise(chip: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return chip
    return np.clip(chip + rng.normal(0.0, sigma, chip.shape) + 0.5, 0, 255).astype(np.uint8)


CAMERAS = {
    "A": {"gray": True, "side": 40, "jpeg": 40, "blur": 0.0, "noise": 3.0},
    "B": {"gray": False, "side": None, "jpeg": 35, "blur": 2.2, "noise": 8.0},
}


def camera_fn(p: dict):
    """chip, rng → the chip as camera ``p`` takes it: colour loss, optics blur, sampling at
    ``side`` px where noise and JPEG happen, then the aligner's enlargement back."""
    def apply(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if p["gray"]:
            chip = augment.to_grayscale(chip)
        chip = augment.blur(chip, p["blur"])
        side = p["side"]
        small = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA) if side else chip
        small = add_noise(small, p["noise"], rng)
        if p["jpeg"]:
            small = augment.jpeg(small, p["jpeg"])
        if side:
            small = cv2.resize(small, chip.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        return small
    return apply


def camera_range_fn(p: dict, spread: float = 0.25):
    """The same camera with each parameter drawn per chip from ±``spread`` around its value:
    the training-time sampler when the exact camera is not known."""
    def apply(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.uniform(1 - spread, 1 + spread, size=4)
        q = {"gray": p["gray"], "side": int(round(p["side"] * u[0])) if p["side"] else None,
             "jpeg": int(np.clip(round(p["jpeg"] * u[1]), 5, 95)) if p["jpeg"] else None,
             "blur": p["blur"] * u[2], "noise": p["noise"] * u[3]}
        return camera_fn(q)(chip, rng)
    return apply


def degraded_set(chips: np.ndarray, cam: str, seed: int = 12345) -> np.ndarray:
    f = camera_fn(CAMERAS[cam])
    return np.stack([f(c, np.random.default_rng((seed, i))) for i, c in enumerate(chips)])


# ---- data -----------------------------------------------------------------------------------

def read_chips(chips_dir: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    with open(chips_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("status") == "ok" and row.get("chip") and row.get("identity"):
                out.setdefault(row["identity"], []).append(chips_dir / row["chip"])
    return {k: sorted(v) for k, v in sorted(out.items()) if len(v) >= 2}


def load_png(p: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def prepare(args) -> None:
    people = read_chips(Path(args.chips))
    names = sorted(people)
    rng = np.random.default_rng(args.seed)
    test = sorted(rng.permutation(names)[: args.test_ids].tolist())
    train = [n for n in names if n not in test]
    WORK.mkdir(parents=True, exist_ok=True)

    def stack(ids, cap=None):
        chips, labels = [], []
        for li, n in enumerate(ids):
            ps = people[n] if cap is None else sorted(rng.permutation(people[n])[:cap].tolist())
            for p in ps:
                chips.append(load_png(Path(p)))
                labels.append(li)
        return np.stack(chips), np.array(labels)

    tr_c, tr_l = stack(train)
    te_c, te_l = stack(test, args.test_per_id)
    np.savez(WORK / "data.npz", train_chips=tr_c, train_labels=tr_l, test_chips=te_c, test_labels=te_l)
    split = {"seed": args.seed, "train_ids": train, "test_ids": test, "train_chips": int(len(tr_c)),
             "test_chips": int(len(te_c)), "test_per_id": args.test_per_id, "chips_dir": str(args.chips)}
    (WORK / "split.json").write_text(json.dumps(split, indent=1))
    print(f"train {len(train)} ids / {len(tr_c)} chips; test {len(test)} ids / {len(te_c)} chips")


def load_data():
    d = np.load(WORK / "data.npz")
    return d["train_chips"], d["train_labels"], d["test_chips"], d["test_labels"]


def lfw_subset(args) -> None:
    """A folder of links to part of LFW (``--out``, to align): ``--multi`` people with two or
    more photos (at most ``--cap`` of them each) and ``--single`` people with one, seeded picks.
    The scaling curve's budget sees a few hundred people; aligning all 13,233 photos on the
    shared cores would cost more than a run."""
    root = Path(args.lfw)
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    photos = {n: sorted(f.name for f in (root / n).iterdir()) for n in names}
    rng = np.random.default_rng(args.seed)
    multi = rng.permutation([n for n in names if len(photos[n]) >= 2])[: args.multi]
    single = rng.permutation([n for n in names if len(photos[n]) == 1])[: args.single]
    out = Path(args.out)
    for name in [*multi, *single]:
        files = photos[name]
        if len(files) > args.cap:
            files = sorted(rng.permutation(files)[: args.cap].tolist())
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (out / name / f).exists():
                os.symlink((root / name / f).resolve(), out / name / f)
    print(f"{len(multi)} people with 2+ photos, {len(single)} with one -> {out}")


def prepare_lfw(args) -> None:
    """LFW people as extra training data (``WORK/lfw.npz``): ``dlibbridge align --fallback
    center`` output of LFW deep-funneled (status ``ok`` or ``fallback``: its photos are centred
    on the face); people with more than ``--cap`` chips keep a seeded pick of them (George W
    Bush alone has 530), people with one chip are flagged ``single``.  Only ever trained on:
    the test people are celeba-dev's."""
    chips_dir = Path(args.chips)
    people: dict[str, list[Path]] = {}
    with open(chips_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("status") in ("ok", "fallback") and row.get("chip") and row.get("identity"):
                people.setdefault(row["identity"], []).append(chips_dir / row["chip"])
    rng = np.random.default_rng(args.seed)
    chips, labels, single = [], [], []
    for li, name in enumerate(sorted(people)):
        ps = sorted(people[name])
        if len(ps) > args.cap:
            ps = sorted(rng.permutation(ps)[: args.cap].tolist())
        chips += [load_png(Path(c)) for c in ps]
        labels += [li] * len(ps)
        single.append(len(ps) == 1)
    np.savez(WORK / "lfw.npz", chips=np.stack(chips), labels=np.array(labels), single=np.array(single))
    print(f"LFW: {len(single) - sum(single)} people with 2+ chips, {sum(single)} with one; {len(chips)} chips")


def training_set(args, tr_c: np.ndarray, tr_l: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(pool chips, pool labels, the pool rows this run trains on, what they are).  The pool is
    the celeba-dev training chips, and with ``--lfw`` or ``--shared-cache`` every LFW chip of
    ``prepare-lfw`` after them (one cache serves every run on it).  The run trains on the first
    ``--people`` celeba-dev training identities of a fixed shuffle (a smaller set is part of every
    larger one), then the ``--lfw`` people (``multi``: those with 2+ chips; ``all``: the one-chip
    people too)."""
    ids = np.random.default_rng(0).permutation(np.unique(tr_l))
    if args.people is not None:
        ids = ids[: args.people]
    keep = np.isin(tr_l, ids)
    info = {"celeba_people": int(len(ids)), "celeba_chips": int(keep.sum()), "lfw_people": 0, "lfw_single": 0, "lfw_chips": 0}
    if args.lfw == "none" and not args.shared_cache:
        return tr_c, tr_l, np.flatnonzero(keep), info
    d = np.load(WORK / "lfw.npz")
    chips = np.concatenate([tr_c, d["chips"]])
    labels = np.concatenate([tr_l, d["labels"] + int(tr_l.max()) + 1])
    people = {"none": [], "multi": np.flatnonzero(~d["single"]), "all": np.arange(len(d["single"]))}[args.lfw]
    lk = np.isin(d["labels"], people)
    info.update(lfw_people=int(len(people)), lfw_single=int(d["single"][people].sum()), lfw_chips=int(lk.sum()))
    return chips, labels, np.flatnonzero(np.concatenate([keep, lk])), info


# ---- metrics --------------------------------------------------------------------------------

def domains(test_chips: np.ndarray) -> dict[str, np.ndarray]:
    path = WORK / "test_domains.npz"
    if path.is_file():
        d = np.load(path)
        return {k: d[k] for k in d.files}
    out = {"clean": test_chips}
    out.update({cam: degraded_set(test_chips, cam) for cam in CAMERAS})
    np.savez(path, **out)
    return out


def metrics(emb: np.ndarray, labels: np.ndarray, seed: int = 0, pairs: int = 3000) -> dict:
    iu, ju = np.triu_indices(len(emb), k=1)
    dist = pair_distances(emb[iu], emb[ju])
    same = labels[iu] == labels[ju]
    ident = {}
    for i, lab in enumerate(labels):
        ident.setdefault(str(lab), []).append(str(i))
    ps = generate_pairs(ident, pairs, 10, seed=seed)
    i1 = np.array([int(p.ref1) for p in ps.pairs()])
    i2 = np.array([int(p.ref2) for p in ps.pairs()])
    sm = np.array([p.same for p in ps.pairs()])
    kf = kfold_accuracy(pair_distances(emb[i1], emb[i2]), sm, ps.fold_ids())
    thr, acc = best_threshold(dist, same)
    return {"tar_at_far_1e-3": tar_at_far(dist, same, 1e-3)["tar"], "accuracy_10fold": kf["mean"],
            "accuracy_10fold_std": kf["std"], "accuracy_at_0.6": accuracy_at(dist, same, 0.6),
            "best_threshold": thr, "accuracy_at_best": acc}


def enrolled_metrics(clean: np.ndarray, probe: np.ndarray, labels: np.ndarray) -> dict:
    """The deployment: clean enrolment photos against the camera's pictures.  Verification on
    every (clean, camera) pair of different source photos; identification of each camera
    picture against a gallery of one clean photo per person (its own photo's pictures left out)."""
    from dlibbridge.eval.metrics import cross_verification, gallery_identification, one_per_person
    src = np.arange(len(labels))
    v = cross_verification(clean, labels, probe, labels, src, src, far_targets=(1e-3,))
    gallery = one_per_person(labels)
    probes = np.setdiff1d(src, gallery)
    ident = gallery_identification(clean[gallery], labels[gallery], probe[probes], labels[probes])
    return {"tar_at_far_1e-3": v["tar_at_far"]["1e-3"], "accuracy_at_0.6": v["accuracy_at_0.6"],
            "accuracy_at_best": v["accuracy_at_best_threshold"], "best_threshold": v["best_threshold"],
            "rank1": ident["rank1"], "tpir_at_fpir_1e-2": ident["tpir"]}


def evaluate(model, doms: dict, labels: np.ndarray) -> dict:
    """Per domain, every pair within it; per camera, also clean enrolment vs that camera
    (``clean>X``)."""
    from dlibbridge.port.infer import embed_chips
    emb = {k: embed_chips(model, v) for k, v in doms.items()}
    out = {k: metrics(e, labels) for k, e in emb.items()}
    out.update({f"clean>{k}": enrolled_metrics(emb["clean"], e, labels) for k, e in emb.items() if k != "clean"})
    return out


def base_model():
    from dlibbridge import assets
    from dlibbridge.port.checkpoint import load_model
    return load_model(assets.face_model_path(), trainable=False)


# ---- runs -----------------------------------------------------------------------------------

def run(args) -> None:
    from dlibbridge.train import xq
    torch.set_num_threads(args.threads)
    out = WORK / "runs" / args.name
    if (out / "result.json").is_file() and not args.redo:
        print(f"{out} done"); return
    out.mkdir(parents=True, exist_ok=True)
    tr_c, tr_l, te_c, te_l = load_data()
    pooled = args.lfw != "none" or args.shared_cache
    tr_c, tr_l, train_rows, data_info = training_set(args, tr_c, tr_l)
    if not pooled:                    # the cache holds exactly the run's chips
        tr_c, tr_l, train_rows = tr_c[train_rows], tr_l[train_rows], np.arange(len(train_rows))
    print(f"[{args.name}] training data {data_info}", flush=True)
    doms = domains(te_c)
    base = base_model()
    t0 = time.perf_counter()
    times = {}
    cam = CAMERAS[args.camera]
    if args.sampler in ("estimated", "photos"):
        from dlibbridge.data import camera
        suffix = "-photos" if args.sampler == "photos" else ""
        sampler = camera.load_camera(WORK / f"camera-{args.camera}{suffix}.json").degradations()
    elif args.spread > 0:
        sampler = camera_range_fn(cam, args.spread)
    else:
        sampler = camera_fn(cam)
    model = base
    # unlabeled target photos: degraded chips of the *training* identities (never the test ones)
    if "adabn" in args.method:
        rng = np.random.default_rng(args.seed + 1)
        pick = rng.permutation(len(tr_c))[: args.target_n]
        target = np.stack([sampler(tr_c[i], np.random.default_rng((args.seed, 7, int(i)))) for i in pick])
        source = tr_c[rng.permutation(len(tr_c))[: args.target_n]]
        t = time.perf_counter()
        model = xq.adapt_batchnorm(base, source, target, alpha=args.alpha, upto=args.adabn_upto)
        times["adabn_s"] = time.perf_counter() - t
    if args.method != "adabn":
        cfg = xq.XQConfig(train_from=args.train_from, versions=args.versions, steps=args.steps,
                          identities=args.P, per_identity=args.K, lr=args.lr, w_identity=args.w_id,
                          w_xq=args.w_xq, w_relational=args.w_rel, w_same=args.w_same, seed=args.seed,
                          clean_in_identity=not args.no_clean, w_bank=args.w_bank, bank_tau=args.bank_tau,
                          train_until=args.train_until, w_xrel=args.w_xrel, w_bankrel=args.w_bankrel,
                          xq_distance=args.xq_distance)
        if args.method == "degrade":      # identity loss on degraded + clean only: no teacher terms
            cfg.w_xq = cfg.w_relational = cfg.w_same = 0.0
        log = lambda s: print(f"[{args.name}] {s}", flush=True)  # noqa: E731
        data_tag = "-pool" if pooled else (f"-p{args.people}" if args.people is not None else "")
        key = (f"cache-{args.camera}-{args.sampler}-s{args.spread:g}-v{args.versions}-{args.train_from}-seed{args.seed}{data_tag}"
               + (f"-adabn{args.alpha:g}-{args.adabn_upto}-n{args.target_n}" if "adabn" in args.method else "") + ".pt")
        if (WORK / key).is_file():
            cache = read_torch(WORK / key, what="benchmark feature cache")
            times["cache_s"] = 0.0
            times["cache_reused_s"] = cache["seconds"]
        else:
            cache = xq.build_cache(model, tr_c, sampler, cfg, log=log)
            torch.save(cache, WORK / (key + ".partial"))
            os.replace(WORK / (key + ".partial"), WORK / key)
            times["cache_s"] = cache["seconds"]
        cache = {k: (v[train_rows] if k != "seconds" else v) for k, v in cache.items()}
        labels = tr_l[train_rows]
        t = time.perf_counter()
        model, rows = (train_affines_only(model, cache, labels, cfg, log) if args.affine_only
                       else xq.train_xq(model, cache, labels, cfg, log=log))
        times["train_s"] = time.perf_counter() - t
        with open(out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader(); w.writerows(rows)
        del cache
    times["wall_s"] = time.perf_counter() - t0
    torch.save(model.state_dict(), out / "model_state.pt")
    res = {"name": args.name, "args": vars(args), "data": data_info, "times": times,
           "metrics": evaluate(model, doms, te_l)}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: round(v["tar_at_far_1e-3"], 4) for k, v in res["metrics"].items()}), times)


def train_affines_only(base, cache: dict, labels: np.ndarray, cfg, log):
    """The ablation ``--affine-only``: the trainer's loss and batches, but only the scale and
    shift of every deployed batch-norm (``DlibAffine``, buffers in the port) learn, from the stem
    up (BitFit-like: 7,104 numbers)."""
    from torch import nn
    from dlibbridge.port.arch import DlibAffine
    from dlibbridge.train import xq
    tr = xq.XQTrainer(base, cache, labels, cfg)
    for p in tr.student.parameters():
        p.requires_grad_(False)
    params = []
    for m in tr.student.modules():
        if isinstance(m, DlibAffine):
            for k in ("scale", "shift"):
                p = nn.Parameter(m._buffers.pop(k).clone())
                setattr(m, k, p)
                params.append(p)
    tr.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tr.schedule = torch.optim.lr_scheduler.LambdaLR(tr.opt, tr.lr_factor)
    rows, t0 = [], time.perf_counter()
    for _ in range(cfg.steps):
        rows.append({**tr.step(), "seconds": time.perf_counter() - t0})
        if rows[-1]["step"] % 50 == 0:
            log(f"step {rows[-1]['step']} total {rows[-1]['total']:.4f} {rows[-1]['seconds']:.0f} s")
    model = base_model()
    model.load_state_dict({k: v.detach() for k, v in tr.student.state_dict().items()})
    return model, rows


def camera_photo_fn(p: dict):
    """photo, chip-region width (px), rng → the photo as camera ``p`` would have taken it: the
    same chain as :func:`camera_fn`, done on the whole photo at the scale where the chip region
    spans ``side`` pixels (``side`` None: 150, the chip's own scale), written as a JPEG file at
    the camera's quality.  This is what a user has: the camera's own files."""
    def apply(photo: np.ndarray, region: float, rng: np.random.Generator) -> bytes:
        scale = (p["side"] or 150) / region
        h, w = photo.shape[:2]
        img = cv2.resize(photo, (max(8, round(w * scale)), max(8, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if p["gray"]:
            img = augment.to_grayscale(img)
        img = augment.blur(img, p["blur"] * (p["side"] or 150) / 150)
        img = add_noise(img, p["noise"], rng)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, p["jpeg"] or 95])
        return buf.tobytes()
    return apply


def _chip_regions(rows: list[dict]) -> list[float]:
    """Width of get_face_chip_details' region for each manifest row (its box and 5 landmarks)."""
    import dlib
    out = []
    for r in rows:
        pts = [int(v) for v in r["landmarks"].split()]
        shape = dlib.full_object_detection(
            dlib.rectangle(int(r["left"]), int(r["top"]), int(r["right"]), int(r["bottom"])),
            [dlib.point(pts[i], pts[i + 1]) for i in range(0, len(pts), 2)])
        out.append(dlib.get_face_chip_details(shape, 150, 0.25).rect.width())
    return out


def estimate(args) -> None:
    """The camera profile the runs may train with: ``dlibbridge camera``'s estimator on
    ``--n`` pictures of the *training* identities taken by each camera (unlabeled; the test
    identities are never used).  ``--source chips``: aligned chips degraded by the camera,
    stored losslessly as PNG like an aligner's output (``camera-X.json``); ``--source photos``:
    the original photos as the camera would have written them, JPEG files
    (``camera-X-photos.json``)."""
    from dlibbridge.data import camera
    tr_c, _, _, _ = load_data()
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(tr_c))[: args.n]
    if args.source == "photos":
        split = json.loads((WORK / "split.json").read_text())
        chips_dir = Path(split["chips_dir"])
        with open(chips_dir / "manifest.csv", newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("status") == "ok" and r["identity"] in set(split["train_ids"])]
        rows = [rows[i] for i in rng.permutation(len(rows))[: args.n]]
        regions = _chip_regions(rows)
        photos_root = Path(split.get("photos_dir", REPO.parent / "shared" / "data" / "celeba-dev"))
    for cam in CAMERAS:
        t = time.perf_counter()
        if args.source == "photos":
            folder = WORK / f"camera-{cam}-photos"
            folder.mkdir(exist_ok=True)
            f = camera_photo_fn(CAMERAS[cam])
            for k, (r, region) in enumerate(zip(rows, regions)):
                data = f(load_png(photos_root / r["source"]), region, np.random.default_rng((args.seed, 98, k)))
                (folder / f"{k:05d}.jpg").write_bytes(data)
            path = WORK / f"camera-{cam}-photos.json"
        else:
            folder = WORK / f"camera-{cam}-chips"
            folder.mkdir(exist_ok=True)
            f = camera_fn(CAMERAS[cam])
            for i in pick:
                out = f(tr_c[i], np.random.default_rng((args.seed, 99, int(i))))
                cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
            path = WORK / f"camera-{cam}.json"
        profile = camera.measure_folder(folder)
        path.unlink(missing_ok=True)
        path.with_suffix(".png").unlink(missing_ok=True)
        camera.write_camera(profile, path)
        print(f"camera {cam} (true {CAMERAS[cam]}), {args.source}, estimated in {time.perf_counter() - t:.0f} s:")
        print(profile.summary())


def train_store() -> Path:
    """The training identities' chips as a chip store (``DATA`` of the product runs)."""
    from dlibbridge.data.store import pack
    store = WORK / "train.store"
    if (store / "index.json").is_file():
        return store
    split = json.loads((WORK / "split.json").read_text())
    people = read_chips(Path(split["chips_dir"]))
    links = WORK / "train.links"
    for person in split["train_ids"]:
        (links / person).mkdir(parents=True, exist_ok=True)
        for c in people[person]:
            dst = links / person / c.name
            if not dst.exists():
                os.symlink(c.resolve(), dst)
    pack(links, store, progress=False)
    return store


def product(args) -> None:
    """The shipped path: ``dlibbridge finetune TRAIN_STORE --camera camera-X.json`` with every
    other setting at its default (plus ``--seed``, and what ``--extra`` names), then the test
    identities in every domain.  The camera profile is the one `estimate` measured."""
    from dlibbridge.port.checkpoint import load_torch
    from dlibbridge.train.config import FinetuneConfig
    from dlibbridge.train.loop import finetune
    torch.set_num_threads(args.threads)
    out = WORK / "runs" / args.name
    if (out / "result.json").is_file():
        print(f"{out} done"); return
    run_dir = out / "run"
    extra = json.loads(args.extra) if args.extra else {}
    if args.target_photos:
        tr_c, _, _, _ = load_data()
        folder = WORK / f"target-{args.camera}-chips"
        if not folder.is_dir():
            rng = np.random.default_rng(args.seed + 1)
            folder.mkdir()
            f = camera_fn(CAMERAS[args.camera])
            for i in rng.permutation(len(tr_c))[:300]:
                cv2.imwrite(str(folder / f"{i:05d}.png"),
                            cv2.cvtColor(f(tr_c[i], np.random.default_rng((7, int(i)))), cv2.COLOR_RGB2BGR))
        extra["target_photos"] = str(folder)
    cfg, origin = FinetuneConfig.compose({
        "data": str(train_store()), "out": str(run_dir), "seed": args.seed, "progress": True,
        "camera": str(WORK / f"camera-{args.camera}{'-photos' if args.profile == 'photos' else ''}.json"), **extra})
    t = time.perf_counter()
    summary = finetune(cfg, resume=(run_dir / "config.json").is_file(), origin=origin)
    wall = time.perf_counter() - t
    _, _, te_c, te_l = load_data()
    model = load_torch(run_dir / "model.pt")
    res = {"name": args.name, "args": vars(args), "times": {"wall_s": wall, "train_s": summary["train_elapsed_s"]},
           "exported_step": summary["exported_step"], "export_check": summary["export_check"],
           "recommended_threshold": summary.get("recommended_threshold"),
           "metrics": evaluate(model, domains(te_c), te_l)}
    # A finished run keeps only the exported weights: the last step's figures are the exported
    # ones when it exported the last step (as every round-3 run did), else unknown here.
    if summary["exported_step"] == summary["final_step"]:
        res["metrics_last_step"] = res["metrics"]
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: round(v["tar_at_far_1e-3"], 4) for k, v in res["metrics"].items()}), res["times"])


def eval_base(args) -> None:
    torch.set_num_threads(args.threads)
    _, _, te_c, te_l = load_data()
    doms = domains(te_c)
    t = time.perf_counter()
    res = {"name": "base", "metrics": evaluate(base_model(), doms, te_l), "times": {"eval_s": time.perf_counter() - t}}
    (WORK / "runs" / "base").mkdir(parents=True, exist_ok=True)
    (WORK / "runs" / "base" / "result.json").write_text(json.dumps(res, indent=1))
    for k, v in res["metrics"].items():
        print(k, {a: round(b, 4) for a, b in v.items()})


def reeval(args) -> None:
    """Measure finished ``run``s again (their ``model_state.pt``) with the current metrics, e.g.
    the enrolled-vs-camera figures added after they ran; result.json keeps everything else."""
    torch.set_num_threads(args.threads)
    _, _, te_c, te_l = load_data()
    for name in args.names:
        path = WORK / "runs" / name / "result.json"
        res = json.loads(path.read_text())
        model = base_model()
        model.load_state_dict(read_torch(WORK / "runs" / name / "model_state.pt", what="benchmark weights"))
        res["metrics"] = evaluate(model, domains(te_c), te_l)
        path.write_text(json.dumps(res, indent=1))
        print(name, {k: round(v["tar_at_far_1e-3"], 4) for k, v in res["metrics"].items()}, flush=True)


def fit(args) -> None:
    """How well runs fit the people they trained on: TAR@FAR=1e-3, clean and camera ``--camera``,
    on ``--ids`` training identities (at most 12 chips each), their chips degraded with another
    seed than training used.  Set beside the test figures, it separates fitting from carrying
    over to new people."""
    torch.set_num_threads(args.threads)
    tr_c, tr_l, _, _ = load_data()
    ids = np.random.default_rng(0).permutation(np.unique(tr_l))[: args.ids]
    rows = np.concatenate([np.flatnonzero(tr_l == i)[:12] for i in ids])
    chips, labels = tr_c[rows], tr_l[rows]
    doms = {"clean": chips, args.camera: degraded_set(chips, args.camera, seed=777)}
    for name in args.names:
        model = base_model()
        if name != "base":
            model.load_state_dict(read_torch(WORK / "runs" / name / "model_state.pt", what="benchmark weights"))
        res = evaluate(model, doms, labels)
        print(name, {k: round(v["tar_at_far_1e-3"] * 100, 2) for k, v in res.items()}, flush=True)


COLUMNS = (("tar_at_far_1e-3", "TAR@1e-3", 100), ("accuracy_at_0.6", "acc@0.6", 100),
           ("accuracy_10fold", "10-fold", 100), ("accuracy_at_best", "acc@best", 100), ("best_threshold", "thr", 1))
#: clean enrolment vs a camera (``clean>X``): no 10-fold, identification instead
ENROLLED_COLUMNS = (("tar_at_far_1e-3", "TAR@1e-3", 100), ("accuracy_at_0.6", "acc@0.6", 100),
                    ("rank1", "rank-1", 100), ("tpir_at_fpir_1e-2", "TPIR@1e-2", 100))


def table(args) -> None:
    """Markdown table of the finished runs whose name starts with ``--only`` (all but ``prod*``
    by default); ``--seeds`` folds runs named PREFIX-sN into one row of mean ± std."""
    rows = [json.loads(p.read_text()) for p in sorted((WORK / "runs").glob("*/result.json"))]
    if args.only:
        rows = [r for r in rows if r["name"] == "base" or r["name"].startswith(args.only)]
    else:
        rows = [r for r in rows if not r["name"].startswith("prod")]
    if args.last:
        rows = [dict(r, metrics=r.get("metrics_last_step", r["metrics"])) for r in rows]
    doms = list(dict.fromkeys(d for r in rows for d in r["metrics"]))
    cols = {d: ENROLLED_COLUMNS if d.startswith("clean>") else COLUMNS for d in doms}
    print("| run | " + " | ".join(f"{d} {c[1]}" for d in doms for c in cols[d]) + " | wall s |")
    print("|" + "---|" * (2 + sum(len(c) for c in cols.values())))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = r["name"].rsplit("-s", 1)[0] if args.seeds and r["name"] != "base" else r["name"]
        groups.setdefault(name, []).append(r)
    for name, rs in groups.items():
        cells = []
        for d in doms:
            for key, _, scale in cols[d]:
                if not all(d in r["metrics"] for r in rs):
                    cells.append("-")
                    continue
                v = np.array([r["metrics"][d][key] for r in rs]) * scale
                fmt = "{:.3f}" if scale == 1 else "{:.2f}"
                cells.append(fmt.format(v.mean()) + (f" ± {fmt.format(v.std(ddof=1))}" if len(v) > 1 else ""))
        wall = np.array([r.get("times", {}).get("wall_s", 0) for r in rs])
        label = f"{name} (n={len(rs)})" if len(rs) > 1 else name
        print(f"| {label} | " + " | ".join(cells) + f" | {wall.mean():.0f} |")


def scaling(args) -> None:
    """The scaling curve: runs whose name starts with ``--only``, by the number of people they
    trained on, beside the base — a Markdown table and a plot (``--plot``) of TAR@FAR=1e-3 on
    the test people (camera A, camera B, clean, and clean enrolment vs camera A)."""
    runs = [json.loads(p.read_text()) for p in sorted((WORK / "runs").glob(f"{args.only}*/result.json"))]
    runs = sorted((r for r in runs if "data" in r), key=lambda r: (r["data"]["celeba_people"] + r["data"]["lfw_people"],
                                                                r["data"]["lfw_single"], r["name"]))
    base = json.loads((WORK / "runs" / "base" / "result.json").read_text())["metrics"]
    series = (("A", "tar_at_far_1e-3", "camera A"), ("B", "tar_at_far_1e-3", "camera B"),
              ("clean", "tar_at_far_1e-3", "clean"), ("clean>A", "tar_at_far_1e-3", "clean enrolment vs camera A"))
    extra = (("clean", "accuracy_at_0.6", "clean acc@0.6"), ("clean>A", "rank1", "clean>A rank-1"),
             ("clean>A", "tpir_at_fpir_1e-2", "clean>A TPIR@FPIR=1e-2"))

    def cell(m, d, k):
        return f"{100 * m[d][k]:.2f}" if d in m else "-"
    head = ["run", "people (celeba + LFW 2+ photos + LFW one photo)", "chips"] + [f"{t} TAR@1e-3" for *_, t in series] + [t for *_, t in extra] + ["wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| base | 0 | 0 | " + " | ".join(cell(base, d, k) for d, k, _ in series + extra) + " | 0 |")
    for r in runs:
        dd = r["data"]
        people = f"{dd['celeba_people'] + dd['lfw_people']} ({dd['celeba_people']} + {dd['lfw_people'] - dd['lfw_single']} + {dd['lfw_single']})"
        print(f"| {r['name']} | {people} | {dd['celeba_chips'] + dd['lfw_chips']} | "
              + " | ".join(cell(r["metrics"], d, k) for d, k, _ in series + extra) + f" | {r['times']['wall_s']:.0f} |")
    if not args.plot:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.2))

    def people(r):
        return r["data"]["celeba_people"] + r["data"]["lfw_people"]
    # The curve: seed-0 runs that start from celeba-dev people; other seeds and runs without
    # them (LFW only) are single markers.
    curve = [r for r in runs if not re.search(r"-s\d+$", r["name"]) and r["data"]["celeba_people"]]
    for (d, k, title), colour in zip(series, ("#cc3311", "#0077bb", "#009988", "#ee7733")):
        if not all(d in r["metrics"] for r in curve):
            continue
        ax.plot([people(r) for r in curve], [100 * r["metrics"][d][k] for r in curve], "o-", color=colour, label=title)
        for r in runs:
            if r not in curve and d in r["metrics"]:
                ax.plot(people(r), 100 * r["metrics"][d][k], "o" if r["data"]["celeba_people"] else "s",
                        color=colour, ms=4 if r["data"]["celeba_people"] else 6,
                        mfc=colour if r["data"]["celeba_people"] else "none")
        if d in base:
            ax.axhline(100 * base[d][k], color=colour, ls=":", lw=1)
    for r in runs:
        note = "LFW only" if not r["data"]["celeba_people"] else "+1-photo" if r["data"]["lfw_single"] and r in curve else ""
        if note:
            ax.annotate(note, (people(r), 100 * r["metrics"]["A"]["tar_at_far_1e-3"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ticks = sorted({people(r) for r in runs})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training people (celeba-dev, then + LFW)")
    ax.set_ylabel("TAR @ FAR=1e-3 on 69 unseen people (%)")
    ax.set_title(args.title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--chips", required=True)
    p.add_argument("--test-ids", type=int, default=69)
    p.add_argument("--test-per-id", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("lfw-subset")
    p.add_argument("--lfw", required=True, help="LFW deep-funneled: DIR/<person>/<photo>")
    p.add_argument("--out", required=True)
    p.add_argument("--multi", type=int, default=400)
    p.add_argument("--single", type=int, default=400)
    p.add_argument("--cap", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("prepare-lfw")
    p.add_argument("--chips", required=True, help="dlibbridge align output of LFW")
    p.add_argument("--cap", type=int, default=4, help="chips kept per person with more")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("eval-base")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("table")
    p.add_argument("--only", help="runs whose name starts with this (and the base)")
    p.add_argument("--seeds", action="store_true", help="mean ± std over NAME-sN runs")
    p.add_argument("--last", action="store_true", help="product runs: the last step's model, not the exported one")
    p = sub.add_parser("scaling")
    p.add_argument("--only", default="scale-", help="runs whose name starts with this")
    p.add_argument("--plot", help="write the curve here (PNG)")
    p.add_argument("--title", default="scaling: camera-A fine-tuning at a fixed budget (dotted: base)")
    p = sub.add_parser("product")
    p.add_argument("name")
    p.add_argument("--camera", default="A", choices=sorted(CAMERAS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-photos", action="store_true", help="also adapt to 300 unlabeled target chips")
    p.add_argument("--profile", default="chips", choices=["chips", "photos"],
                   help="the camera profile `estimate` measured on degraded chips or on the camera's photos")
    p.add_argument("--extra", help="JSON of further FinetuneConfig fields (ablations)")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("reeval")
    p.add_argument("names", nargs="+", help="run names (`run`)")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("fit")
    p.add_argument("names", nargs="+", help="run names (`run`), or base")
    p.add_argument("--camera", default="A", choices=sorted(CAMERAS))
    p.add_argument("--ids", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("estimate")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--source", default="chips", choices=["chips", "photos"])
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run")
    p.add_argument("name")
    p.add_argument("--method", default="xq", choices=["xq", "degrade", "adabn", "xq+adabn"])
    p.add_argument("--camera", default="A", choices=sorted(CAMERAS))
    p.add_argument("--sampler", default="range", choices=["range", "estimated", "photos"],
                   help="training degradations: the true camera with each parameter ±spread, or "
                        "sampled from the profile `estimate` measured on unlabeled chips / photos")
    p.add_argument("--spread", type=float, default=0.25)
    p.add_argument("--train-from", default="level1")
    p.add_argument("--train-until", default=None, help="last trained stage (default: all above, and the fc)")
    # The recipe's batches, versions and length (finetune --recipe camera, through XQConfig);
    # the ablation baseline of rounds 1-2 below (level1, 1e-4, squared, no same-input term).
    p.add_argument("--versions", type=int, default=XQ.versions)
    p.add_argument("--steps", type=int, default=XQ.steps)
    p.add_argument("-P", type=int, default=XQ.identities)
    p.add_argument("-K", type=int, default=XQ.per_identity)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--w-id", type=float, default=1.0)
    p.add_argument("--w-xq", type=float, default=1.0)
    p.add_argument("--w-rel", type=float, default=1.0)
    p.add_argument("--w-same", type=float, default=0.0)
    p.add_argument("--no-clean", action="store_true")
    p.add_argument("--w-bank", type=float, default=0.0)
    p.add_argument("--bank-tau", type=float, default=0.05)
    p.add_argument("--w-xrel", type=float, default=0.0)
    p.add_argument("--w-bankrel", type=float, default=0.0)
    p.add_argument("--xq-distance", default="squared", choices=["squared", "cosine"])
    p.add_argument("--affine-only", action="store_true", help="train only the deployed batch-norms' scale/shift")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--adabn-upto", default=None)
    p.add_argument("--target-n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--people", type=int, help="train on the first N celeba-dev training people (default all; 0: none)")
    p.add_argument("--lfw", default="none", choices=["none", "multi", "all"],
                   help="add LFW people (`prepare-lfw`): those with 2+ chips, or all, one-chip people too")
    p.add_argument("--shared-cache", action="store_true",
                   help="one cache of every celeba-dev training chip and every LFW chip for all runs on them")
    args = ap.parse_args()
    {"prepare": prepare, "lfw-subset": lfw_subset, "prepare-lfw": prepare_lfw, "estimate": estimate, "product": product, "eval-base": eval_base, "run": run, "fit": fit, "reeval": reeval, "table": table,
     "scaling": scaling}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
