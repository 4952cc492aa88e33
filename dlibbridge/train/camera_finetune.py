"""``dlibbridge finetune DATA --camera camera.json``: fine-tune dlib's face model for one camera.

The run (all in RUN_DIR, resumable with ``--resume``):

1. DATA is opened and split by identity exactly as a plain run (:func:`loop.split_identities`).
2. The base model, in its deployed form, is the teacher.  With ``--target-photos DIR`` its
   batch-norm affines are first re-derived from unlabeled target-camera chips
   (:func:`xq.adapt_batchnorm`); that adapted model is what the student starts from.
3. Every training chip is degraded ``--camera-versions`` times by samples of the camera profile
   (:mod:`dlibbridge.data.camera`) and kept in ``RUN_DIR/feature_cache.pt`` with the teacher's
   descriptors of the clean chips: the uint8 versions themselves, or, with ``--freeze-until``,
   the frozen levels' output for each (:func:`xq.frozen_features`).
4. :class:`xq.XQTrainer` trains the levels above ``--freeze-until`` (by default all of them):
   identity + cross-quality + relational + same-input terms (docs/finetune.md).
5. Validation on the held-out identities in each domain — ``clean`` and ``camera`` (the same
   chips degraded by the profile, fixed per chip), and ``target`` (``--target-val DIR``: the
   user's labeled chips from the camera itself) — at step 0 and every ``--checkpoint-every``
   steps (their versions are cached the same way).
   ``--select-metric DOMAIN:METRIC`` picks the exported step (default ``camera:tar@far``,
   ``target:tar@far`` with ``--target-val``) among
   the steps whose clean TAR@FAR is at most ``--clean-limit`` below the base's; step 0 (the base,
   or the adapted base) is always a candidate.  The recipe's ``--export last-eligible`` exports
   the last step unless it fails that guard, and the selected step only then.
6. ``model.dat`` (deployed; checked in ``dlib.face_recognition_model_v1``), ``model.pt``,
   ``threshold.json`` (the distance threshold that is best on the target domain when there is
   one, else on the camera domain, beside dlib's 0.6), ``val.csv``/``curves.png``/``summary.json``
   with every domain.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import sha256_file, write_torch
from .._load import read_torch
from ..assets import resolve_model
from . import xq
from .config import CAMERA_RECIPE, CHECKPOINT_FILE, CONFIG_FILE, RESUME_ADVICE, FinetuneConfig, FinetuneError
from .dist import Dist
from .rundir import write_logs, write_run_json

__all__ = ["camera_finetune", "load_target_val", "DOMAINS"]

DOMAINS = ("clean", "camera")
TARGET = "target"
CACHE_FILE = "feature_cache.pt"
THRESHOLD_FILE = "threshold.json"
STEP_FIELDS = ["step", "loss", "identity", "xq", "relational", "same", "lr", "elapsed_s"]


def _train_from(cfg: FinetuneConfig, model) -> str:
    """The first trained stage: the one above ``--freeze-until`` (the stem with ``none``)."""
    names = ["none"] + xq.stages(model)
    return names[names.index(cfg.freeze_until) + 1]


def _degraded(chips: np.ndarray, degrade, seed: int, salt: int) -> np.ndarray:
    return np.stack([degrade(np.ascontiguousarray(c), np.random.default_rng((seed, salt, i))) for i, c in enumerate(chips)])


def _fit_identities_per_batch(cfg: FinetuneConfig, store) -> FinetuneConfig:
    """The recipe's 16 identities per batch need 18 people (two held out for validation); a
    small photo set would be refused outright.  Lower -P to what its identities allow, two held
    out, and say so (config.json records the -P used, so a resume keeps it)."""
    labels = np.asarray(store.labels)
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    usable = int((counts >= 2).sum())
    p = cfg.identities_per_batch
    if usable >= p + 2 or usable - 2 < 2:
        return cfg
    print(f"note: -P lowered from {p} to {usable - 2}: the data has {usable} identities with 2+ images "
          "and 2 are held out for validation", file=sys.stderr)
    return dataclasses.replace(cfg, identities_per_batch=usable - 2)


def load_target_val(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The labeled target-camera chips of ``--target-val``: a chip store, or a folder read as
    DATA is (``data.store.chip_entries``: DIR/<person>/<chip>, or align's manifest).  Checked
    before the run folder exists, so a wrong folder costs nothing.  Returns (chips, labels,
    unreadable files skipped); chips outside a person folder carry no label and are left out."""
    from ..data.store import CHIP_SHAPE, ChipStore, NotAChipError, StoreError, chip_entries, read_chips
    root = Path(path)
    if not root.is_dir():
        raise FinetuneError(f"--target-val {root}: not a folder (expected aligned chips DIR/<person>/<chip>)")
    skipped = []
    try:
        store = ChipStore(root)
    except StoreError:
        store = None
    if store is not None:
        keep = np.flatnonzero(np.asarray(store.labels) >= 0)
        chips, labels = np.asarray(store.chips[keep]), np.asarray(store.labels)[keep]
    else:
        try:
            read, skipped = read_chips(root, [e for e in chip_entries(root) if e.identity])
        except NotAChipError as err:
            raise FinetuneError(f"--target-val: {err}") from None
        names: dict[str, int] = {}
        chips = np.stack([rgb for _, rgb in read]) if read else np.zeros((0, *CHIP_SHAPE), np.uint8)
        labels = np.array([names.setdefault(e.identity, len(names)) for e, _ in read], dtype=np.int64)
    _, counts = np.unique(labels, return_counts=True)
    if (counts >= 2).sum() < 2:
        raise FinetuneError(f"--target-val {root}: {int((counts >= 2).sum())} people with 2+ readable chips; "
                            "validation needs at least 2 (DIR/<person>/<chip>, aligned 150x150)")
    return chips, labels, skipped


class _CameraJob:
    def __init__(self, cfg: FinetuneConfig, resume: bool, target: tuple | None = None):
        from ..data import camera as camera_mod
        from ..port.checkpoint import load_model
        from .loop import _prepare_run_dir, open_data, split_identities
        self.cfg = cfg
        self.target = target
        self.domains = DOMAINS + ((TARGET,) if cfg.target_val else ())
        try:            # before the run folder exists: a bad profile costs nothing
            self.profile = camera_mod.load_camera(cfg.camera)
        except camera_mod.CameraError as e:
            raise FinetuneError(f"--camera: {e}") from None
        self.run_dir = _prepare_run_dir(cfg, resume, Dist())
        self.resume = resume
        self.degrade = self.profile.degradations()
        self.store = open_data(cfg.data, self.run_dir, cfg.progress)
        self.cfg = cfg = _fit_identities_per_batch(cfg, self.store)
        self.split = split_identities(self.store, cfg, 1)
        if cfg.target_val and not len(self.split.val_rows):
            raise FinetuneError("--target-val: DATA leaves no held-out identities, so the clean-face guard "
                                "(--clean-limit) cannot be checked; add people or raise --val-identities")
        labels = np.asarray(self.store.labels)
        self.train_labels = np.array([self.split.train_classes[int(l)] for l in labels[self.split.train_rows]])
        self.base_path = resolve_model(cfg.base)
        self.base = load_model(self.base_path, trainable=False)
        self.train_from = _train_from(cfg, self.base)
        self.xcfg = xq.XQConfig(
            train_from=self.train_from, train_until=cfg.train_until, versions=cfg.camera_versions, steps=cfg.max_steps or CAMERA_RECIPE["max_steps"],
            identities=cfg.identities_per_batch, per_identity=cfg.images_per_identity, lr=cfg.lr or CAMERA_RECIPE["lr"],
            weight_decay=1e-4 if cfg.weight_decay is None else cfg.weight_decay,
            warmup=20 if cfg.warmup_steps is None else cfg.warmup_steps, w_xq=cfg.xq_weight, xq_distance=cfg.xq_distance,
            w_relational=cfg.relational_weight, w_same=cfg.distill, seed=cfg.seed)
        self.timings: dict[str, float] = {}

    # -- pieces ---------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"[finetune --camera] {msg}", flush=True)

    def start_model(self):
        """The base, or the base adapted to the target photos (unlabeled)."""
        if not self.cfg.target_photos:
            return self.base, None
        from ..port.calibrate import BatchNormError, load_chips
        t = time.perf_counter()
        try:
            target, skipped = load_chips(self.cfg.target_photos, limit=500, seed=self.cfg.seed)
        except BatchNormError as e:
            raise FinetuneError(f"--target-photos: {e}") from None
        if len(target) < 16:
            raise FinetuneError(f"--target-photos {self.cfg.target_photos}: {len(target)} readable chips; "
                                "adaptation needs at least 16")
        rng = np.random.default_rng((self.cfg.seed, 7))
        rows = np.sort(rng.permutation(self.split.train_rows)[:len(target)])
        source = np.asarray(self.store.chips[rows])
        adapted = xq.adapt_batchnorm(self.base, source, target)
        self.timings["target_adaptation_s"] = time.perf_counter() - t
        return adapted, {"target_chips": int(len(target)), "skipped": skipped[:20], "source_chips": int(len(source))}

    def features(self, start) -> tuple[dict, dict]:
        """Training cache and validation features (built once; reused on --resume)."""
        path = self.run_dir / CACHE_FILE
        if path.is_file():
            got = read_torch(path, what="feature cache", advice=f"delete {path} to rebuild it")
            self.target_labels = got.get("target_labels")
            return got["train"], got["val"]
        t = time.perf_counter()
        chips = np.asarray(self.store.chips[self.split.train_rows])
        train = xq.build_cache(start, chips, self.degrade, self.xcfg, log=self._log)
        val = {}
        if len(self.split.val_rows):
            vchips = np.asarray(self.store.chips[self.split.val_rows])
            with torch.no_grad():
                val["clean"] = xq.frozen_features(start, torch.from_numpy(vchips), self.train_from)
                val["camera"] = xq.frozen_features(start, torch.from_numpy(
                    _degraded(vchips, self.degrade, self.cfg.seed, 31337)), self.train_from)
        self.target_labels = None
        if self.cfg.target_val:
            chips, labels, skipped = self.target or load_target_val(self.cfg.target_val)
            if skipped:
                print(f"note: --target-val: {len(skipped)} unreadable files left out (first: {skipped[0]})",
                      file=sys.stderr)
            self.target_labels = torch.from_numpy(labels)
            with torch.no_grad():
                val[TARGET] = torch.cat([xq.frozen_features(start, torch.from_numpy(c), self.train_from)
                                         for c in np.array_split(chips, max(1, len(chips) // 128))])
        self.timings["cache_s"] = time.perf_counter() - t
        write_torch(path, {"train": train, "val": val, "target_labels": self.target_labels})
        return train, val

    def embed_validation(self, model, val: dict):
        """(domain, descriptors, labels) of each validation domain under ``model``."""
        held_out = np.asarray(self.store.labels)[self.split.val_rows]
        with torch.no_grad():
            for d in self.domains:
                labels = np.asarray(self.target_labels) if d == TARGET else held_out
                emb = torch.cat([xq.run_suffix(model, f, self.train_from) for f in val[d].split(128)]).numpy()
                yield d, emb, labels

    def validate(self, model, val: dict, step: int) -> dict | None:
        from .loop import verification_summary
        if not val:
            return None
        rec = {"step": step}
        for d, emb, labels in self.embed_validation(model, val):
            for k, v in verification_summary(emb, labels, self.cfg.select_far).items():
                rec[f"{d}.{k}"] = v
        return rec

    def match_distance_scale(self, model, val: dict) -> tuple[object, dict | None]:
        """A copy of ``model`` whose descriptors are scaled (the fc, so ``model.dat`` carries it)
        by ``s = T / t``: t is the best threshold on the pairs of every validation domain together,
        T is ``--match-threshold``.  Whole-network training keeps the best threshold near the base's
        (~0.56) but changes how accuracy falls off above it: measured, clean accuracy at 0.6 fell
        0.14 points while at the best threshold it rose.  Distances scale, rankings do not: TAR at
        any FAR is unchanged."""
        from ..eval.metrics import best_threshold, pair_distances
        if not self.cfg.match_threshold or not val:
            return model, None
        dist, same = [], []
        for _, emb, labels in self.embed_validation(model, val):
            iu, ju = np.triu_indices(len(emb), k=1)
            dist.append(pair_distances(emb[iu], emb[ju]))
            same.append(labels[iu] == labels[ju])
        t, acc = best_threshold(np.concatenate(dist), np.concatenate(same))
        scale = self.cfg.match_threshold / t
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.fc.weight.mul_(scale)
        return scaled.eval(), {"scale": scale, "best_threshold_before": t, "accuracy_there": acc,
                               "match_threshold": self.cfg.match_threshold, "domains": list(self.domains)}

    def eligible(self, rec: dict, base_rec: dict) -> bool:
        """A step may be exported when its clean TAR@FAR is at most clean_limit below the base's."""
        return rec["clean.tar@far"] >= base_rec["clean.tar@far"] - self.cfg.clean_limit - 1e-12

    # -- run ------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        start, adaptation = self.start_model()
        train, val = self.features(start)
        trainer = xq.XQTrainer(start, train, self.train_labels, self.xcfg)
        domain, metric = c.select()
        key = f"{domain}.{metric}"
        steps_log, vals, best = [], [], None
        ck = self.run_dir / CHECKPOINT_FILE
        if self.resume and ck.is_file():
            st = read_torch(ck, what="checkpoint", advice=RESUME_ADVICE)
            trainer.load_state_dict(st["trainer"])
            steps_log, vals, best, self.timings = st["steps"], st["vals"], st["best"], st["timings"]
            self._log(f"resumed at step {trainer.n}")
        self.write_config(adaptation)
        if not vals:
            rec = self.validate(trainer.student, val, 0)
            if rec:
                vals.append(rec)
                best = {"step": 0, "score": rec[key], "metric": key, "validation": rec}
                write_torch(self.run_dir / "best_state.pt", trainer.student.state_dict())
        t_train = time.perf_counter()
        elapsed0 = self.timings.get("train_s", 0.0)
        while trainer.n < self.xcfg.steps:
            row = trainer.step()
            row["loss"] = row.pop("total")
            row["elapsed_s"] = elapsed0 + time.perf_counter() - t_train
            steps_log.append(row)
            if trainer.n % c.checkpoint_every == 0 or trainer.n == self.xcfg.steps:
                rec = self.validate(trainer.student, val, trainer.n)
                if rec:
                    vals.append(rec)
                    if self.eligible(rec, vals[0]) and rec[key] > best["score"]:
                        best = {"step": trainer.n, "score": rec[key], "metric": key, "validation": rec}
                        write_torch(self.run_dir / "best_state.pt", trainer.student.state_dict())
                    self._log(f"step {trainer.n}: " + ", ".join(f"{d} TAR@FAR {rec[f'{d}.tar@far']:.4f}" for d in self.domains))
                self.timings["train_s"] = elapsed0 + time.perf_counter() - t_train
                write_torch(ck, {"trainer": trainer.state_dict(), "steps": steps_log, "vals": vals, "best": best,
                                 "timings": self.timings})
                write_logs(self.run_dir, steps_log, vals, step_fields=STEP_FIELDS)
        self.timings["train_s"] = elapsed0 + time.perf_counter() - t_train
        model = trainer.student
        exported = trainer.n
        fallback = c.export == "last-eligible" and len(vals) > 1 and not self.eligible(vals[-1], vals[0])
        if (c.export == "best" or fallback) and best is not None and best["step"] != trainer.n:
            model = copy.deepcopy(trainer.student)
            model.load_state_dict(read_torch(self.run_dir / "best_state.pt", what="best-step weights",
                                             advice="export the last step with --export last"))
            exported = best["step"]
        summary = self.export(model.eval(), exported, trainer.n, best, vals, adaptation, val)
        self.timings["wall_s"] = time.perf_counter() - t0
        summary["timings_s"] = {k: round(v, 1) for k, v in self.timings.items()}
        write_run_json(self.run_dir / "summary.json", summary)
        return summary

    def write_config(self, adaptation) -> None:
        c = self.cfg
        write_run_json(self.run_dir / CONFIG_FILE, {
            "config": c.to_json(), "recipe": self.xcfg.to_json(), "camera": self.degrade.describe(),
            "target_adaptation": adaptation,
            "target_val": None if self.target_labels is None else {
                "folder": c.target_val, "chips": int(len(self.target_labels)),
                "identities": int(len(np.unique(np.asarray(self.target_labels))))},
            "data": {"train_chips": int(len(self.split.train_rows)), "train_identities": len(self.split.train_classes),
                     "val_chips": int(len(self.split.val_rows)), "val_identities": self.split.val_identities,
                     "dropped_single": self.split.dropped_single},
            "base_sha256": sha256_file(self.base_path)})

    def export(self, model, exported: int, final: int, best, vals, adaptation, val: dict) -> dict:
        from ..port.checkpoint import save_torch
        from ..port.convert import to_dlib
        from .loop import dlib_export_check
        out = self.run_dir
        final_rec = next((v for v in vals if v["step"] == exported), None)
        model, scaling = self.match_distance_scale(model, val)
        if scaling and final_rec:     # the exported model's own figures: distances have moved
            final_rec = self.validate(model, val, exported)
        to_dlib(model, out / "model.dat", trainable=False)
        save_torch(model, out / "model.pt")
        rows = self.split.val_rows if len(self.split.val_rows) else self.split.train_rows
        check = dlib_export_check(model, out / "model.dat", self.store, rows)
        threshold = None
        if final_rec:
            d = self.domains[-1]
            threshold = {"threshold": final_rec[f"{d}.best_threshold"], "domain": d,
                         "accuracy_at_threshold": final_rec[f"{d}.accuracy"],
                         "accuracy_at_0.6": final_rec[f"{d}.accuracy_at_0.6"],
                         "note":
                         ("distance threshold with the best accuracy on the labeled target-camera chips"
                          if d == TARGET else "distance threshold with the best accuracy on the held-out "
                          "identities as the camera takes them") + "; dlib's default is 0.6"}
            write_run_json(out / THRESHOLD_FILE, threshold)
        per_domain = {}
        if vals:
            for d in self.domains:
                per_domain[d] = {"base": {k.split(".", 1)[1]: v for k, v in vals[0].items() if k.startswith(d + ".")},
                                 "exported": None if not final_rec else
                                 {k.split(".", 1)[1]: v for k, v in final_rec.items() if k.startswith(d + ".")}}
        files = ["model.dat", "model.pt"] + ([THRESHOLD_FILE] if threshold else [])
        return {"exported_step": exported, "final_step": final, "total_steps": self.xcfg.steps, "best": best,
                "domains": per_domain, "recommended_threshold": threshold, "distance_scale": scaling,
                "files": files, "export_check": check,
                "target_adaptation": adaptation, "recipe": self.xcfg.to_json()}


def camera_finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Run (or continue) a camera fine-tune; returns the summary written to summary.json."""
    cfg.validate()
    if torch.cuda.is_available() and cfg.device not in ("auto", "cpu"):
        raise FinetuneError("--camera runs on the CPU (cached features); use --device cpu or auto")
    # A resumed run has the target features cached; it reads DIR again only if it died before.
    target = load_target_val(cfg.target_val) if cfg.target_val and not resume else None
    return _CameraJob(cfg, resume, target).run()
