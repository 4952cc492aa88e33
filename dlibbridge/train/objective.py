"""What differs between fine-tuning runs, as the one loop (:mod:`.loop`) sees it.

The loop owns everything a run has in common — the run folder, the optimiser and its schedule,
checkpoints, validation, selection, export and the logs.  An :class:`Objective` owns what a
recipe changes: the model in the form it trains, the batches a step sees, the loss terms, and
the validation domains (held-out people's chips as they are, or as a camera takes them).
:class:`PlainObjective` is dlib's kind of training — augmented P×K batches of aligned chips
through the trainable (batch-norm) network, optionally distilled towards the base;
:class:`dlibbridge.train.camera_finetune.CrossQuality` is the camera recipe.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn

from .config import FinetuneConfig, FinetuneError
from .losses import make_loss

if TYPE_CHECKING:
    from ..data.store import ChipStore
    from ..port.dist import Dist

#: The columns of every run's log.csv: the total, then every loss term a recipe may have (empty
#: where a run has no such term).  ``distill`` is the same-input term: the student's descriptor of
#: a chip against the base's descriptor of the same chip.
TERMS = ("identity", "distill", "xq", "relational")
#: The validation domain of the held-out people's chips as they are.
CLEAN = "clean"


@dataclass
class Split:
    """Training / held-out items of a store, and the training class index of each label."""
    train_rows: np.ndarray            # store rows usable for training
    val_rows: np.ndarray              # store rows of the held-out identities
    train_classes: dict[int, int]     # store label -> 0..C-1
    dropped_single: list[str]         # identities left out of training (one image)
    val_identities: list[str]


@dataclass
class Context:
    """What the loop has prepared when it builds an objective."""
    cfg: FinetuneConfig
    store: "ChipStore"
    split: Split
    dist: "Dist"
    device: torch.device
    amp_dtype: torch.dtype | None
    base: nn.Module                   # the base model as loaded from --base (trainable form)
    run_dir: object


class Objective:
    """The recipe-specific half of a run (see the module docstring).  Attributes: ``model``
    (trained and exported), ``loss_fn`` (its parameters, a classifier head, are trained too),
    ``frozen`` (module names never trained), ``images_per_step``."""
    model: nn.Module
    loss_fn: nn.Module
    frozen: list[str]
    images_per_step: int
    steps_per_epoch: int

    def prepare(self) -> None:
        """Work done once the run folder exists (caches); repeated on resume."""

    def train_mode(self) -> None:
        self.model.train()

    def batches(self, epoch: int, start: int) -> Iterable:
        raise NotImplementedError

    def backward(self, batch, scaler) -> dict[str, float]:
        """Gradients of one global batch; returns the mean of ``loss`` and of each term."""
        raise NotImplementedError

    def domains(self) -> dict[str, np.ndarray]:
        """Validation domain → the labels of its chips (empty without held-out people)."""
        raise NotImplementedError

    def embed(self, model: nn.Module, domain: str) -> np.ndarray:
        """Descriptors of a validation domain's chips under ``model``."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What config.json records about this objective beyond the options."""
        return {}

    def cleanup(self) -> None:
        """Remove what the objective cached in the run folder (the run is finished)."""


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


def validation_rows(split: Split, cfg: FinetuneConfig) -> np.ndarray:
    """The held-out rows validated on: all of them, or a seeded sample of ``val_max_images``
    (all-pairs metrics grow with the square of the count)."""
    rows = split.val_rows
    if len(rows) > cfg.val_max_images:
        rng = np.random.default_rng([cfg.seed, 15485863])
        rows = np.sort(rng.choice(rows, cfg.val_max_images, replace=False))
    return rows


def verification_labels(labels: np.ndarray) -> tuple[int, int]:
    """(same, different) pair counts of all pairs of chips with these labels."""
    _, counts = np.unique(labels, return_counts=True)
    n = int(counts.sum())
    same = int((counts * (counts - 1) // 2).sum())
    return same, n * (n - 1) // 2 - same


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


class PlainObjective(Objective):
    """dlib's kind of fine-tuning: P identities × K augmented chips per step through the
    trainable network, the chosen loss (``--loss``), plus ``--distill`` towards the base's
    descriptor of the same augmented chip; validation on the held-out people's chips."""
    TRAINABLE_FORM = True             # batch-norm layers (--bn frozen keeps their statistics)

    def __init__(self, ctx: Context):
        from ..data.augment import Augment, Jitter, parse_degradations
        from ..data.store import ChipDataset, PKBatchSampler
        c, split, dist = ctx.cfg, ctx.split, ctx.dist
        self.cfg, self.store, self.split, self.dist, self.device, self.amp_dtype = (
            c, ctx.store, split, dist, ctx.device, ctx.amp_dtype)
        self.loss_fn = make_loss(c.loss, len(split.train_classes), margin=c.margin, scale=c.scale)
        rows = split.train_rows
        labels = np.asarray(ctx.store.labels)
        classes = np.array([split.train_classes[int(l)] for l in labels[rows]], np.int64)
        self.sampler = PKBatchSampler(labels[rows], c.identities_per_batch, c.images_per_identity,
                                      batches=c.batches_per_epoch, seed=c.seed)
        self.steps_per_epoch = len(self.sampler)
        self.images_per_step = c.identities_per_batch * c.images_per_identity
        base = ctx.base
        self.teacher = (copy.deepcopy(base).eval().requires_grad_(False).to(ctx.device)
                        if c.distill > 0 else None)
        self.frozen = freeze_until(base, c.freeze_until)
        augment = (Augment(Jitter() if c.augment else None, parse_degradations(c.degrade))
                   if (c.augment or c.degrade) else None)
        self.dataset = ChipDataset(ctx.store, rows, augment, seed=c.seed, targets=classes)
        base.to(ctx.device)
        self.loss_fn.to(ctx.device)
        if c.channels_last:
            base.to(memory_format=torch.channels_last)
        self.model = base
        self.module = TrainModule(base, self.loss_fn)
        if dist.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        share_ids = c.identities_per_batch // dist.world
        k = c.images_per_identity
        self.share = slice(dist.rank * share_ids * k, (dist.rank + 1) * share_ids * k)
        self.micro = share_ids // c.accumulate * k
        self.val_rows = validation_rows(split, c)

    def train_mode(self) -> None:
        set_train_mode(self.model, self.cfg.bn == "train", self.frozen)

    def batches(self, epoch: int, start: int):
        """Batches ``start``.. of ``epoch``: this rank's share of each global batch, every image
        keyed by (epoch, batch, position in the global batch) for its augmentation."""
        from ..data.store import ChipDataset
        self.sampler.set_epoch(epoch)
        batches = [[(item, (epoch, j, pos)) for pos, item in enumerate(batch)][self.share]
                   for j, batch in enumerate(self.sampler)][start:]
        workers = self.cfg.workers if len(batches) > 1 else 0
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=ChipDataset.collate, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers else None)

    def backward(self, batch, scaler) -> dict[str, float]:
        """One global batch in ``--accumulate`` micro-batches (gradients synchronised once)."""
        c = self.cfg
        chips, labels = (t.to(self.device, non_blocking=True) for t in batch)
        task_total, distill_total = 0.0, 0.0
        for m in range(c.accumulate):
            x = chips[m * self.micro:(m + 1) * self.micro]
            y = labels[m * self.micro:(m + 1) * self.micro]
            last = m == c.accumulate - 1
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
                scaler.scale(loss / c.accumulate).backward()
            task_total += float(task.detach())
        task = self.dist.mean(task_total / c.accumulate)
        distill = self.dist.mean(distill_total / c.accumulate) if self.teacher is not None else None
        return {"loss": task + (c.distill * distill if distill is not None else 0.0), "identity": task,
                "distill": distill}

    def domains(self) -> dict[str, np.ndarray]:
        if len(self.val_rows) == 0:
            return {}
        return {CLEAN: np.asarray(self.store.labels)[self.val_rows]}

    def embed(self, model: nn.Module, domain: str) -> np.ndarray:
        from ..port.infer import embed_chips
        return embed_chips(model, self.store.chips, self.device, rows=self.val_rows, amp_dtype=self.amp_dtype)

    def describe(self) -> dict:
        return {"augment": None if self.dataset.transform is None else self.dataset.transform.describe()}
