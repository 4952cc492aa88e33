"""``dlibbridge finetune DATA --camera camera.json``: the camera recipe as an objective of the one loop.

What it plugs into :mod:`.loop` (the loop does the rest: run folder, optimiser, schedule,
checkpoints, validation, selection, export, logs):

* **model** — the base in its deployed form (dlib's batch-norm folded into affines, so step 0
  is the deployed model exactly); with ``--target-photos DIR`` its affines are first re-derived
  from unlabeled target-camera chips (:func:`xq.adapt_batchnorm`), and that adapted model is the
  teacher and where the student starts.  Trained: the stages above ``--freeze-until`` up to
  ``--train-until`` (by default all of them, and the fc).
* **data** — every training chip degraded ``--camera-versions`` times by samples of the camera
  profile (:mod:`dlibbridge.data.camera`), kept with the teacher's descriptors of the clean chips
  in ``RUN_DIR/feature_cache.pt`` while the run lasts (removed when it ends; rebuilt, identical,
  if a finished run is continued): the uint8 versions themselves, or, with ``--freeze-until``, the
  frozen levels' output for each (:func:`xq.frozen_features`).  Step ``n``'s P×K chips, versions
  and mirroring are drawn from a generator seeded by (seed, n).
* **loss terms** — identity (``--loss`` on the degraded and clean views together), cross-quality,
  relational and same-input (``--distill``) (:func:`xq.xq_losses`; docs/finetune.md).
* **validation domains** — the held-out people's chips ``clean`` and ``camera`` (the same chips
  degraded by the profile, fixed per chip), and ``target`` (``--target-val DIR``: the user's
  labeled chips from the camera itself).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import write_torch
from .._load import read_torch
from . import xq
from .config import FinetuneConfig, FinetuneError
from .objective import CLEAN, Context, Objective, validation_rows

__all__ = ["CrossQuality", "precheck", "load_target_val", "CAMERA", "TARGET"]

CAMERA = "camera"
TARGET = "target"
CACHE_FILE = "feature_cache.pt"


def _degraded(chips: np.ndarray, degrade, seed: int, salt: int) -> np.ndarray:
    return np.stack([degrade(np.ascontiguousarray(c), np.random.default_rng((seed, salt, i))) for i, c in enumerate(chips)])


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


def precheck(cfg: FinetuneConfig) -> dict:
    """The camera profile and the target chips, read before the run folder exists: a bad
    profile or folder costs nothing."""
    from ..data import camera as camera_mod
    try:
        profile = camera_mod.load_camera(cfg.camera)
    except camera_mod.CameraError as e:
        raise FinetuneError(f"--camera: {e}") from None
    target = None
    if cfg.target_val:
        target = load_target_val(cfg.target_val)
        if target[2]:
            print(f"note: --target-val: {len(target[2])} unreadable files left out (first: {target[2][0]})",
                  file=sys.stderr)
    return {"profile": profile, "target": target}


class CrossQuality(Objective):
    """The camera recipe (module docstring): deployed student and teacher, cached degraded views,
    identity + cross-quality + relational + same-input terms, clean/camera/target validation."""
    TRAINABLE_FORM = False            # the deployed form: affines, step 0 = model.dat

    def __init__(self, ctx: Context, pre: dict):
        c, split = ctx.cfg, ctx.split
        if ctx.dist.world > 1:
            raise FinetuneError("--camera trains one process on cached views; launch it without torchrun")
        self.cfg, self.store, self.split, self.device, self.amp_dtype = c, ctx.store, split, ctx.device, ctx.amp_dtype
        self.run_dir = Path(ctx.run_dir)
        self.degrade = pre["profile"].degradations()
        self.profile = pre["profile"]
        self.target = pre["target"]
        base = ctx.base
        names = xq.stages(base)
        stages_all = ["none"] + names
        self.train_from = stages_all[stages_all.index(c.freeze_until) + 1]
        self.start, self.adaptation = self._start_model(base)
        self.xcfg = xq.XQConfig(
            train_from=self.train_from, train_until=c.train_until, versions=c.camera_versions,
            identities=c.identities_per_batch, per_identity=c.images_per_identity, w_xq=c.xq_weight,
            xq_distance=c.xq_distance, w_relational=c.relational_weight, w_same=c.distill, seed=c.seed)
        self.model = copy.deepcopy(self.start)
        trained = (names[names.index(self.train_from):] + ["fc"] if c.train_until is None
                   else names[names.index(self.train_from):names.index(c.train_until) + 1])
        self.frozen = [n for n in names + ["fc"] if n not in trained]
        self.model.requires_grad_(False)
        for n in trained:
            getattr(self.model, n).requires_grad_(True)
        self.model.to(ctx.device)
        if c.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.val_rows = validation_rows(split, c)
        labels = np.asarray(ctx.store.labels)[split.train_rows]
        self.train_labels = torch.as_tensor(np.array([split.train_classes[int(l)] for l in labels]))
        from .losses import make_loss
        self.loss_fn = make_loss(c.loss, len(split.train_classes), margin=c.margin, scale=c.scale).to(ctx.device)
        lab = self.train_labels.numpy()
        # A person with one photo is drawn like any other: its K chips are that photo under K
        # camera draws and mirrorings, positives of each other and negatives of everyone else.
        self.groups = {int(l): np.flatnonzero(lab == l) for l in np.unique(lab)}
        self.images_per_step = c.identities_per_batch * c.images_per_identity
        self.steps_per_epoch = c.batches_per_epoch or max(1, len(split.train_rows) // self.images_per_step)
        self.cache = self.val = None
        self.timings: dict[str, float] = {}

    def _start_model(self, base):
        """The base, or the base adapted to the target photos (unlabeled)."""
        c = self.cfg
        if not c.target_photos:
            return base.eval(), None
        from ..port.calibrate import BatchNormError, load_chips
        try:
            target, skipped = load_chips(c.target_photos, limit=500, seed=c.seed)
        except BatchNormError as e:
            raise FinetuneError(f"--target-photos: {e}") from None
        if len(target) < 16:
            raise FinetuneError(f"--target-photos {c.target_photos}: {len(target)} readable chips; "
                                "adaptation needs at least 16")
        rng = np.random.default_rng((c.seed, 7))
        rows = np.sort(rng.permutation(self.split.train_rows)[:len(target)])
        source = np.asarray(self.store.chips[rows])
        adapted = xq.adapt_batchnorm(base, source, target)
        return adapted.eval(), {"target_chips": int(len(target)), "skipped": skipped[:20],
                                "source_chips": int(len(source))}

    # -- the cache ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Training cache and validation features, built once per run (kept for a resume)."""
        path = self.run_dir / CACHE_FILE
        if path.is_file():
            got = read_torch(path, what="feature cache", advice=f"delete {path} to rebuild it")
            self.cache, self.val = got["train"], got["val"]
            return
        t = time.perf_counter()
        log = (lambda s: print(f"finetune --camera: {s}", file=sys.stderr, flush=True)) if self.cfg.progress else None
        chips = np.asarray(self.store.chips[self.split.train_rows])
        start = self.start.to("cpu")
        self.cache = xq.build_cache(start, chips, self.degrade, self.xcfg, log=log)
        self.val = {}
        if len(self.val_rows):
            vchips = np.asarray(self.store.chips[self.val_rows])
            with torch.no_grad():
                self.val[CLEAN] = xq.frozen_features(start, torch.from_numpy(vchips), self.train_from)
                self.val[CAMERA] = xq.frozen_features(start, torch.from_numpy(
                    _degraded(vchips, self.degrade, self.cfg.seed, 31337)), self.train_from)
        if self.target is not None and len(self.val_rows):
            chips = self.target[0]
            with torch.no_grad():
                self.val[TARGET] = torch.cat([xq.frozen_features(start, torch.from_numpy(c), self.train_from)
                                              for c in np.array_split(chips, max(1, len(chips) // 128))])
        self.start.to(self.device)
        self.timings["cache_s"] = time.perf_counter() - t
        write_torch(path, {"train": self.cache, "val": self.val})

    def cleanup(self) -> None:
        (self.run_dir / CACHE_FILE).unlink(missing_ok=True)

    # -- training ----------------------------------------------------------------------------

    def batches(self, epoch: int, start: int):
        first = epoch * self.steps_per_epoch
        return range(first + start, first + self.steps_per_epoch)

    def backward(self, n: int, scaler) -> dict[str, float]:
        """Step ``n``: its chips, versions and mirroring drawn from (seed, n), so a resumed run
        sees what an uninterrupted one would."""
        c, cache = self.cfg, self.cache
        idx, ver, flip = xq.draw_batch(self.groups, cache["degraded"].shape[1], c.identities_per_batch,
                                       c.images_per_identity, c.seed, n)
        views = torch.cat([cache["degraded"][idx, ver], cache["clean"][idx, flip]]).to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            s = xq.run_suffix(self.model, views, self.train_from).float()
        teacher = cache["teacher"][idx, flip].to(self.device)
        terms = xq.xq_losses(s[:len(idx)], s[len(idx):], teacher, self.train_labels[idx].to(self.device),
                             self.xcfg, self.loss_fn)
        scaler.scale(terms["total"]).backward()
        return {"loss": float(terms["total"].detach()), "identity": float(terms["identity"].detach()),
                "distill": float(terms["same"].detach()), "xq": float(terms["xq"].detach()),
                "relational": float(terms["relational"].detach())}

    # -- validation --------------------------------------------------------------------------

    def domains(self) -> dict[str, np.ndarray]:
        if not len(self.val_rows):
            return {}
        held_out = np.asarray(self.store.labels)[self.val_rows]
        out = {CLEAN: held_out, CAMERA: held_out}
        if self.target is not None:
            out[TARGET] = np.asarray(self.target[1])
        return out

    @torch.no_grad()
    def embed(self, model, domain: str) -> np.ndarray:
        model.eval()
        return torch.cat([xq.run_suffix(model, f.to(self.device), self.train_from).float().cpu()
                          for f in self.val[domain].split(128)]).numpy()

    def describe(self) -> dict:
        x = self.xcfg
        return {"camera": self.degrade.describe(),
                "cross_quality": {"train_from": x.train_from, "train_until": x.train_until, "versions": x.versions,
                                  "w_xq": x.w_xq, "w_relational": x.w_relational, "w_same": x.w_same,
                                  "xq_distance": x.xq_distance},
                "target_adaptation": self.adaptation,
                "target_val": None if self.target is None else {
                    "folder": self.cfg.target_val, "chips": int(len(self.target[1])),
                    "identities": int(len(np.unique(self.target[1])))},
                "timings_s": {k: round(v, 1) for k, v in self.timings.items()}}
