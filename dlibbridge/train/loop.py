"""Fine-tuning dlib's face ResNet on one's own faces, and exporting the result back to dlib.

``finetune(config)`` (behind ``dlibbridge finetune``) runs the whole job in a RUN_DIR:

* **data** — a chip store (``data.pack``), a folder of aligned 150×150 chips (packed into
  ``RUN_DIR/data.store`` first) or raw photos (aligned through ``align`` first).  Identities are
  split into training and held-out validation identities (never the same person in both).
* **batches** — P identities × K images (``data.PKBatchSampler``), every rank's share of a batch
  again whole identities, so each share holds positive and negative pairs: dlib's trainer
  aborts on a batch without both; we check the data and settings up front and say what to
  change.  Each image's augmentation is seeded by (seed, epoch, batch, position), so the data a
  step sees does not depend on worker count, world size or on having been resumed.
* **model** — the base converted to the trainable (batch-norm) form.  ``--bn frozen`` (default)
  keeps batch-norm on its running statistics, so step 0 computes exactly the deployed model;
  ``--bn train`` first calibrates the statistics on training data (the deployed file lost them,
  dlib-format.md §6.7) and then trains them as dlib would.
* **forgetting guards** — ``--freeze-until LEVEL``, a learning-rate scale for the pretrained
  layers, and ``--distill W`` (W · mean ‖e − e₀‖² to the base model's embedding of the same
  augmented batch).
* **optimisation** — SGD (dlib's update rule: the same step as dlib's ``sgd`` at constant
  learning rate) or AdamW; linear warmup then cosine or step decay; no weight decay on biases and
  normalisation parameters; AMP (bf16/fp16) and channels_last on CUDA; DDP under ``torchrun``.
* **bookkeeping** — resolved ``config.json``; ``log.csv`` (per step) and ``val.csv`` (per
  validation) plus ``log.json``; ``curves.png``; an atomic ``checkpoint.pt`` every N steps from
  which ``--resume RUN_DIR`` continues with the same data order (bit-identical on CPU);
  ``best.pt`` by validation metric; early stopping.
* **outputs** — ``model.dat`` (deployed, for ``dlib.face_recognition_model_v1``),
  ``model_trainable.dat`` (dlib's bn_con ``net_type``), ``model.pt``, optionally ``model.onnx``;
  ``summary.json`` says which step was exported and how close dlib's descriptors of the written
  file are to the torch model's.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import Augment, Jitter, parse_degradations
from ..port.checkpoint import save_torch
from ..port.convert import dlib_check
from .._io import sha256_file
from ..assets import resolve_model
from .config import (BEST_FILE, CHECKPOINT_FILE, CONFIG_FILE, FREEZE_LEVELS, PAIR_LOSSES, RESUME_OVERRIDABLE,
                     FinetuneConfig, FinetuneError)
from .dist import Dist, init_distributed
from .losses import make_loss
from .rundir import write_logs, write_run_json
from .._io import write_torch

if TYPE_CHECKING:
    from ..data.store import ChipStore

__all__ = ["FinetuneConfig", "FinetuneError", "finetune", "load_resume_config", "load_base_model",
           "split_identities", "lr_factor", "FREEZE_LEVELS"]

# ------------------------------------------------------------------------------------------
# Model: base loading, freezing, parameter groups, export
# ------------------------------------------------------------------------------------------

def load_base_model(spec: str | None) -> nn.Module:
    """The base as a trainable (batch-norm form) ``FaceResNet``: a dlib .dat (deployed affine
    or trainable bn_con) or a torch checkpoint (``model.pt``).  None = dlib's own model."""
    from .. import assets
    from ..port.checkpoint import load_model
    path = assets.resolve_model(spec, "--base")
    if not path.is_file():
        raise FinetuneError(f"--base {path} does not exist")
    return load_model(path, trainable=True)


def check_data(data: str) -> None:
    """DATA must be a chip store or a folder: refused before anything is written."""
    src = Path(data)
    if not (src / "index.json").is_file() and not src.is_dir():
        raise FinetuneError(f"DATA {src} " + ("is a file, not a chip store or a folder" if src.exists()
                                                else "does not exist"))


def freeze_until(model: nn.Module, level: str) -> list[str]:
    """Freeze the stem and the levels from the input side up to and including ``level``
    (``none`` freezes nothing).  Returns the frozen module names.  Frozen parts also keep
    their batch-norm statistics (see :func:`set_train_mode`)."""
    if level == "none":
        return []
    order = ["stem"] + list(model.level_names)
    if level not in order:
        raise FinetuneError(f"--freeze-until {level}: this model has {', '.join(order)}")
    frozen = order[: order.index(level) + 1]
    for name in frozen:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, bn_trainable: bool, frozen: list[str]) -> None:
    """train() for dropout-free layers, but batch-norm stays on running statistics when its
    statistics are frozen (``--bn frozen``) or its module is frozen."""
    model.train()
    frozen_mods = {id(m) for name in frozen for m in getattr(model, name).modules()}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not bn_trainable or id(m) in frozen_mods):
            m.eval()


def param_groups(model: nn.Module, loss_fn: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Pretrained weights at lr·pretrained_lr_scale, new (head) weights at lr; weight decay
    only on conv/linear weights — which is where dlib's ``sgd`` effectively applies it to this
    network: con_ has bias_weight_decay_multiplier 0, and bn_ (multipliers 1, 0, 1, 1) takes the
    solver's fast path that uses the layer's weight_decay_multiplier 0 for gamma *and* beta.
    test_sgd_steps_match_dlib_dnn_trainer checks this against dlib's trainer."""
    groups = []
    for params, scale in ((list(model.parameters()), cfg.pretrained_lr_scale), (list(loss_fn.parameters()), 1.0)):
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": cfg.lr * scale, "base_lr": cfg.lr * scale, "weight_decay": wd})
    if not groups:
        raise FinetuneError("nothing to train: every parameter is frozen (--freeze-until too deep?)")
    return groups


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Multiplier of each group's base lr at optimiser step ``step`` (0-based)."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        every = cfg.step_every or max(1, total // 3)
        return cfg.step_gamma ** ((step - (warm or 0)) // every)
    span = max(1, total - (warm or 0))
    t = min(1.0, (step - (warm or 0)) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class TrainModule(nn.Module):
    """Network + loss (with its head, if any) as one module, so DDP synchronises the head's
    gradients too; returns (loss, embeddings)."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def forward(self, chips: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None):
        with torch.autocast(chips.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            emb = self.net(chips)
        emb = emb.float()
        return self.loss_fn(emb, labels), emb


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

def open_data(data: str, run_dir: Path, progress: bool) -> "ChipStore":
    """A ChipStore for DATA: a store as is; a folder of 150×150 chips packed into
    ``RUN_DIR/data.store`` (resumable); a folder of photos aligned into ``RUN_DIR/chips``
    first.  Returns the opened store."""
    from ..data import store as data_mod
    src = Path(data)
    if (src / "index.json").is_file():
        return data_mod.ChipStore(src)
    if not src.is_dir():
        raise FileNotFoundError(f"DATA {src} is neither a chip store nor a folder")
    store = run_dir / "data.store"
    if (store / "index.json").is_file():
        return data_mod.ChipStore(store)
    chips_dir = src if _looks_aligned(src) else _align_photos(src, run_dir / "chips", progress)
    return data_mod.pack(chips_dir, store, progress=progress)


def _looks_aligned(folder: Path, probe: int = 8) -> bool:
    """True when the first images below ``folder`` are 150×150 chips (an aligned folder)."""
    import cv2
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or name == "manifest.csv":
                continue
            img = cv2.imread(os.path.join(dirpath, name), cv2.IMREAD_UNCHANGED)
            if img is None:
                continue
            if img.shape[:2] != (150, 150):
                return False
            seen += 1
            if seen >= probe:
                return True
    if seen == 0:
        raise FinetuneError(f"no readable images under {folder}")
    return True


def _align_photos(src: Path, chips_dir: Path, progress: bool) -> Path:
    """Raw photos → aligned chips through the alignment pipeline (resumable itself)."""
    from ..data.align import align
    align(src, chips_dir, progress=progress)
    return chips_dir


@dataclass
class Split:
    """Training / held-out items of a store, and the training class index of each label."""
    train_rows: np.ndarray            # store rows usable for training
    val_rows: np.ndarray              # store rows of the held-out identities
    train_classes: dict[int, int]     # store label -> 0..C-1
    dropped_single: list[str]         # identities left out of training (one image)
    val_identities: list[str]


def split_identities(store, cfg: FinetuneConfig, world: int) -> Split:
    """Hold out whole identities for validation and check that what remains can form the
    batches asked for — on every rank.  Refuses (FinetuneError) with the numbers and what to
    change instead of letting a batch without positive or negative pairs reach the loss."""
    labels = np.asarray(store.labels)
    names = store.identities
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) == 0:
        raise FinetuneError("the data has no identities (expected DATA/<person>/<image> folders)")
    multi = ids[counts >= 2]
    single = ids[counts < 2]
    rng = np.random.default_rng([cfg.seed, 7919])
    v = cfg.val_identities
    n_val = int(round(v * len(multi))) if v < 1 else int(v)
    if v > 0 and n_val < 2 and len(multi) >= cfg.identities_per_batch + 2:
        n_val = 2                      # a verification pair set needs two people
    n_val = min(n_val, max(0, len(multi) - cfg.identities_per_batch))
    val_ids = np.sort(rng.permutation(multi)[:n_val]) if n_val >= 2 else np.array([], dtype=multi.dtype)
    train_ids = np.setdiff1d(multi, val_ids)
    p, k = cfg.identities_per_batch, cfg.images_per_identity
    pair_loss = cfg.loss in PAIR_LOSSES
    if len(train_ids) < p:
        raise FinetuneError(
            f"--identities-per-batch {p} but only {len(train_ids)} training identities have >= 2 images "
            f"({len(single)} identities with a single image cannot form positive pairs; "
            f"{len(val_ids)} held out for validation). Lower -P, add data, or use --val-identities 0.")
    shares = world * cfg.accumulate
    if p % shares:
        raise FinetuneError(
            f"--identities-per-batch {p} must split into whole identities over {world} process(es) x "
            f"{cfg.accumulate} accumulation step(s); use a multiple of {shares}")
    if pair_loss and p // shares < 2:
        raise FinetuneError(
            f"each share of a batch gets {p // shares} identity(ies) ({p} over {world} process(es) x "
            f"{cfg.accumulate} accumulation steps): --loss {cfg.loss} needs >= 2 per share for negative pairs; "
            f"use -P {2 * shares} or more")
    if pair_loss and k < 2:
        raise FinetuneError(f"--loss {cfg.loss} needs --images-per-identity >= 2 for positive pairs")
    train_rows = np.flatnonzero(np.isin(labels, train_ids))
    val_rows = np.flatnonzero(np.isin(labels, val_ids))
    return Split(train_rows, val_rows, {int(l): i for i, l in enumerate(train_ids)},
                 [names[i] for i in single], [names[i] for i in val_ids])


class BatchSource(torch.utils.data.Dataset):
    """Item j = this process's share of batch j of one epoch: (uint8 chips (B,150,150,3),
    int64 class labels).  The batch list comes from ``PKBatchSampler``; a sample's augmentation
    is seeded by (seed, epoch, batch, position in the *global* batch), so it is the same
    whatever the number of processes or workers, and after a resume."""

    def __init__(self, store_path: str, batches: list[list[int]], rows: np.ndarray, classes: np.ndarray,
                 share: slice, augment: Augment | None, seed: int, epoch: int):
        self.store_path = store_path
        self.batches, self.rows, self.classes = batches, rows, classes
        self.share, self.augment, self.seed, self.epoch = share, augment, seed, epoch
        self._store = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_store"] = None        # reopened (memory-mapped) in each worker, never pickled
        return d

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int):
        if self._store is None:
            from ..data.store import ChipStore
            self._store = ChipStore(self.store_path)
        items = np.asarray(self.batches[j], dtype=np.int64)
        positions = np.arange(len(items))[self.share]
        rows = self.rows[items[self.share]]
        order = np.argsort(rows, kind="stable")        # gather from the memory map in file order
        chips = np.empty((len(rows), 150, 150, 3), np.uint8)
        chips[order] = self._store.chips[rows[order]]
        if self.augment is not None:
            for i, pos in enumerate(positions):
                chips[i] = self.augment(chips[i], np.random.default_rng([self.seed, self.epoch, j, int(pos)]))
        labels = torch.from_numpy(self.classes[items[self.share]].astype(np.int64))
        return torch.from_numpy(chips), labels


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def embed_rows(model: nn.Module, store, rows: np.ndarray, device: torch.device, batch: int = 64,
               amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Descriptors of store rows with the model in eval mode (running statistics)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(rows), batch):
            chips = np.asarray(store.chips[np.asarray(rows[s:s + batch])])
            x = torch.from_numpy(chips).to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


def verification_summary(emb: np.ndarray, labels: np.ndarray, far: float) -> dict:
    """All-pairs verification metrics (evaluation module) on held-out identities."""
    from ..eval.metrics import DLIB_THRESHOLD, far_key, pair_distances, verification_metrics
    iu, ju = np.triu_indices(len(emb), k=1)
    dist = pair_distances(emb[iu], emb[ju])
    same = labels[iu] == labels[ju]
    m = verification_metrics(dist, same, far_targets=(far,))
    return {"accuracy": m["accuracy_at_best_threshold"], "best_threshold": m["best_threshold"],
            "accuracy_at_0.6": m[f"accuracy_at_{DLIB_THRESHOLD}"], "auc": m["auc"], "eer": m["eer"],
            "tar@far": m["tar_at_far"][far_key(far)], "far": far,
            "pairs_same": m["n_same"], "pairs_different": m["n_different"]}


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------

def _pick_device(spec: str, dist: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FinetuneError("--device cuda, but torch sees no CUDA device")
        if dist.world > 1:
            torch.cuda.set_device(dist.local_rank)
            return torch.device("cuda", dist.local_rank)
        return torch.device(spec)
    if spec != "cpu":
        raise FinetuneError(f"--device {spec!r}: choose cpu, cuda or auto")
    return torch.device("cpu")


def _amp_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _prepare_run_dir(cfg: FinetuneConfig, resume: bool, dist: Dist) -> Path:
    run_dir = Path(cfg.out)
    if dist.main:
        if not resume and run_dir.exists() and any(run_dir.iterdir()) and not _never_trained(run_dir):
            if (run_dir / CONFIG_FILE).exists():
                raise FinetuneError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                    "or choose another --out")
            raise FinetuneError(f"--out {run_dir} exists and is not empty")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            # Written before data preparation so that a run killed while packing can be resumed;
            # replaced by the fully resolved config once the data and model are known.
            write_run_json(run_dir / CONFIG_FILE, {"config": cfg.to_json()})
    dist.barrier()
    return run_dir


def _never_trained(run_dir: Path) -> bool:
    """A run folder killed or failed before its first checkpoint: a readable dlibbridge
    config.json and nothing but what is written before step 0 (config, the packed or aligned
    data).  Starting it afresh loses no training."""
    if not set(p.name for p in run_dir.iterdir()) <= {CONFIG_FILE, "data.store", "chips"}:
        return False
    try:
        FinetuneConfig.from_json(json.loads((run_dir / CONFIG_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def load_resume_config(run_dir: str | os.PathLike, overrides: dict | None = None) -> FinetuneConfig:
    """The config of an existing run, with only :data:`RESUME_OVERRIDABLE` fields changed."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FinetuneError(f"{run_dir} is not a fine-tuning run (no {CONFIG_FILE})")
    try:
        saved = json.loads(path.read_text())
        cfg = FinetuneConfig.from_json(saved["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"{path} is damaged or not a dlibbridge run config ({type(e).__name__}: {e})") from None
    cfg.out = str(run_dir)
    for k, v in (overrides or {}).items():
        if k not in RESUME_OVERRIDABLE:
            raise FinetuneError(f"--{k.replace('_', '-')} cannot change on --resume (the run's config fixes it)")
        setattr(cfg, k, v)
    return cfg


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Run (or continue) a fine-tuning job; returns the summary written to summary.json."""
    if cfg.camera:
        from .camera_finetune import camera_finetune
        return camera_finetune(cfg, resume)
    cfg.validate()
    if not resume:
        check_data(cfg.data)
    if cfg.onnx:
        from ..port.export import check_onnx_installed
        check_onnx_installed()
    base = load_base_model(cfg.base)       # a bad --base fails before the run folder exists
    device_kind = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    dist = init_distributed(device_kind)
    try:
        return _Job(cfg, resume, dist, base).run()
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _Job:
    def __init__(self, cfg: FinetuneConfig, resume: bool, dist: Dist, base: nn.Module):
        self.dist = dist
        self.device = _pick_device(cfg.device, dist)
        self.resume = resume
        self.run_dir = _prepare_run_dir(cfg, resume, dist)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        # Data (rank 0 packs/aligns; the others wait and open the result).
        if dist.main:
            self.store = open_data(cfg.data, self.run_dir, cfg.progress)
        dist.barrier()
        if not dist.main:
            self.store = open_data(cfg.data, self.run_dir, False)
        self.split = split_identities(self.store, cfg, dist.world)
        n_classes = len(self.split.train_classes)

        self.loss_fn = make_loss(cfg.loss, n_classes, margin=cfg.margin, scale=cfg.scale)
        has_head = any(True for _ in self.loss_fn.parameters())
        self.cfg = cfg.resolved(has_head, self.device.type == "cuda")
        c = self.cfg
        self.amp_dtype = _amp_dtype(c.amp)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True     # fixed 150x150 input: pick the fastest kernels
        if self.amp_dtype is not None and self.device.type != "cuda":
            raise FinetuneError(f"--amp {c.amp} is for CUDA; use --amp off on {self.device}")

        self.model = base
        self.base_sha = sha256_file(resolve_model(c.base))
        self.teacher = None
        if c.distill > 0:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False).to(self.device)
        self.frozen = freeze_until(self.model, c.freeze_until)

        # Batches
        from ..data.store import PKBatchSampler
        rows = self.split.train_rows
        store_labels = np.asarray(self.store.labels)
        self.classes = np.array([self.split.train_classes[int(l)] for l in store_labels[rows]], np.int64)
        self.sampler = PKBatchSampler(store_labels[rows], c.identities_per_batch, c.images_per_identity,
                                      batches=c.batches_per_epoch, seed=c.seed)
        self.steps_per_epoch = len(self.sampler)
        total = c.epochs * self.steps_per_epoch
        self.total_steps = min(total, c.max_steps) if c.max_steps else total
        if c.warmup_steps is None:
            c.warmup_steps = min(500, int(0.05 * self.total_steps))
        share_ids = c.identities_per_batch // dist.world
        k = c.images_per_identity
        self.share = slice(dist.rank * share_ids * k, (dist.rank + 1) * share_ids * k)
        self.micro = share_ids // c.accumulate * k
        self.augment = (Augment(Jitter() if c.augment else None, parse_degradations(c.degrade))
                        if (c.augment or c.degrade) else None)

        # Model to device, optimiser
        self.model.to(self.device)
        self.loss_fn.to(self.device)
        if c.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(param_groups(self.model, self.loss_fn, c), c)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        self.module = TrainModule(self.model, self.loss_fn)
        if dist.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        # State
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict | None = None
        self.stale_validations = 0
        self.step_log: list[dict] = []
        self.val_log: list[dict] = []
        self.elapsed = 0.0
        self.initialised = False        # baseline validation (and BN calibration) done
        self.calibration: dict | None = None

    # -- state ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "model": self.model.state_dict(), "loss_fn": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "best": self.best, "stale_validations": self.stale_validations,
                "step_log": self.step_log, "val_log": self.val_log, "elapsed": self.elapsed,
                "initialised": self.initialised, "calibration": self.calibration, "config": self.cfg.to_json()}

    def load_state(self, st: dict) -> None:
        if st["config"] != self.cfg.to_json() and not self._only_overridable_differ(st["config"]):
            raise FinetuneError("checkpoint.pt was written with a different config than config.json")
        self.model.load_state_dict(st["model"])
        self.loss_fn.load_state_dict(st["loss_fn"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        for k in ("step", "epoch", "batch_in_epoch", "best", "stale_validations", "step_log",
                  "val_log", "elapsed", "initialised", "calibration"):
            setattr(self, k, st[k])

    def _only_overridable_differ(self, saved: dict) -> bool:
        now = self.cfg.to_json()
        return all(saved.get(k) == v for k, v in now.items() if k not in RESUME_OVERRIDABLE)

    def checkpoint(self) -> None:
        if self.dist.main:
            write_torch(self.run_dir / CHECKPOINT_FILE, self.state())
            write_logs(self.run_dir, self.step_log, self.val_log)
        self.dist.barrier()

    # -- pieces --------------------------------------------------------------------------

    def write_config(self) -> None:
        if not self.dist.main:
            return
        c = self.cfg
        labels = np.asarray(self.store.labels)
        write_run_json(self.run_dir / CONFIG_FILE, {
            "config": c.to_json(),
            "data": {"store": str(self.store.path), "images": int(len(labels)),
                     "identities": len(self.store.identities),
                     "train_identities": len(self.split.train_classes),
                     "train_images": int(len(self.split.train_rows)),
                     "val_identities": self.split.val_identities,
                     "val_images": int(len(self.split.val_rows)),
                     "dropped_single_image_identities": self.split.dropped_single},
            "derived": {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                        "warmup_steps": c.warmup_steps, "world_size": self.dist.world,
                        "images_per_step": c.identities_per_batch * c.images_per_identity,
                        "frozen": self.frozen, "base_sha256": self.base_sha,
                        "augment": None if self.augment is None else self.augment.describe()},
            "environment": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                            "device": str(self.device), "threads": torch.get_num_threads()},
        })

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        return list(iter(self.sampler))

    def loader(self, epoch: int, start: int):
        src = BatchSource(str(self.store.path), self.epoch_batches(epoch), self.split.train_rows, self.classes,
                          self.share, self.augment, self.cfg.seed, epoch)
        idx = list(range(start, len(src)))
        workers = self.cfg.workers if len(idx) > 1 else 0
        return torch.utils.data.DataLoader(
            src, batch_size=None, sampler=idx, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers else None)

    def calibrate_bn(self) -> None:
        """--bn train starts from statistics measured on training data (un-augmented)."""
        from ..port.calibrate import calibrate
        rows = self.split.train_rows
        rng = np.random.default_rng([self.cfg.seed, 104729])
        batch = self.cfg.identities_per_batch * self.cfg.images_per_identity
        n = min(len(rows), self.cfg.calibration_batches * batch)
        pick = np.sort(rng.choice(rows, size=n, replace=False))
        # The report (training- vs inference-mode descriptors) is measured on one batch of the
        # run's size: the deviation a training step will actually see, at bounded cost.
        report = calibrate(self.model, np.asarray(self.store.chips[pick]), batch_size=min(batch, n),
                           report_max=batch, seed=self.cfg.seed, device=self.device)
        self.calibration = dataclasses.asdict(report)
        if self.dist.main and self.cfg.progress:
            print("dlibbridge finetune: " + "; ".join(report.lines()), file=sys.stderr)

    def init_head(self, per_class: int = 4) -> None:
        """Classifier heads (arcface/cosface) start at each training identity's mean base
        embedding over up to ``per_class`` un-augmented images (see
        ``NormalizedClassifier.init_from_centres``).  Every rank computes the same centres."""
        head = getattr(self.loss_fn, "head", None)
        if head is None:
            return
        rows = self.split.train_rows
        rng = np.random.default_rng([self.cfg.seed, 1299709])
        pick, owner = [], []
        for cls in range(len(self.split.train_classes)):
            mine = rows[self.classes == cls]
            chosen = np.sort(rng.choice(mine, size=min(per_class, len(mine)), replace=False))
            pick.extend(chosen.tolist())
            owner.extend([cls] * len(chosen))
        emb = embed_rows(self.model, self.store, np.asarray(pick), self.device, amp_dtype=self.amp_dtype)
        emb = F.normalize(torch.from_numpy(emb), dim=1)
        centres = torch.zeros(head.weight.shape).index_add_(0, torch.tensor(owner), emb)
        head.init_from_centres(centres.to(head.weight.device))

    def validate(self) -> dict | None:
        if len(self.split.val_rows) == 0:
            return None
        rec = None
        if self.dist.main:
            rows = self.split.val_rows
            if len(rows) > self.cfg.val_max_images:
                rng = np.random.default_rng([self.cfg.seed, 15485863])
                rows = np.sort(rng.choice(rows, self.cfg.val_max_images, replace=False))
            emb = embed_rows(self.model, self.store, rows, self.device, amp_dtype=self.amp_dtype)
            rec = {"step": self.step, "epoch": self.epoch,
                   **verification_summary(emb, np.asarray(self.store.labels)[rows], self.cfg.select_far)}
        return self.dist.broadcast_obj(rec)

    def after_validation(self, rec: dict) -> bool:
        """Record, keep the best, and say whether to stop early."""
        self.val_log.append(rec)
        score = rec[self.cfg.select_metric]
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, "step": self.step, "metric": self.cfg.select_metric, "validation": rec}
            self.stale_validations = 0
            if self.dist.main:
                save_torch(self.model, self.run_dir / BEST_FILE)
        else:
            self.stale_validations += 1
        return self.cfg.patience is not None and self.stale_validations >= self.cfg.patience

    def train_step(self, chips: torch.Tensor, labels: torch.Tensor, lr_mult: float) -> dict:
        c = self.cfg
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        chips = chips.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        task_total, distill_total = 0.0, 0.0
        n_micro = c.accumulate
        for m in range(n_micro):
            x = chips[m * self.micro:(m + 1) * self.micro]
            y = labels[m * self.micro:(m + 1) * self.micro]
            last = m == n_micro - 1
            sync = self.module.no_sync() if (self.dist.world > 1 and not last) else contextlib.nullcontext()
            with sync:
                task, emb = self.module(x, y, self.amp_dtype)
                loss = task
                if self.teacher is not None:
                    with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                         enabled=self.amp_dtype is not None):
                        target = self.teacher(x).float()
                    dl = ((emb - target) ** 2).sum(1).mean()
                    loss = loss + c.distill * dl
                    distill_total += float(dl.detach())
                self.scaler.scale(loss / n_micro).backward()
            task_total += float(task.detach())
        if not math.isfinite(task_total):
            raise FinetuneError(f"loss became {task_total} at step {self.step}; lower --lr "
                                "(the last checkpoint is intact, fix the config and start a new run)")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        task_mean = self.dist.mean(task_total / n_micro)
        distill_mean = self.dist.mean(distill_total / n_micro) if self.teacher is not None else None
        return {"task_loss": task_mean, "distill_loss": distill_mean,
                "loss": task_mean + (c.distill * distill_mean if distill_mean is not None else 0.0)}

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> dict:
        c, dist = self.cfg, self.dist
        ckpt_path = self.run_dir / CHECKPOINT_FILE
        if self.resume and ckpt_path.is_file():
            self.load_state(torch.load(ckpt_path, map_location=self.device, weights_only=True))
        elif self.resume and dist.main:
            print(f"dlibbridge finetune: {self.run_dir} has no checkpoint yet; starting it from step 0",
                  file=sys.stderr)
        if not self.initialised:
            self.write_config()
            if c.bn == "train":
                self.calibrate_bn()
            self.init_head()
            rec = self.validate()          # the base model's numbers, for comparison
            if rec is not None:
                self.after_validation(rec)
            self.initialised = True
            self.checkpoint()

        with _GracefulStop() as stop_request:
            self.train_loop(stop_request)
        # Final validation (unless the last step closed an epoch that was just validated).
        if not self.val_log or self.val_log[-1]["step"] != self.step:
            rec = self.validate()
            if rec is not None:
                self.after_validation(rec)
        self.checkpoint()
        summary = self.export() if dist.main else {}
        dist.barrier()
        return summary

    def train_loop(self, stop_request: "_GracefulStop") -> None:
        c, dist = self.cfg, self.dist
        bar = None
        if dist.main and c.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, desc="finetune")
        images_per_step = c.identities_per_batch * c.images_per_identity
        stop = self.step >= self.total_steps
        try:
            while not stop:
                set_train_mode(self.model, c.bn == "train", self.frozen)
                t_last = time.perf_counter()
                for chips, labels in self.loader(self.epoch, self.batch_in_epoch):
                    rec = self.train_step(chips, labels, lr_factor(self.step, self.total_steps, c))
                    now = time.perf_counter()
                    dt, t_last = now - t_last, now
                    self.elapsed += dt
                    self.step += 1
                    self.batch_in_epoch += 1
                    rec.update(step=self.step, epoch=self.epoch,
                               lr=c.lr * lr_factor(self.step - 1, self.total_steps, c),
                               images_per_s=images_per_step / dt if dt > 0 else None,
                               elapsed_s=round(self.elapsed, 3))
                    self.step_log.append(rec)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}",
                                        epoch=self.epoch)
                    if self.step >= self.total_steps:
                        stop = True
                        break
                    if dist.any(stop_request.requested):
                        self.checkpoint()
                        raise KeyboardInterrupt
                    if self.step % c.checkpoint_every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                        self.checkpoint()
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if self.epoch % c.val_every == 0 and not stop:
                        rec = self.validate()
                        if rec is not None and self.after_validation(rec):
                            if dist.main:
                                print(f"dlibbridge finetune: early stop: {c.patience} validation(s) "
                                      f"without improvement of {c.select_metric}", file=sys.stderr)
                            stop = True
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()

    # -- outputs -------------------------------------------------------------------------

    def export(self) -> dict:
        from ..port.export import export_onnx
        from ..port.checkpoint import load_torch
        from ..port.convert import to_dlib
        c = self.cfg
        model = self.model
        exported_step = self.step
        if c.export == "best" and self.best is not None and self.best["step"] != self.step:
            model = load_torch(self.run_dir / BEST_FILE)
            exported_step = self.best["step"]
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        out = self.run_dir
        to_dlib(model, out / "model.dat", trainable=False)
        to_dlib(model, out / "model_trainable.dat", trainable=True)
        save_torch(model, out / "model.pt")
        files = ["model.dat", "model_trainable.dat", "model.pt"]
        onnx_diff = None
        if c.onnx:
            # export_onnx writes the deployed form (batch-norm folded exactly as model.dat holds it).
            onnx_diff = export_onnx(model, out / "model.onnx")
            files.append("model.onnx")
        check = dlib_export_check(model, out / "model.dat", self.store,
                                  self.split.val_rows if len(self.split.val_rows) else self.split.train_rows)
        images = self.step * c.identities_per_batch * c.images_per_identity
        summary = {"exported_step": exported_step, "final_step": self.step, "total_steps": self.total_steps,
                   "epochs_completed": self.epoch, "best": self.best, "files": files,
                   "export_check": check, "onnx_max_abs_diff": onnx_diff, "bn_calibration": self.calibration,
                   "train_elapsed_s": round(self.elapsed, 3),
                   "train_images_per_s": images / self.elapsed if self.elapsed > 0 else None,
                   "baseline": self.val_log[0] if self.val_log and self.val_log[0]["step"] == 0 else None}
        write_run_json(out / "summary.json", summary)
        return summary


def dlib_export_check(model: nn.Module, dat_path: Path, store, rows: np.ndarray, n: int = 3) -> dict:
    """Load the written model.dat in dlib itself and compare its descriptors with the torch
    model's on a few chips: proof the exported file is the trained network."""
    import dlib
    rows = np.asarray(rows)[:n]
    diff = dlib_check(dat_path, model, chips=np.asarray(store.chips[np.sort(rows)]))
    return {"images": int(len(rows)), "max_abs_diff": diff,
            "loaded_by": f"dlib {dlib.__version__} face_recognition_model_v1"}


class _GracefulStop:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop at the next step boundary
    (a consistent state); a second one interrupts immediately.  Only in the main thread."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ndlibbridge finetune: stopping after this step (checkpointing); press again to abort",
              file=sys.stderr)

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
