"""Does fine-tuning help?  Fine-tune dlib's face model on part of celeba-dev and measure, on
*other* people, the base model against the fine-tuned ones — on clean chips and on a degraded
camera (grayscale + low resolution) — plus training speed against dlib's own trainer.

    python tools/bench_finetune.py                      # aligns ../shared/data/celeba-dev first
    python tools/bench_finetune.py --chips ALIGNED_DIR  # reuse an `align` output folder

Protocol:

* chips: ``dlibbridge align`` output; only chips whose manifest status is ``ok`` (a detected
  face) are used.  Identities with >= 2 chips are split by identity (seeded): ``--test-fraction``
  of the people are never trained on.
* models: the base (dlib's model, through the exact torch port), ``clean`` (dlib's metric loss,
  dlib-example jitter) and ``camera`` (the same plus random grayscale / low-resolution
  degradations), each ``--steps`` optimiser steps of P×K from the train people.
* metrics, per model × scenario, on the test people (at most ``--test-per-id`` chips each):
  10-fold accuracy on ``--pairs`` generated identity-disjoint pairs (LFW protocol), TAR at
  FAR = 1e-3 and accuracy at dlib's 0.6 threshold on *all* pairs of the test chips.
  The degraded scenario is ``augment.degrade(gray=True, lowres_side=--lowres)`` on the test chips.
* forgetting: clean-scenario change of each fine-tuned model; a model that loses more than
  0.5 points there while gaining on the degraded camera is flagged, not hidden.
* speed: training images/s of our loop (from the run's summary) and of dlib's ``dnn_trainer``
  (tools/dlib_oracle, dlib's C++ built from its sdist) on the same P×K batches.

Writes ``WORK/results.json`` and prints the Markdown table recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dlibbridge.data.augment import degrade  # noqa: E402
from dlibbridge.data.store import ChipStore, pack  # noqa: E402
from dlibbridge.eval.metrics import kfold_accuracy, pair_distances, tar_at_far, accuracy_at  # noqa: E402
from dlibbridge.eval.pairs import generate_pairs  # noqa: E402

SHARED = REPO.parent / "shared"


def aligned_chips(args) -> Path:
    if args.chips:
        return Path(args.chips)
    from dlibbridge.data.align import align
    out = Path(args.work) / "aligned"
    align(args.photos, out, progress=True)
    return out


def ok_chips(chips_dir: Path) -> dict[str, list[str]]:
    """identity -> chip paths (relative) whose face was detected (manifest status ok)."""
    out: dict[str, list[str]] = {}
    manifest = chips_dir / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{chips_dir} has no manifest.csv: pass an `align` output folder")
    with open(manifest, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("status") == "ok" and row.get("chip") and row.get("identity"):
                out.setdefault(row["identity"], []).append(row["chip"])
    return {k: sorted(v) for k, v in sorted(out.items()) if len(v) >= 2}


def linked_store(chips_dir: Path, people: dict[str, list[str]], work: Path, name: str) -> ChipStore:
    """A chip store of exactly these chips (a folder of symlinks, packed; reused if present)."""
    store = work / f"{name}.store"
    if (store / "index.json").is_file():
        return ChipStore(store)
    links = work / f"{name}.links"
    for person, chips in people.items():
        (links / person).mkdir(parents=True, exist_ok=True)
        for c in chips:
            dst = links / person / Path(c).name
            if not dst.exists():
                os.symlink((chips_dir / c).resolve(), dst)
    return pack(links, store, progress=False)


def embed(model, chips: np.ndarray, device: str) -> np.ndarray:
    from dlibbridge.port.infer import embed_chips
    return embed_chips(model.to(device), chips, device)


def metrics(emb: np.ndarray, labels: np.ndarray, names: list[str], pairset, row_of: dict) -> dict:
    i1 = np.array([row_of[(p.name1, p.ref1)] for p in pairset.pairs()])
    i2 = np.array([row_of[(p.name2, p.ref2)] for p in pairset.pairs()])
    same = np.array([p.same for p in pairset.pairs()])
    kf = kfold_accuracy(pair_distances(emb[i1], emb[i2]), same, pairset.fold_ids())
    iu, ju = np.triu_indices(len(emb), k=1)
    dist_all = pair_distances(emb[iu], emb[ju])
    same_all = labels[iu] == labels[ju]
    return {"accuracy_10fold": kf["mean"], "accuracy_10fold_std": kf["std"],
            "tar_at_far_1e-3": tar_at_far(dist_all, same_all, 1e-3)["tar"],
            "accuracy_at_0.6": accuracy_at(dist_all, same_all, 0.6),
            "pairs_all": int(len(dist_all)), "pairs_10fold": int(len(same))}


def dlib_trainer_speed(store: ChipStore, p: int, k: int, steps: int, work: Path) -> dict | None:
    """Images/s of dlib's own dnn_trainer (oracle) on P×K batches of the train chips."""
    sys.path.insert(0, str(REPO / "tools" / "dlib_oracle"))
    from driver import DlibOracle
    from dlibbridge.port.convert import to_dlib
    from dlibbridge.train.loop import load_base_model
    start = work / "trainable_start.dat"
    if not start.is_file():
        to_dlib(load_base_model(None), start, trainable=True)
    groups = store.identity_indices()
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for lab in rng.choice(sorted(groups), size=p * steps, replace=len(groups) < p * steps):
        rows.extend(rng.choice(groups[lab], size=k, replace=len(groups[lab]) < k))
        labels.extend([int(lab)] * k)
    chips = np.ascontiguousarray(store.chips[np.asarray(rows)])
    oracle = DlibOracle()
    try:
        t = time.perf_counter()
        res = oracle.train(start, chips, labels, steps=steps, lr=1e-4, out=work / "dlib_trained.dat", batch=p * k)
        dt = time.perf_counter() - t
    finally:
        oracle.close()
    return {"images_per_s": steps * p * k / dt, "steps": steps, "seconds": dt, "losses": res.losses}


def finetune_run(name: str, train_store: ChipStore, args, extra: dict) -> tuple[Path, dict]:
    from dlibbridge.train.config import FinetuneConfig
    from dlibbridge.train.loop import finetune
    run = Path(args.work) / f"run-{name}"
    summary_path = run / "summary.json"
    if summary_path.is_file():
        return run, json.loads(summary_path.read_text())
    cfg = FinetuneConfig(data=str(train_store.path), out=str(run), identities_per_batch=args.P,
                         images_per_identity=args.K, max_steps=args.steps, epochs=10_000,
                         val_identities=0, export="last", device=args.device, workers=args.workers,
                         seed=args.seed, checkpoint_every=50, **extra)
    resume = (run / "config.json").is_file()
    return run, finetune(cfg, resume=resume)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", default=str(SHARED / "data" / "celeba-dev"))
    ap.add_argument("--chips", help="existing `dlibbridge align` output of --photos (skips aligning)")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench_finetune"))
    ap.add_argument("--test-fraction", type=float, default=0.4)
    ap.add_argument("--test-per-id", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--lowres", type=int, default=32, help="degraded camera: face chip side in pixels")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("-P", type=int, default=5)
    ap.add_argument("-K", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="data processes (default: 8 on CUDA, 0 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dlib-steps", type=int, default=2, help="dlib trainer steps for the speed ratio (0: skip)")
    ap.add_argument("--table-only", action="store_true", help="re-print the table of WORK/results.json")
    args = ap.parse_args()
    work = Path(args.work)
    if args.table_only:
        out = json.loads((work / "results.json").read_text())
        flag_forgetting(out["results"])
        print(table(out))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    chips_dir = aligned_chips(args)
    people = ok_chips(chips_dir)
    names = sorted(people)
    rng = np.random.default_rng(args.seed)
    test_names = sorted(rng.permutation(names)[: int(round(args.test_fraction * len(names)))].tolist())
    train_people = {n: people[n] for n in names if n not in test_names}
    test_people = {n: sorted(rng.permutation(people[n])[: args.test_per_id].tolist()) for n in test_names}
    split = f"s{args.seed}-t{args.test_fraction:g}"
    train_store = linked_store(chips_dir, train_people, work, f"train-{split}")
    test_store = linked_store(chips_dir, test_people, work, f"test-{split}-n{args.test_per_id}")
    test_chips = np.asarray(test_store.chips)
    test_labels = np.asarray(test_store.labels)
    ident = {n: [Path(p).name for p, lab in zip(test_store.paths, test_labels) if test_store.identities[lab] == n]
             for n in test_store.identities}
    row_of = {(test_store.identities[lab], Path(p).name): i for i, (p, lab) in enumerate(zip(test_store.paths, test_labels))}
    pairset = generate_pairs(ident, args.pairs, 10, seed=args.seed)
    degraded = np.stack([degrade(c, gray=True, lowres_side=args.lowres) for c in test_chips])
    print(f"train: {len(train_people)} people, {len(train_store)} chips; test: {len(test_names)} people, "
          f"{len(test_store)} chips, {args.pairs} 10-fold pairs", file=sys.stderr)

    from dlibbridge.port.checkpoint import load_torch
    from dlibbridge.train.loop import load_base_model
    models = {"base (dlib)": (load_base_model(None), None, None)}
    runs = {"clean": {}, "camera": {"degrade": "gray=0.5,lowres=0.5"}}
    for name, extra in runs.items():
        run, summary = finetune_run(name, train_store, args, extra)
        models[f"fine-tuned: {name}"] = (load_torch(run / "model.pt"), summary, extra)

    results = {}
    for label, (model, summary, extra) in models.items():
        clean = metrics(embed(model, test_chips, args.device), test_labels, names, pairset, row_of)
        deg = metrics(embed(model, degraded, args.device), test_labels, names, pairset, row_of)
        results[label] = {"clean": clean, "degraded": deg, "train": extra,
                          "train_images_per_s": summary and summary.get("train_images_per_s"),
                          "export_check_max_abs_diff": summary and summary["export_check"]["max_abs_diff"]}
        print(f"{label}: clean {clean['accuracy_10fold']:.4f} / degraded {deg['accuracy_10fold']:.4f}", file=sys.stderr)

    speed = dlib_trainer_speed(train_store, args.P, args.K, args.dlib_steps, work) if args.dlib_steps else None
    flag_forgetting(results)
    out = {"args": vars(args), "chips_dir": str(chips_dir), "train_people": len(train_people),
           "train_chips": len(train_store), "test_people": len(test_names), "test_chips": len(test_store),
           "results": results, "dlib_trainer": speed, "seconds": time.time() - t0,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}}
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(table(out))
    return 0


def flag_forgetting(results: dict) -> None:
    """Δ accuracy in points vs the base; flag a model that loses more than 0.5 clean points while
    gaining on the degraded camera.  Deltas are rounded to 1e-6 first: accuracies are counts of
    pairs, and float noise must not decide whether exactly 0.5 is "more than 0.5"."""
    base = results["base (dlib)"]
    for r in results.values():
        r["delta_clean_points"] = round(100 * (r["clean"]["accuracy_10fold"] - base["clean"]["accuracy_10fold"]), 6)
        r["delta_degraded_points"] = round(
            100 * (r["degraded"]["accuracy_10fold"] - base["degraded"]["accuracy_10fold"]), 6)
        r["forgetting_flag"] = r["delta_clean_points"] < -0.5 and r["delta_degraded_points"] > 0


def table(out: dict) -> str:
    rows = ["| model | clean: 10-fold acc | clean: TAR@FAR=1e-3 | degraded: 10-fold acc | degraded: TAR@FAR=1e-3 "
            "| Δ clean (points) | Δ degraded (points) | clean: acc at 0.6 | degraded: acc at 0.6 | train img/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in out["results"].items():
        c, d = r["clean"], r["degraded"]
        flag = " **forgets**" if r["forgetting_flag"] else ""
        speed = f"{r['train_images_per_s']:.1f}" if r["train_images_per_s"] else ""
        rows.append(f"| {label}{flag} | {100 * c['accuracy_10fold']:.2f} ± {100 * c['accuracy_10fold_std']:.2f} "
                    f"| {100 * c['tar_at_far_1e-3']:.2f} | {100 * d['accuracy_10fold']:.2f} ± "
                    f"{100 * d['accuracy_10fold_std']:.2f} | {100 * d['tar_at_far_1e-3']:.2f} "
                    f"| {r['delta_clean_points']:+.2f} | {r['delta_degraded_points']:+.2f} "
                    f"| {100 * c['accuracy_at_0.6']:.2f} | {100 * d['accuracy_at_0.6']:.2f} | {speed} |")
    if out.get("dlib_trainer"):
        s = out["dlib_trainer"]
        rows.append(f"\ndlib dnn_trainer (oracle build): {s['images_per_s']:.2f} img/s over {s['steps']} steps")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
