"""The one fine-tuning loop: ``setup → fit → validate → export`` for every run.

``finetune(config)`` (behind ``dlibbridge finetune``) runs a job in a RUN_DIR.  What a recipe
changes — the model's form, the batches, the loss terms, the validation domains — is an
:class:`~.objective.Objective` (:class:`~.objective.PlainObjective`, or the camera recipe's
:class:`~.camera_finetune.CrossQuality`); everything else is here, once:

* **data** — a chip store (``data.pack``), a folder of aligned 150×150 chips (packed into
  ``RUN_DIR/data.store`` while the run lasts) or raw photos (aligned into ``RUN_DIR/chips``
  first).  Identities are split into training and held-out validation identities (never the
  same person in both); the split is checked against the batches asked for, and the
  **pre-flight** (:func:`preflight`) prints it with the pairs each validation domain has, the
  smallest FAR they resolve and the selection metric, before step 1.
* **optimisation** — SGD (dlib's update rule) or AdamW over the objective's trainable
  parameters (no weight decay on biases and normalisation parameters), linear warm-up then
  cosine or step decay (one ``LambdaLR``, :func:`lr_factor`), AMP and channels_last on CUDA,
  DDP under ``torchrun`` (plain runs).
* **validation and selection** — every ``--val-every`` epochs and at the end, each domain's
  all-pairs metrics; the selected step has the best ``--select-metric`` among the steps whose
  clean TAR@FAR is at most ``--clean-limit`` below the base's (step 0, the base, is always a
  candidate); ``--export best|last|last-eligible`` says which weights are exported.
* **bookkeeping** — ``config.json`` (every option with its origin: default, recipe or user);
  ``log.csv`` (one schema: the total and every loss term) and ``val.csv`` per validation, plus
  ``log.json``; ``curves.png``; one atomic ``checkpoint.pt`` (weights, optimiser, schedule,
  the selected step's weights, logs) from which ``--resume RUN_DIR`` continues bit-identically
  on CPU.  A finished run keeps the run state only: its weights are the exports.
* **outputs** — ``model.dat`` (deployed, checked in ``dlib.face_recognition_model_v1``),
  ``model_trainable.dat`` (dlib's bn_con ``net_type``), ``model.pt``, ``model.onnx`` with
  ``--onnx`` (checked against torch), ``threshold.json``, ``summary.json`` and ``README.md``
  (the model card).  Caches and packed data are removed when the run ends.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
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

from .._io import sha256_file, write_torch
from ..port.device import resolve_device
from .._load import read_torch
from .._lock import LOCK_NAME, folder_lock
from ..assets import resolve_model
from ..port.checkpoint import load_model, save_torch
from .config import (CHECKPOINT_FILE, CONFIG_FILE, FREEZE_LEVELS, PAIR_LOSSES, RESUME_ADVICE, RESUME_OVERRIDABLE,
                     FinetuneConfig, FinetuneError)
from ..port.dist import Dist, init_distributed
from .objective import CLEAN, Context, Objective, PlainObjective, Split, verification_labels
from .rundir import write_logs, write_model_card, write_run_json

if TYPE_CHECKING:
    from ..data.store import ChipStore

__all__ = ["FinetuneConfig", "FinetuneError", "finetune", "load_resume_config", "load_base_model",
           "split_identities", "lr_factor", "FREEZE_LEVELS"]

# ------------------------------------------------------------------------------------------
# Model: base loading, freezing, parameter groups, export
# ------------------------------------------------------------------------------------------

def base_path(spec: str | None) -> Path:
    """``--base`` as a file (None = dlib's own model), resolved once per run."""
    path = resolve_model(spec, "--base")
    if not path.is_file():
        raise FinetuneError(f"--base {path} does not exist")
    return path


def load_base_model(spec: str | None) -> nn.Module:
    """The base as a trainable (batch-norm form) ``FaceResNet``: a dlib .dat (deployed affine
    or trainable bn_con) or a model.pt this package wrote.  None = dlib's own model."""
    return load_model(base_path(spec), trainable=True)


def check_data(data: str) -> None:
    """DATA must be a chip store or a folder: refused before anything is written."""
    src = Path(data)
    if not (src / "index.json").is_file() and not src.is_dir():
        raise FinetuneError(f"DATA {src} " + ("is a file, not a chip store or a folder" if src.exists()
                                                else "does not exist"))


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
# The job
# ------------------------------------------------------------------------------------------

def _pick_device(spec: str, dist: Dist) -> torch.device:
    """``--device`` as every command reads it; under torchrun each rank takes its local GPU."""
    device = resolve_device(spec)
    if device.type == "cuda" and dist.world > 1:
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return device


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


def load_run_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """(options, their origins) of a run's config.json (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FinetuneError(f"{path} is not a fine-tuning run's {CONFIG_FILE}")
    try:
        saved = json.loads(path.read_text())
        FinetuneConfig.from_json(saved["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"{path} is damaged or not a dlibbridge run config ({type(e).__name__}: {e})") from None
    return saved["config"], saved.get("origin") or {}


def load_resume_config(run_dir: str | os.PathLike, overrides: dict | None = None) -> FinetuneConfig:
    """The config of an existing run, with only :data:`RESUME_OVERRIDABLE` fields changed."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        raise FinetuneError(f"{run_dir} is not a fine-tuning run (no {CONFIG_FILE})")
    cfg = FinetuneConfig.from_json(load_run_config(run_dir)[0])
    cfg.out = str(run_dir)
    for k, v in (overrides or {}).items():
        if k not in RESUME_OVERRIDABLE:
            raise FinetuneError(f"--{k.replace('_', '-')} cannot change on --resume (the run's config fixes it)")
        setattr(cfg, k, v)
    return cfg


def finetune(cfg: FinetuneConfig, resume: bool = False, origin: dict | None = None) -> dict:
    """Run (or continue) a fine-tuning job; returns the summary written to summary.json.
    ``origin`` says where each option's value came from (``default``/``recipe``/``user``;
    :meth:`FinetuneConfig.compose`), for config.json.  The run folder is locked for the whole
    job (by the main process of a torchrun job): a second run or a ``--resume`` of a run still
    training is refused in one line."""
    main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(cfg.out, "dlibbridge finetune") if main else contextlib.nullcontext():
        return _finetune(cfg, resume, origin)


def _finetune(cfg: FinetuneConfig, resume: bool, origin: dict | None) -> dict:
    cfg.validate()
    if resume:
        done = finished_summary(Path(cfg.out))
        if done is not None:
            return done
    else:
        check_data(cfg.data)
    if cfg.onnx:
        from ..port.export import check_onnx_installed
        check_onnx_installed()
    objective_cls, pre = PlainObjective, None
    if cfg.camera:
        from .camera_finetune import CrossQuality, precheck
        objective_cls, pre = CrossQuality, precheck(cfg)
    # --base is resolved here once; a bad one fails before the run folder exists.
    path = base_path(cfg.base)
    base = load_model(path, trainable=objective_cls.TRAINABLE_FORM)
    device_kind = resolve_device(cfg.device).type
    dist = init_distributed(device_kind)
    try:
        return _run(setup(cfg, resume, dist, base, path, objective_cls, pre, origin))
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def finished_summary(run_dir: Path) -> dict | None:
    """A finished run's summary (its checkpoint says so): continuing it has nothing to do."""
    ckpt, summary = run_dir / CHECKPOINT_FILE, run_dir / "summary.json"
    if not (ckpt.is_file() and summary.is_file()):
        return None
    if not read_torch(ckpt, what="checkpoint", advice=RESUME_ADVICE).get("finished"):
        return None
    print(f"finetune: {run_dir} is finished; its exports are in place", file=sys.stderr)
    return json.loads(summary.read_text())


# ------------------------------------------------------------------------------------------
# The job: setup -> fit -> validate -> export, over a plain state dict
# ------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What a run is made of, fixed once :func:`setup` has built it.  Everything that changes
    while training (step counters, logs, best score) is the plain dict of :func:`new_state`;
    a checkpoint is that dict plus the model, loss, optimiser, scheduler and scaler states
    and the selected step's weights."""
    cfg: FinetuneConfig               # resolved: what config.json records
    origin: dict
    dist: Dist
    device: torch.device
    run_dir: Path
    resume: bool
    store: "ChipStore"
    split: Split
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int
    amp_dtype: torch.dtype | None
    base_path: Path
    base_sha: str
    requested: dict                   # the config as given (before resolution and the pre-flight)
    best_weights: dict | None = None  # the selected step's state dict (CPU)


def _fit_identities_per_batch(cfg: FinetuneConfig, store, origin: dict) -> FinetuneConfig:
    """A recipe's -P may exceed what a small photo set allows (P people in training, two held
    out): lower it to what the data allows and say so (config.json then records the -P used, so a
    resume keeps it).  A -P the user gave, or the default, is checked by the split, not changed."""
    if origin.get("identities_per_batch") != "recipe":
        return cfg
    labels = np.asarray(store.labels)
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    usable = int((counts >= 2).sum())
    p = cfg.identities_per_batch
    if usable >= p + 2 or usable - 2 < 2:
        return cfg
    print(f"note: -P lowered from {p} to {usable - 2}: the data has {usable} identities with 2+ images "
          "and 2 are held out for validation", file=sys.stderr)
    return dataclasses.replace(cfg, identities_per_batch=usable - 2)


def setup(cfg: FinetuneConfig, resume: bool, dist: Dist, base: nn.Module, base_file: Path,
          objective_cls: type, pre, origin: dict | None) -> Job:
    """Open the data, split it, resolve the config and build the objective, optimiser and
    schedule (rank 0 packs or aligns the data; the others wait and open the result)."""
    requested = cfg.to_json()
    device = _pick_device(cfg.device, dist)
    run_dir = _prepare_run_dir(cfg, resume, dist)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if dist.main:
        store = open_data(cfg.data, run_dir, cfg.progress)
    dist.barrier()
    if not dist.main:
        store = open_data(cfg.data, run_dir, False)
    origin = origin or {}
    cfg = _fit_identities_per_batch(cfg, store, origin)
    split = split_identities(store, cfg, dist.world)
    has_head = cfg.loss in ("arcface", "cosface")
    c = cfg.resolved(has_head=has_head, cuda=device.type == "cuda")
    amp_dtype = _amp_dtype(c.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed 150x150 input: pick the fastest kernels
    if amp_dtype is not None and device.type != "cuda":
        raise FinetuneError(f"--amp {c.amp} is for CUDA; use --amp off on {device}")
    ctx = Context(c, store, split, dist, device, amp_dtype, base, run_dir)
    objective = objective_cls(ctx, pre) if pre is not None else objective_cls(ctx)
    total = c.epochs * objective.steps_per_epoch
    total_steps = min(total, c.max_steps) if c.max_steps else total
    c = c.resolved(has_head=has_head, cuda=device.type == "cuda", total_steps=total_steps)
    optimizer = make_optimizer(param_groups(objective.model, objective.loss_fn, c), c)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, c))
    return Job(cfg=c, origin=origin, dist=dist, device=device, run_dir=run_dir, resume=resume, store=store,
               split=split, objective=objective, optimizer=optimizer, scheduler=scheduler,
               scaler=torch.amp.GradScaler(device.type, enabled=c.amp == "fp16"), total_steps=total_steps,
               amp_dtype=amp_dtype, base_path=base_file, base_sha=sha256_file(base_file), requested=requested)


def new_state() -> dict:
    """The changing part of a run at step 0."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "stale_validations": 0,
            "step_log": [], "val_log": [], "elapsed": 0.0,
            "initialised": False,        # baseline validation (and BN calibration) done
            "calibration": None}


CHECKPOINT_FORMAT = "dlibbridge.finetune"
CHECKPOINT_VERSION = 2
_MODULE_STATES = ("optimizer", "scheduler", "scaler")


def checkpoint(job: Job, state: dict, finished: bool = False) -> None:
    """The one checkpoint: the run state, and (unless ``finished``: its weights are the
    exports then) the model, loss, optimiser, schedule and the selected step's weights."""
    if job.dist.main:
        obj = job.objective
        ck = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "state": state,
              "config": job.cfg.to_json(), "finished": finished}
        if not finished:
            ck.update({k: getattr(job, k).state_dict() for k in _MODULE_STATES})
            ck["model"] = obj.model.state_dict()
            ck["loss_fn"] = obj.loss_fn.state_dict()
            best = state["best"]
            ck["best_model"] = job.best_weights if best is not None and best["step"] != state["step"] else None
        write_torch(job.run_dir / CHECKPOINT_FILE, ck)
        write_logs(job.run_dir, state["step_log"], state["val_log"])
    job.dist.barrier()


def load_checkpoint(job: Job, saved: dict) -> dict:
    """Restore the module states into ``job``; returns the state dict."""
    if saved.get("format") != CHECKPOINT_FORMAT or saved.get("format_version") != CHECKPOINT_VERSION:
        raise FinetuneError(f"{job.run_dir / CHECKPOINT_FILE} was written by another version of dlibbridge "
                            f"(format {saved.get('format')} {saved.get('format_version')}); start a new run")
    now = job.cfg.to_json()
    if any(saved["config"].get(k) != v for k, v in now.items() if k not in RESUME_OVERRIDABLE):
        raise FinetuneError("checkpoint.pt was written with a different config than config.json")
    obj = job.objective
    obj.model.load_state_dict(saved["model"])
    obj.loss_fn.load_state_dict(saved["loss_fn"])
    for k in _MODULE_STATES:
        getattr(job, k).load_state_dict(saved[k])
    state = saved["state"]
    if state["best"] is not None:
        job.best_weights = saved["best_model"] if saved["best_model"] is not None else _cpu_state(obj.model)
    return state


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items()}


def write_config(job: Job, state: dict) -> None:
    if not job.dist.main:
        return
    c, split = job.cfg, job.split
    write_run_json(job.run_dir / CONFIG_FILE, {
        "config": c.to_json(),
        # "derived": filled in or changed by the run from its facts (a default lr for the optimiser,
        # a -P the data cannot fill, a FAR the validation cannot resolve)
        "origin": {k: "derived" if v != job.requested.get(k) else job.origin.get(k, "default")
                   for k, v in c.to_json().items()},
        "data": {"store": str(job.store.path), "images": int(len(job.store.labels)),
                 "identities": len(job.store.identities),
                 "train_identities": len(split.train_classes),
                 "train_images": int(len(split.train_rows)),
                 "val_identities": split.val_identities,
                 "val_images": int(len(split.val_rows)),
                 "dropped_single_image_identities": split.dropped_single},
        "selection": state["selection"],
        "derived": {"steps_per_epoch": job.objective.steps_per_epoch, "total_steps": job.total_steps,
                    "warmup_steps": c.warmup_steps, "world_size": job.dist.world,
                    "images_per_step": job.objective.images_per_step,
                    "optimizer": type(job.optimizer).__name__,
                    "frozen": job.objective.frozen, "base": str(job.base_path), "base_sha256": job.base_sha},
        "objective": job.objective.describe(),
        "environment": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                        "device": str(job.device), "threads": torch.get_num_threads()},
    })


# ------------------------------------------------------------------------------------------
# Pre-flight: what the run will be able to tell, said before step 1
# ------------------------------------------------------------------------------------------

#: The FARs selection may fall back to, finest first, when the asked one cannot be resolved.
_RESOLVABLE_FARS = (1e-4, 1e-3, 1e-2, 1e-1)


def preflight(job: Job) -> dict:
    """Print the split, each validation domain's pairs and the smallest FAR they resolve, and
    the selection metric; returns the selection record (config.json, summary.json).  A
    TAR@FAR measured on fewer than 1/FAR different pairs is TAR at FAR 0 in disguise: the
    selection then uses the finest FAR the pairs resolve (AUC under ten different pairs), and
    the resolved config records it.  No held-out people at all is said with what to do."""
    c, split, store = job.cfg, job.split, job.store
    labels = np.asarray(store.labels)
    people = len(np.unique(labels[labels >= 0]))
    say = (lambda s: print(f"finetune: {s}", file=sys.stderr)) if job.dist.main else (lambda s: None)
    say(f"data: {people} people, {len(labels)} chips; training {len(split.train_classes)} people "
        f"({len(split.train_rows)} chips), validation {len(split.val_identities)} people ({len(split.val_rows)} chips)"
        + (f"; {len(split.dropped_single)} people with one chip left out" if split.dropped_single else ""))
    domains = job.objective.domains()
    sel_domain, metric = c.select()
    record = {"asked": {"metric": c.select_metric, "far": c.select_far}, "domains": {}}
    if not domains:
        say("WARNING: no validation: no people are held out, so the run cannot tell whether a step is better "
            "than the base model, and it exports the last step. To validate, hold people out "
            "(--val-identities 2 and a -P that leaves them out of the batches) or add people; "
            "--export last says that exporting the last step is intended.")
        record.update(metric=None, far=None, resolvable=False)
        return record
    for d, dl in domains.items():
        same, diff = verification_labels(dl)
        record["domains"][d] = {"chips": int(len(dl)), "people": int(len(np.unique(dl))), "pairs_same": same,
                                "pairs_different": diff, "smallest_far": 1.0 / diff if diff else None}
        say(f"validation {d}: {len(dl)} chips of {len(np.unique(dl))} people, {same} same / {diff} different "
            f"pairs; the smallest FAR they resolve is {1.0 / diff:.1e}" if diff else
            f"validation {d}: {len(dl)} chips, no different pairs")
    diff = record["domains"][sel_domain]["pairs_different"]
    far = c.select_far
    if metric == "tar@far" and far * diff < 1:
        finer = [f for f in _RESOLVABLE_FARS if f * diff >= 1]
        if finer:
            asked, job.cfg.select_far = far, finer[0]
            far = finer[0]
            say(f"note: TAR at FAR {asked:g} needs {math.ceil(1 / asked)} different pairs and the {sel_domain} "
                f"validation has {diff}: selecting by TAR at FAR {far:g} instead")
        else:
            job.cfg.select_metric = f"{sel_domain}:auc"
            metric = "auc"
            say(f"note: the {sel_domain} validation has {diff} different pairs, too few for any TAR@FAR: "
                "selecting by AUC instead")
    record.update(metric=f"{sel_domain}.{metric}", far=far, resolvable=True)
    say(f"selection: {sel_domain} {metric}" + (f" at FAR {far:g}" if metric == "tar@far" else "")
        + f", among the steps whose clean TAR@FAR is at most {c.clean_limit:g} below the base's; "
        f"export: {c.export}")
    return record


# ------------------------------------------------------------------------------------------
# Validation and selection
# ------------------------------------------------------------------------------------------

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
    report = calibrate(job.objective.model, np.asarray(job.store.chips[pick]), batch_size=min(batch, n),
                       report_max=batch, seed=c.seed, device=job.device)
    state["calibration"] = dataclasses.asdict(report)
    if job.dist.main and c.progress:
        print("dlibbridge finetune: " + "; ".join(report.lines()), file=sys.stderr)


def init_head(job: Job, per_class: int = 4) -> None:
    """Classifier heads (arcface/cosface) start at each training identity's mean base
    embedding over up to ``per_class`` un-augmented images (see
    ``NormalizedClassifier.init_from_centres``).  Every rank computes the same centres."""
    from ..port.infer import embed_chips
    head = getattr(job.objective.loss_fn, "head", None)
    if head is None:
        return
    rows = job.split.train_rows
    labels = np.asarray(job.store.labels)[rows]
    targets = np.array([job.split.train_classes[int(l)] for l in labels])
    rng = np.random.default_rng([job.cfg.seed, 1299709])
    pick, owner = [], []
    for cls in range(len(job.split.train_classes)):
        mine = rows[targets == cls]
        chosen = np.sort(rng.choice(mine, size=min(per_class, len(mine)), replace=False))
        pick.extend(chosen.tolist())
        owner.extend([cls] * len(chosen))
    emb = embed_chips(job.objective.model, job.store.chips, job.device, rows=np.asarray(pick),
                      amp_dtype=job.amp_dtype)
    emb = F.normalize(torch.from_numpy(emb), dim=1)
    centres = torch.zeros(head.weight.shape).index_add_(0, torch.tensor(owner), emb)
    head.init_from_centres(centres.to(head.weight.device))


def validate(job: Job, state: dict, model: nn.Module | None = None) -> dict | None:
    """Verification metrics of every validation domain, keys ``DOMAIN.METRIC`` (rank 0
    measures, every rank gets them)."""
    from ..eval.metrics import verification_summary
    domains = job.objective.domains()
    if not domains:
        return None
    rec = None
    if job.dist.main:
        rec = {"step": state["step"], "epoch": state["epoch"]}
        for d, labels in domains.items():
            emb = job.objective.embed(model or job.objective.model, d)
            rec.update({f"{d}.{k}": v for k, v in verification_summary(emb, labels, job.cfg.select_far).items()})
        job.objective.train_mode()
    return job.dist.broadcast_obj(rec)


def _selection_key(cfg: FinetuneConfig) -> str:
    domain, metric = cfg.select()
    return f"{domain}.{metric}"


def eligible(job: Job, rec: dict, base_rec: dict) -> bool:
    """A step may be selected when its clean TAR@FAR is at most ``--clean-limit`` below the base's."""
    key = f"{CLEAN}.tar@far"
    return rec[key] >= base_rec[key] - job.cfg.clean_limit - 1e-12


def record_validation(job: Job, state: dict, rec: dict) -> bool:
    """Record, keep the selected step (and its weights), and say whether to stop early."""
    c = job.cfg
    state["val_log"].append(rec)
    key = _selection_key(c)
    score = rec[key]
    best = state["best"]
    if best is None or (eligible(job, rec, state["val_log"][0]) and score > best["score"]):
        state["best"] = {"score": score, "step": state["step"], "metric": key, "validation": rec}
        state["stale_validations"] = 0
        job.best_weights = _cpu_state(job.objective.model)
    else:
        state["stale_validations"] += 1
    return c.patience is not None and state["stale_validations"] >= c.patience


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def train_step(job: Job, state: dict, batch) -> dict:
    """One optimiser step over a global batch: the objective's gradients, then the update."""
    terms = job.objective.backward(batch, job.scaler)
    if not math.isfinite(terms["loss"]):
        raise FinetuneError(f"loss became {terms['loss']} at step {state['step']}; lower --lr "
                            "(the last checkpoint is intact, fix the config and start a new run)")
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    job.scheduler.step()
    return terms


def _run(job: Job) -> dict:
    """The whole job: resume or start (pre-flight, baseline validation), fit, final
    validation, export, then the run folder reduced to what it delivers."""
    ckpt_path = job.run_dir / CHECKPOINT_FILE
    selection = preflight(job)
    state = new_state()
    if job.resume and ckpt_path.is_file():
        state = load_checkpoint(job, read_torch(ckpt_path, what="checkpoint", map_location=job.device, advice=RESUME_ADVICE))
    elif job.resume and job.dist.main:
        print(f"dlibbridge finetune: {job.run_dir} has no checkpoint yet; starting it from step 0", file=sys.stderr)
    state["selection"] = selection
    job.objective.prepare()
    if not state["initialised"]:
        write_config(job, state)
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
    checkpoint(job, state, finished=True)
    if job.dist.main:
        job.objective.cleanup()
        for cache in ("data.store", "chips"):
            shutil.rmtree(job.run_dir / cache, ignore_errors=True)
    return summary


def fit(job: Job, state: dict, stop_request: "_GracefulStop") -> None:
    """Train from ``state`` to the last step: checkpoints every N steps and at epoch ends,
    validation every E epochs, early stopping; a stop request checkpoints and interrupts."""
    c, dist, obj = job.cfg, job.dist, job.objective
    bar = None
    if dist.main and c.progress:
        from .._progress import progress_bar
        bar = progress_bar(total=job.total_steps, initial=state["step"], unit="step", desc="finetune")
    stop = state["step"] >= job.total_steps
    try:
        while not stop:
            obj.train_mode()
            t_last = time.perf_counter()
            for batch in obj.batches(state["epoch"], state["batch_in_epoch"]):
                lr = c.lr * lr_factor(state["step"], job.total_steps, c)
                rec = train_step(job, state, batch)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                state["elapsed"] += dt
                state["step"] += 1
                state["batch_in_epoch"] += 1
                rec.update(step=state["step"], epoch=state["epoch"], lr=lr,
                           images_per_s=obj.images_per_step / dt if dt > 0 else None,
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
                if state["step"] % c.checkpoint_every == 0 and state["batch_in_epoch"] < obj.steps_per_epoch:
                    checkpoint(job, state)
            if state["batch_in_epoch"] >= obj.steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if state["epoch"] % c.val_every == 0 and not stop:
                    rec = validate(job, state)
                    if rec is not None and record_validation(job, state, rec):
                        if dist.main:
                            print(f"dlibbridge finetune: early stop: {c.patience} validation(s) "
                                  f"without improvement of {_selection_key(c)}", file=sys.stderr)
                        stop = True
                checkpoint(job, state)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------

THRESHOLD_FILE = "threshold.json"


def _exported_weights(job: Job, state: dict) -> tuple[nn.Module, int]:
    """The model ``--export`` asks for: the selected step (``best``; ``last-eligible`` when the
    last step fails the clean guard) or the last one."""
    c, best, vals, obj = job.cfg, state["best"], state["val_log"], job.objective
    step = state["step"]
    fallback = c.export == "last-eligible" and len(vals) > 1 and not eligible(job, vals[-1], vals[0])
    if (c.export == "best" or fallback) and best is not None and best["step"] != step:
        model = copy.deepcopy(obj.model)
        model.load_state_dict(job.best_weights)
        return model.eval(), best["step"]
    return obj.model.eval(), step


def match_distance_scale(job: Job, model: nn.Module, state: dict) -> tuple[nn.Module, dict | None]:
    """A copy of ``model`` whose descriptors are scaled (the fc, so ``model.dat`` carries it)
    by ``s = T / t``: t is the best threshold on the pairs of every validation domain together,
    T is ``--match-threshold``.  Whole-network training keeps the best threshold near the base's
    (~0.56) but changes how accuracy falls off above it: measured, clean accuracy at 0.6 fell
    0.14 points while at the best threshold it rose.  Distances scale, rankings do not: TAR at
    any FAR is unchanged."""
    from ..eval.metrics import best_threshold, pair_distances
    domains = job.objective.domains()
    if not job.cfg.match_threshold or not domains:
        return model, None
    dist, same = [], []
    for d, labels in domains.items():
        emb = job.objective.embed(model, d)
        iu, ju = np.triu_indices(len(emb), k=1)
        dist.append(pair_distances(emb[iu], emb[ju]))
        same.append(labels[iu] == labels[ju])
    t, acc = best_threshold(np.concatenate(dist), np.concatenate(same))
    scale = job.cfg.match_threshold / t
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc.weight.mul_(scale)
    return scaled.eval(), {"scale": scale, "best_threshold_before": t, "accuracy_there": acc,
                           "match_threshold": job.cfg.match_threshold, "domains": list(domains)}


def export(job: Job, state: dict) -> dict:
    """model.dat, model_trainable.dat, model.pt (and model.onnx) of the selected or last
    weights, checked in dlib (and onnxruntime); threshold.json, summary.json, README.md."""
    from ..port.convert import to_dlib
    c, obj, vals, out = job.cfg, job.objective, state["val_log"], job.run_dir
    model, exported = _exported_weights(job, state)
    model, scaling = match_distance_scale(job, model, state)
    final_rec = next((v for v in vals if v["step"] == exported), None)
    if scaling and final_rec:       # the exported model's own figures: distances have moved
        final_rec = validate(job, {"step": exported, "epoch": state["epoch"]}, model)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    to_dlib(model, out / "model.dat", trainable=False)
    to_dlib(model, out / "model_trainable.dat", trainable=True)
    save_torch(model, out / "model.pt")
    files = ["model.dat", "model_trainable.dat", "model.pt"]
    onnx_diff = None
    if c.onnx:
        from ..port.export import export_onnx
        # export_onnx writes the deployed form (batch-norm folded exactly as model.dat holds it)
        # and checks the written file against the torch model before it replaces anything.
        onnx_diff = export_onnx(model, out / "model.onnx")
        files.append("model.onnx")
    check = dlib_export_check(model, out / "model.dat", job.store,
                              job.split.val_rows if len(job.split.val_rows) else job.split.train_rows)
    domains = list(obj.domains())
    threshold = None
    if final_rec:
        d = domains[-1]        # the domain nearest the deployment: target, else camera, else clean
        threshold = {"threshold": final_rec[f"{d}.best_threshold"], "domain": d,
                     "accuracy_at_threshold": final_rec[f"{d}.accuracy"],
                     "accuracy_at_0.6": final_rec[f"{d}.accuracy_at_0.6"],
                     "note": f"distance threshold with the best accuracy on the held-out {d} validation pairs "
                             f"({final_rec[f'{d}.pairs_same']} same, {final_rec[f'{d}.pairs_different']} "
                             "different); dlib's default is 0.6"}
        write_run_json(out / THRESHOLD_FILE, threshold)
        files.append(THRESHOLD_FILE)
    per_domain = {}
    if vals:
        for d in domains:
            pick = lambda rec: {k.split(".", 1)[1]: v for k, v in rec.items() if k.startswith(d + ".")}  # noqa: E731
            per_domain[d] = {"base": pick(vals[0]), "exported": pick(final_rec) if final_rec else None}
    adaptation = obj.describe().get("target_adaptation")
    exports_base = exported == 0 and scaling is None and adaptation is None
    step, best = state["step"], state["best"]
    images = step * obj.images_per_step
    elapsed = state["elapsed"]
    summary = {"exports_base_model": exports_base, "exported_step": exported, "final_step": step,
               "total_steps": job.total_steps, "epochs_completed": state["epoch"], "best": best,
               "selection": state["selection"], "domains": per_domain, "recommended_threshold": threshold,
               "distance_scale": scaling, "files": files + ["README.md"], "export_check": check,
               "onnx_max_abs_diff": onnx_diff, "bn_calibration": state["calibration"],
               "target_adaptation": adaptation, "train_elapsed_s": round(elapsed, 3),
               "train_images_per_s": images / elapsed if elapsed > 0 else None,
               "baseline": vals[0] if vals and vals[0]["step"] == 0 else None}
    write_run_json(out / "summary.json", summary)
    write_model_card(out, summary, job.cfg, job.origin, {"path": str(job.base_path), "sha256": job.base_sha},
                     json.loads((out / CONFIG_FILE).read_text()))
    return summary


def dlib_export_check(model: nn.Module, dat_path: Path, store, rows: np.ndarray, n: int = 3) -> dict:
    """Load the written model.dat in dlib itself and compare its descriptors with the torch
    model's on a few chips: proof the exported file is the trained network."""
    import dlib
    from ..port.convert import dlib_check
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
