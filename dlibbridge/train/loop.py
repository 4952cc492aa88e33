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
from ..port.infer import embed_chips
from .._io import sha256_file
from .._load import read_torch
from .._lock import LOCK_NAME, folder_lock
from ..assets import resolve_model
from .config import (BEST_FILE, CHECKPOINT_FILE, CONFIG_FILE, FREEZE_LEVELS, PAIR_LOSSES, RESUME_ADVICE, RESUME_OVERRIDABLE,
                     FinetuneConfig, FinetuneError)
from .dist import Dist, init_distributed
from .losses import make_loss
from .rundir import write_logs, write_run_json
from .._io import write_torch

if TYPE_CHECKING:
    from ..data.store import ChipDataset, ChipStore, PKBatchSampler

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
                groups.append({"params": ps, "lr": cfg.lr * scale, "weight_decay": wd})
    if not groups:
        raise FinetuneError("nothing to train: every parameter is frozen (--freeze-until too deep?)")
    return groups


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Multiplier of each group's base lr at optimiser step ``step`` (0-based): the
    ``LambdaLR`` schedule of a run, whose state goes into the checkpoint."""
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
    from ..data.images import CHIP_SIZE, walk_files
    seen = 0
    for rel in walk_files(folder):
        if rel.rsplit("/", 1)[-1] == "manifest.csv":
            continue
        img = cv2.imread(str(folder / rel), cv2.IMREAD_UNCHANGED)
        if img is None:
            continue
        if img.shape[:2] != (CHIP_SIZE, CHIP_SIZE):
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
    if cfg.camera:
        # A camera run learns from one-photo people too: the photo's camera draws are its positives.
        train_ids, single = np.union1d(train_ids, single), single[:0]
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


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

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
        if not resume and _contents(run_dir) and not _never_trained(run_dir):
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


def _contents(run_dir: Path) -> set[str]:
    """The names in a run folder, but for the lock this process holds on it."""
    return {p.name for p in run_dir.iterdir() if p.name != LOCK_NAME} if run_dir.is_dir() else set()


def _never_trained(run_dir: Path) -> bool:
    """A run folder killed or failed before its first checkpoint: a readable dlibbridge
    config.json and nothing but what is written before step 0 (config, the packed or aligned
    data).  Starting it afresh loses no training."""
    if not _contents(run_dir) <= {CONFIG_FILE, "data.store", "chips"}:
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
    """Run (or continue) a fine-tuning job; returns the summary written to summary.json.  The
    run folder is locked for the whole job (by the main process of a torchrun job): a second
    run or a ``--resume`` of a run still training is refused in one line."""
    main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(cfg.out, "dlibbridge finetune") if main else contextlib.nullcontext():
        return _finetune(cfg, resume)


def _finetune(cfg: FinetuneConfig, resume: bool) -> dict:
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
        return _run(setup(cfg, resume, dist, base))
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------
# The job: setup -> fit -> validate -> export, over a plain state dict
# ------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What a run is made of, fixed once :func:`setup` has built it.  Everything that changes
    while training (step counters, logs, best score) is the plain dict of :func:`new_state`;
    a checkpoint is that dict plus the model, loss, optimiser, scheduler and scaler states."""
    cfg: FinetuneConfig               # resolved: what config.json records
    dist: Dist
    device: torch.device
    run_dir: Path
    resume: bool
    store: "ChipStore"
    split: Split
    model: nn.Module
    loss_fn: nn.Module
    module: nn.Module                 # TrainModule, DDP-wrapped under torchrun
    teacher: nn.Module | None         # the frozen base, for --distill
    frozen: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: "PKBatchSampler"
    dataset: "ChipDataset"            # the training rows, augmented, labelled by training class
    steps_per_epoch: int
    total_steps: int
    share: slice                      # this rank's part of each global batch
    micro: int                        # images per accumulation micro-batch
    amp_dtype: torch.dtype | None
    base_sha: str


def setup(cfg: FinetuneConfig, resume: bool, dist: Dist, base: nn.Module) -> Job:
    """Open the data, split it, resolve the config and build model, loss, optimiser and
    schedule (rank 0 packs or aligns the data; the others wait and open the result)."""
    from ..data.store import ChipDataset, PKBatchSampler
    device = _pick_device(cfg.device, dist)
    run_dir = _prepare_run_dir(cfg, resume, dist)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if dist.main:
        store = open_data(cfg.data, run_dir, cfg.progress)
    dist.barrier()
    if not dist.main:
        store = open_data(cfg.data, run_dir, False)
    split = split_identities(store, cfg, dist.world)
    loss_fn = make_loss(cfg.loss, len(split.train_classes), margin=cfg.margin, scale=cfg.scale)

    rows = split.train_rows
    store_labels = np.asarray(store.labels)
    classes = np.array([split.train_classes[int(l)] for l in store_labels[rows]], np.int64)
    sampler = PKBatchSampler(store_labels[rows], cfg.identities_per_batch, cfg.images_per_identity,
                             batches=cfg.batches_per_epoch, seed=cfg.seed)
    steps_per_epoch = len(sampler)
    total = cfg.epochs * steps_per_epoch
    total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
    c = cfg.resolved(has_head=any(True for _ in loss_fn.parameters()), cuda=device.type == "cuda",
                     total_steps=total_steps)

    amp_dtype = _amp_dtype(c.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed 150x150 input: pick the fastest kernels
    if amp_dtype is not None and device.type != "cuda":
        raise FinetuneError(f"--amp {c.amp} is for CUDA; use --amp off on {device}")
    teacher = copy.deepcopy(base).eval().requires_grad_(False).to(device) if c.distill > 0 else None
    frozen = freeze_until(base, c.freeze_until)
    share_ids = c.identities_per_batch // dist.world
    k = c.images_per_identity
    augment = (Augment(Jitter() if c.augment else None, parse_degradations(c.degrade))
               if (c.augment or c.degrade) else None)

    base.to(device)
    loss_fn.to(device)
    if c.channels_last:
        base.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(param_groups(base, loss_fn, c), c)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, c))
    module = TrainModule(base, loss_fn)
    if dist.world > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    return Job(cfg=c, dist=dist, device=device, run_dir=run_dir, resume=resume, store=store, split=split,
               model=base, loss_fn=loss_fn, module=module, teacher=teacher, frozen=frozen, optimizer=optimizer,
               scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=c.amp == "fp16"),
               sampler=sampler, dataset=ChipDataset(store, rows, augment, seed=c.seed, targets=classes),
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               share=slice(dist.rank * share_ids * k, (dist.rank + 1) * share_ids * k),
               micro=share_ids // c.accumulate * k, amp_dtype=amp_dtype,
               base_sha=sha256_file(resolve_model(c.base)))


def new_state() -> dict:
    """The changing part of a run at step 0."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "stale_validations": 0,
            "step_log": [], "val_log": [], "elapsed": 0.0,
            "initialised": False,        # baseline validation (and BN calibration) done
            "calibration": None}


_MODULE_STATES = ("model", "loss_fn", "optimizer", "scheduler", "scaler")


def checkpoint(job: Job, state: dict) -> None:
    if job.dist.main:
        write_torch(job.run_dir / CHECKPOINT_FILE,
                    {**state, **{k: getattr(job, k).state_dict() for k in _MODULE_STATES},
                     "config": job.cfg.to_json()})
        write_logs(job.run_dir, state["step_log"], state["val_log"])
    job.dist.barrier()


def load_checkpoint(job: Job, saved: dict) -> dict:
    """Restore the module states into ``job``; returns the state dict."""
    now = job.cfg.to_json()
    if any(saved["config"].get(k) != v for k, v in now.items() if k not in RESUME_OVERRIDABLE):
        raise FinetuneError("checkpoint.pt was written with a different config than config.json")
    for k in _MODULE_STATES:
        if k in saved:
            getattr(job, k).load_state_dict(saved[k])
    if "scheduler" not in saved:
        # Written before the schedule was a LambdaLR (it saved the optimiser's lr only): the
        # schedule is a function of the step, so put it at the saved one.
        job.scheduler.last_epoch = saved["step"]
        for g, base in zip(job.optimizer.param_groups, job.scheduler.base_lrs):
            g["lr"] = base * lr_factor(saved["step"], job.total_steps, job.cfg)
    return {k: saved[k] for k in new_state()}


def write_config(job: Job) -> None:
    if not job.dist.main:
        return
    c, split = job.cfg, job.split
    write_run_json(job.run_dir / CONFIG_FILE, {
        "config": c.to_json(),
        "data": {"store": str(job.store.path), "images": int(len(job.store.labels)),
                 "identities": len(job.store.identities),
                 "train_identities": len(split.train_classes),
                 "train_images": int(len(split.train_rows)),
                 "val_identities": split.val_identities,
                 "val_images": int(len(split.val_rows)),
                 "dropped_single_image_identities": split.dropped_single},
        "derived": {"steps_per_epoch": job.steps_per_epoch, "total_steps": job.total_steps,
                    "warmup_steps": c.warmup_steps, "world_size": job.dist.world,
                    "images_per_step": c.identities_per_batch * c.images_per_identity,
                    "frozen": job.frozen, "base_sha256": job.base_sha,
                    "augment": None if job.dataset.transform is None else job.dataset.transform.describe()},
        "environment": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                        "device": str(job.device), "threads": torch.get_num_threads()},
    })


def loader(job: Job, epoch: int, start: int):
    """Batches ``start``.. of ``epoch``: this rank's share of each global batch, every image
    keyed by (epoch, batch, position in the global batch) for its augmentation."""
    from ..data.store import ChipDataset
    job.sampler.set_epoch(epoch)
    batches = [[(item, (epoch, j, pos)) for pos, item in enumerate(batch)][job.share]
               for j, batch in enumerate(job.sampler)][start:]
    workers = job.cfg.workers if len(batches) > 1 else 0
    return torch.utils.data.DataLoader(
        job.dataset, batch_sampler=batches, collate_fn=ChipDataset.collate, num_workers=workers,
        pin_memory=job.device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None)


def calibrate_bn(job: Job, state: dict) -> None:
    """--bn train starts from statistics measured on training data (un-augmented)."""
    from ..port.calibrate import calibrate
    c, rows = job.cfg, job.split.train_rows
    rng = np.random.default_rng([c.seed, 104729])
    batch = c.identities_per_batch * c.images_per_identity
    n = min(len(rows), c.calibration_batches * batch)
    pick = np.sort(rng.choice(rows, size=n, replace=False))
    # The report (training- vs inference-mode descriptors) is measured on one batch of the
    # run's size: the deviation a training step will actually see, at bounded cost.
    report = calibrate(job.model, np.asarray(job.store.chips[pick]), batch_size=min(batch, n),
                       report_max=batch, seed=c.seed, device=job.device)
    state["calibration"] = dataclasses.asdict(report)
    if job.dist.main and c.progress:
        print("dlibbridge finetune: " + "; ".join(report.lines()), file=sys.stderr)


def init_head(job: Job, per_class: int = 4) -> None:
    """Classifier heads (arcface/cosface) start at each training identity's mean base
    embedding over up to ``per_class`` un-augmented images (see
    ``NormalizedClassifier.init_from_centres``).  Every rank computes the same centres."""
    head = getattr(job.loss_fn, "head", None)
    if head is None:
        return
    rows = job.split.train_rows
    rng = np.random.default_rng([job.cfg.seed, 1299709])
    pick, owner = [], []
    for cls in range(len(job.split.train_classes)):
        mine = rows[job.dataset.targets == cls]
        chosen = np.sort(rng.choice(mine, size=min(per_class, len(mine)), replace=False))
        pick.extend(chosen.tolist())
        owner.extend([cls] * len(chosen))
    emb = embed_chips(job.model, job.store.chips, job.device, rows=np.asarray(pick), amp_dtype=job.amp_dtype)
    emb = F.normalize(torch.from_numpy(emb), dim=1)
    centres = torch.zeros(head.weight.shape).index_add_(0, torch.tensor(owner), emb)
    head.init_from_centres(centres.to(head.weight.device))


def validate(job: Job, state: dict) -> dict | None:
    """Verification metrics on the held-out identities (rank 0 measures, every rank gets them)."""
    if len(job.split.val_rows) == 0:
        return None
    rec = None
    if job.dist.main:
        c, rows = job.cfg, job.split.val_rows
        if len(rows) > c.val_max_images:
            rng = np.random.default_rng([c.seed, 15485863])
            rows = np.sort(rng.choice(rows, c.val_max_images, replace=False))
        emb = embed_chips(job.model, job.store.chips, job.device, rows=rows, amp_dtype=job.amp_dtype)
        rec = {"step": state["step"], "epoch": state["epoch"],
               **verification_summary(emb, np.asarray(job.store.labels)[rows], c.select_far)}
    return job.dist.broadcast_obj(rec)


def record_validation(job: Job, state: dict, rec: dict) -> bool:
    """Record, keep the best, and say whether to stop early."""
    c = job.cfg
    state["val_log"].append(rec)
    score = rec[c.select_metric]
    if state["best"] is None or score > state["best"]["score"]:
        state["best"] = {"score": score, "step": state["step"], "metric": c.select_metric, "validation": rec}
        state["stale_validations"] = 0
        if job.dist.main:
            save_torch(job.model, job.run_dir / BEST_FILE)
    else:
        state["stale_validations"] += 1
    return c.patience is not None and state["stale_validations"] >= c.patience


def train_step(job: Job, state: dict, chips: torch.Tensor, labels: torch.Tensor) -> dict:
    """One optimiser step over a global batch (this rank's share, in ``accumulate`` micro-batches)."""
    c = job.cfg
    chips = chips.to(job.device, non_blocking=True)
    labels = labels.to(job.device, non_blocking=True)
    task_total, distill_total = 0.0, 0.0
    n_micro = c.accumulate
    for m in range(n_micro):
        x = chips[m * job.micro:(m + 1) * job.micro]
        y = labels[m * job.micro:(m + 1) * job.micro]
        last = m == n_micro - 1
        sync = job.module.no_sync() if (job.dist.world > 1 and not last) else contextlib.nullcontext()
        with sync:
            task, emb = job.module(x, y, job.amp_dtype)
            loss = task
            if job.teacher is not None:
                with torch.no_grad(), torch.autocast(job.device.type, dtype=job.amp_dtype or torch.float32,
                                                     enabled=job.amp_dtype is not None):
                    target = job.teacher(x).float()
                dl = ((emb - target) ** 2).sum(1).mean()
                loss = loss + c.distill * dl
                distill_total += float(dl.detach())
            job.scaler.scale(loss / n_micro).backward()
        task_total += float(task.detach())
    if not math.isfinite(task_total):
        raise FinetuneError(f"loss became {task_total} at step {state['step']}; lower --lr "
                            "(the last checkpoint is intact, fix the config and start a new run)")
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    job.scheduler.step()
    task_mean = job.dist.mean(task_total / n_micro)
    distill_mean = job.dist.mean(distill_total / n_micro) if job.teacher is not None else None
    return {"task_loss": task_mean, "distill_loss": distill_mean,
            "loss": task_mean + (c.distill * distill_mean if distill_mean is not None else 0.0)}


def _run(job: Job) -> dict:
    """The whole job: resume or start (baseline validation), fit, final validation, export."""
    ckpt_path = job.run_dir / CHECKPOINT_FILE
    state = new_state()
    if job.resume and ckpt_path.is_file():
        state = load_checkpoint(job, read_torch(ckpt_path, what="checkpoint", map_location=job.device, advice=RESUME_ADVICE))
    elif job.resume and job.dist.main:
        print(f"dlibbridge finetune: {job.run_dir} has no checkpoint yet; starting it from step 0", file=sys.stderr)
    if not state["initialised"]:
        write_config(job)
        if job.cfg.bn == "train":
            calibrate_bn(job, state)
        init_head(job)
        rec = validate(job, state)          # the base model's numbers, for comparison
        if rec is not None:
            record_validation(job, state, rec)
        state["initialised"] = True
        checkpoint(job, state)

    with _GracefulStop() as stop_request:
        fit(job, state, stop_request)
    # Final validation (unless the last step closed an epoch that was just validated).
    if not state["val_log"] or state["val_log"][-1]["step"] != state["step"]:
        rec = validate(job, state)
        if rec is not None:
            record_validation(job, state, rec)
    checkpoint(job, state)
    summary = export(job, state) if job.dist.main else {}
    job.dist.barrier()
    return summary


def fit(job: Job, state: dict, stop_request: "_GracefulStop") -> None:
    """Train from ``state`` to the last step: checkpoints every N steps and at epoch ends,
    validation every E epochs, early stopping; a stop request checkpoints and interrupts."""
    c, dist = job.cfg, job.dist
    bar = None
    if dist.main and c.progress:
        from tqdm import tqdm
        bar = tqdm(total=job.total_steps, initial=state["step"], unit="step", dynamic_ncols=True,
                   file=sys.stderr, desc="finetune")
    images_per_step = c.identities_per_batch * c.images_per_identity
    stop = state["step"] >= job.total_steps
    try:
        while not stop:
            set_train_mode(job.model, c.bn == "train", job.frozen)
            t_last = time.perf_counter()
            for chips, labels in loader(job, state["epoch"], state["batch_in_epoch"]):
                lr = c.lr * lr_factor(state["step"], job.total_steps, c)
                rec = train_step(job, state, chips, labels)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                state["elapsed"] += dt
                state["step"] += 1
                state["batch_in_epoch"] += 1
                rec.update(step=state["step"], epoch=state["epoch"], lr=lr,
                           images_per_s=images_per_step / dt if dt > 0 else None,
                           elapsed_s=round(state["elapsed"], 3))
                state["step_log"].append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}",
                                    epoch=state["epoch"])
                if state["step"] >= job.total_steps:
                    stop = True
                    break
                if dist.any(stop_request.requested):
                    checkpoint(job, state)
                    raise KeyboardInterrupt
                if state["step"] % c.checkpoint_every == 0 and state["batch_in_epoch"] < job.steps_per_epoch:
                    checkpoint(job, state)
            if state["batch_in_epoch"] >= job.steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if state["epoch"] % c.val_every == 0 and not stop:
                    rec = validate(job, state)
                    if rec is not None and record_validation(job, state, rec):
                        if dist.main:
                            print(f"dlibbridge finetune: early stop: {c.patience} validation(s) "
                                  f"without improvement of {c.select_metric}", file=sys.stderr)
                        stop = True
                checkpoint(job, state)
    finally:
        if bar is not None:
            bar.close()


def export(job: Job, state: dict) -> dict:
    """model.dat, model_trainable.dat, model.pt (and model.onnx) of the best or last weights,
    checked in dlib; returns the summary written to summary.json."""
    from ..port.export import export_onnx
    from ..port.checkpoint import load_torch
    from ..port.convert import to_dlib
    c, best, step = job.cfg, state["best"], state["step"]
    model, exported_step = job.model, step
    if c.export == "best" and best is not None and best["step"] != step:
        model = load_torch(job.run_dir / BEST_FILE)
        exported_step = best["step"]
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    out = job.run_dir
    to_dlib(model, out / "model.dat", trainable=False)
    to_dlib(model, out / "model_trainable.dat", trainable=True)
    save_torch(model, out / "model.pt")
    files = ["model.dat", "model_trainable.dat", "model.pt"]
    onnx_diff = None
    if c.onnx:
        # export_onnx writes the deployed form (batch-norm folded exactly as model.dat holds it).
        onnx_diff = export_onnx(model, out / "model.onnx")
        files.append("model.onnx")
    check = dlib_export_check(model, out / "model.dat", job.store,
                              job.split.val_rows if len(job.split.val_rows) else job.split.train_rows)
    images = step * c.identities_per_batch * c.images_per_identity
    val_log, elapsed = state["val_log"], state["elapsed"]
    summary = {"exported_step": exported_step, "final_step": step, "total_steps": job.total_steps,
               "epochs_completed": state["epoch"], "best": best, "files": files,
               "export_check": check, "onnx_max_abs_diff": onnx_diff, "bn_calibration": state["calibration"],
               "train_elapsed_s": round(elapsed, 3),
               "train_images_per_s": images / elapsed if elapsed > 0 else None,
               "baseline": val_log[0] if val_log and val_log[0]["step"] == 0 else None}
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
