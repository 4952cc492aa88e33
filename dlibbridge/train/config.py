"""What a fine-tuning run depends on: :class:`FinetuneConfig`, its defaults and the checks made before a run starts."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..errors import DlibbridgeError
from ..options import option


CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
# What to do when a run's checkpoint cannot be read (truncated by a full disk, edited, foreign).
RESUME_ADVICE = ("it cannot be resumed: restore checkpoint.pt from a backup, or start the run again "
                 "with a new --out (the files exported so far are intact)")
BEST_FILE = "best.pt"
#: The losses of :func:`.losses.make_loss` (torch-free here, so the command line can list them).
LOSSES = ("metric", "arcface", "cosface", "triplet")
PAIR_LOSSES = ("metric", "triplet")
FREEZE_LEVELS = ("none", "stem", "level4", "level3", "level2", "level1", "level0")
SELECT_METRICS = ("tar@far", "auc", "accuracy")
EXPORT_CHOICES = ("best", "last", "last-eligible")
#: Validation domains of a camera run (``--camera``): the held-out identities' clean chips, the
#: same chips degraded by the camera profile, and (``--target-val``) the user's labeled chips
#: from the camera itself.
SELECT_DOMAINS = ("camera", "clean", "target")
#: What ``--camera`` changes in the defaults: the recipe measured in docs/benchmarks.md
#: (cross-quality distillation of the whole network).  An option given explicitly wins over these.
#: The whole network is trained at AdamW 3e-5: on people it never saw, it gained more on the
#: camera than any frozen-lower-levels variant (those stop at 34-38 % camera-A TAR@1e-3: the
#: lost detail cannot be recovered above the frozen part) and kept clean faces; with nothing
#: frozen the cache holds the degraded chips themselves.  Validation runs at FAR 1e-2: with ~12
#: held-out people, 1e-3 rests on ~21 impostor pairs and its clean guard refused good steps.
#: Even so, the pick on ~12 people is noisy: of 8 benchmark runs where it chose an earlier step,
#: the last step was better on new people in 7, so the export is the last step unless it fails
#: the clean guard.
CAMERA_RECIPE = {"identities_per_batch": 16, "images_per_identity": 4, "optimizer": "adamw", "lr": 3e-5,
                 "weight_decay": 1e-4, "freeze_until": "none", "train_until": None, "distill": 1.0,
                 "xq_distance": "cosine", "max_steps": 300, "warmup_steps": 20, "select_metric": "camera:tar@far",
                 "select_far": 1e-2, "export": "last-eligible",
                 "checkpoint_every": 100}
# Config fields that may differ on --resume without changing what is computed.
RESUME_OVERRIDABLE = ("workers", "progress")


# The sections of ``dlibbridge finetune --help``.
_BATCHES = "loss and batches"
_OPTIMISATION = "optimisation"
_GUARDS = "guards against forgetting"
_CAMERA = "target camera (docs/finetune.md: cross-quality fine-tuning)"
_DATA = "data"
_RUN = "run"


class FinetuneError(DlibbridgeError, ValueError):
    """A fine-tuning job that cannot run as configured; the message says what to change."""



@dataclass
class FinetuneConfig:
    """Everything a run depends on.  ``None`` fields are resolved (by :meth:`resolved`) from
    the others, and the resolved config is what ``config.json`` records.  The fields made with
    :func:`~dlibbridge.options.option` are the options of ``dlibbridge finetune``."""
    data: str = option(positional=True, nargs="?", metavar="DATA")
    out: str = option(help="run folder to create (required unless --resume)", metavar="RUN_DIR")
    base: str | None = option(None, "dlib .dat (deployed or trainable) or a dlibbridge model.pt (default: dlib's model)",
                              metavar="MODEL")
    loss: str = option("metric", "metric = dlib's loss_metric (default); arcface/cosface: normalised head, s=64; "
                       "triplet: semi-hard mining", choices=LOSSES, group=_BATCHES)
    margin: float | None = option(None, "loss margin (default: metric 0.04, arcface 0.5, cosface 0.35, triplet 0.2)",
                                  type=float, group=_BATCHES)
    scale: float = option(64.0, "arcface/cosface scale s", group=_BATCHES)
    epochs: int = option(10, group=_OPTIMISATION)
    max_steps: int | None = option(None, "stop after N optimiser steps", type=int, metavar="N", group=_OPTIMISATION)
    # P and K: dlib's example uses 5 x 5; dlib's own training used 35 x 15.
    identities_per_batch: int = option(5, flags=("--identities-per-batch", "-P"), metavar="P", group=_BATCHES)
    images_per_identity: int = option(5, flags=("--images-per-identity", "-K"), metavar="K", group=_BATCHES)
    batches_per_epoch: int | None = option(None, "default: about every training image once per epoch",
                                           type=int, metavar="N", group=_BATCHES)
    accumulate: int = option(1, "split each batch into N micro-batches of whole identities (less memory)",
                             metavar="N", show_default=False, group=_BATCHES)
    optimizer: str = option("sgd", choices=("sgd", "adamw"), group=_OPTIMISATION)
    lr: float | None = option(None, "default: sgd 1e-4; adamw 1e-6 (1e-5 with arcface/cosface)", type=float,
                              group=_OPTIMISATION)
    momentum: float = option(0.9, "sgd momentum", group=_OPTIMISATION)
    weight_decay: float | None = option(None, "default: sgd 1e-4, adamw 1e-2", type=float, group=_OPTIMISATION)
    schedule: str = option("cosine", choices=("cosine", "step", "constant"), group=_OPTIMISATION)
    warmup_steps: int | None = option(None, "default 5%% of the steps (at most 500)", type=int, group=_OPTIMISATION)
    step_every: int | None = option(None, "step schedule period (default total/3)", type=int, metavar="N",
                                    group=_OPTIMISATION)
    step_gamma: float = option(0.1, "step schedule factor", group=_OPTIMISATION)
    min_lr_ratio: float = 0.01               # cosine floor, as a fraction of lr
    freeze_until: str = option("none", "freeze the stem and the levels up to LEVEL (input side first)",
                               choices=FREEZE_LEVELS, show_default=False, group=_GUARDS)
    pretrained_lr_scale: float | None = option(
        None, "lr factor for the pretrained network (default 0.1 with a new head, else 1)", type=float, group=_GUARDS)
    distill: float = option(
        0.0, "add W * mean ||e - e_base||^2 pulling embeddings to the base model's embedding of the same "
        "(augmented) input (default 0; 1 with --camera)", flags=("--same-input-distill", "--distill"),
        metavar="W", group=_GUARDS)
    bn: str = option("frozen", "batch-norm statistics: frozen (default; step 0 = the deployed model) or trained "
                     "(calibrated on training data first)", choices=("frozen", "train"), group=_GUARDS)
    calibration_batches: int = 20            # for --bn train
    augment: bool = option(True, "no jitter (dlib-example crop/rotation/flip/colour)", flags=("--no-augment",),
                           action="store_false", group=_DATA)
    degrade: str = option("", "random degradations, e.g. gray=0.3,blur=0.2,lowres=0.3,jpeg=0.3", metavar="SPEC",
                          group=_DATA)
    val_identities: float = option(0.1, "held-out identities: fraction (<1) or count (default 0.1; 0 = no validation)",
                                   metavar="F", group=_DATA)
    val_every: int = option(1, "validate every E epochs", metavar="E", group=_DATA)
    val_max_images: int = 2000
    select_metric: str = option(
        "tar@far", "best-checkpoint metric: tar@far (default; at FAR 1e-3, 1e-2 in camera runs), auc or accuracy; with --camera prefixed "
        "by the domain, camera: (default), clean: or target: (the default with --target-val), within --clean-limit", metavar="[DOMAIN:]METRIC", group=_DATA)
    select_far: float = 1e-3
    patience: int | None = option(None, "stop after N validations without improvement", type=int, metavar="N",
                                  group=_DATA)
    export: str = option("best", "which weights to export: best = the selected step; last; last-eligible (camera "
                         "runs) = the last step unless it fails the --clean-limit guard, else the selected one",
                         choices=EXPORT_CHOICES, group=_DATA)
    checkpoint_every: int = option(200, "steps between checkpoints", metavar="N", group=_RUN)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (default)", group=_RUN)
    amp: str = option("auto", "mixed precision (default: bf16 on CUDA, off on CPU)",
                      choices=("auto", "off", "bf16", "fp16"), group=_OPTIMISATION)
    channels_last: bool | None = None        # default: on for CUDA
    workers: int | None = option(None, "data loading processes (default: 8 on CUDA, 0 on CPU)", type=int, group=_RUN)
    seed: int = option(0, group=_RUN)
    onnx: bool = option(False, "also write model.onnx", action="store_true", group=_RUN)
    progress: bool = option(True, "no progress bar", flags=("--quiet", "-q"), action="store_false", group=_RUN)
    camera: str | None = option(
        None, "fine-tune for this camera (`dlibbridge camera` profile): cross-quality distillation with the "
        "measured recipe as the defaults; validation in the clean and camera domains (and target)", metavar="CAMERA_JSON",
        group=_CAMERA)
    target_photos: str | None = option(
        None, "unlabeled aligned chips from the target camera: adapt batch-norm to them first", metavar="DIR",
        group=_CAMERA)
    target_val: str | None = option(
        None, "labeled aligned chips from the target camera, DIR/<person>/<chip> (or a chip store; people not "
        "in DATA): validation domain 'target', the default selection domain", metavar="DIR", group=_CAMERA)
    xq_weight: float = option(1.0, "cross-quality term: student(degraded) to teacher(clean)", metavar="W",
                              group=_CAMERA)
    xq_distance: str = option("squared", "cross-quality distance: cosine (1 - cos; the --camera default) or "
                              "squared", choices=("squared", "cosine"), group=_CAMERA)
    relational_weight: float = option(1.0, "relational guard: the teacher's pairwise distances of the clean batch",
                                      metavar="W", group=_CAMERA)
    train_until: str | None = option(
        None, "last trained level of a camera run; the levels above it and the fc stay the base's (default: "
        "every level above --freeze-until, and the fc)", choices=FREEZE_LEVELS[2:], group=_CAMERA)
    camera_versions: int = option(4, "degraded versions cached per training chip", metavar="N", group=_CAMERA)
    clean_limit: float = option(0.01, "a selected step loses at most F of the base's clean TAR@FAR (default 0.01 = "
                                "1 point)", metavar="F", group=_CAMERA)
    match_threshold: float = option(
        0.0, "scale the exported descriptors so that distance T (e.g. dlib's 0.6) is the best threshold on the "
        "held-out people (every validation domain's pairs together); needs many validation people "
        "(docs/finetune.md); default 0: keep the trained scale", metavar="T", group=_CAMERA)

    @classmethod
    def for_camera(cls, data: str, out: str, camera: str, **given) -> "FinetuneConfig":
        """A camera run: :data:`CAMERA_RECIPE` under whatever is given explicitly; with labeled
        target-camera chips (``target_val``) the selection is made on them unless told otherwise."""
        recipe = dict(CAMERA_RECIPE)
        if given.get("target_val"):
            recipe["select_metric"] = "target:" + recipe["select_metric"].partition(":")[2]
        return cls(data=data, out=out, camera=camera, **{**recipe, **given})

    def select(self) -> tuple[str | None, str]:
        """``select_metric`` split into (domain, metric); the domain is None outside camera runs."""
        domain, _, metric = self.select_metric.rpartition(":")
        default = None if not self.camera else "target" if self.target_val else "camera"
        return (domain or default), metric

    def resolved(self, has_head: bool, cuda: bool, total_steps: int | None = None) -> "FinetuneConfig":
        """A copy with every ``None`` default filled in from the run's facts (a classifier
        head, CUDA, the number of steps: the warmup stays unset without it), validated: the
        one place a config is completed."""
        c = dataclasses.replace(self)
        if c.lr is None:
            # Measured on dlib's model (batch-norm frozen = no scale invariance, so the net is
            # far more sensitive than a from-scratch ResNet): 3 SGD steps at 1e-3 move the
            # embeddings by ~0.7 (dlib's match threshold is 0.6); 1e-4 by ~0.2.  AdamW's
            # per-weight steps need 1e-6 for the same drift.  Heads get 10x (pretrained scale).
            c.lr = 1e-4 if c.optimizer == "sgd" else (1e-5 if has_head else 1e-6)
        if c.weight_decay is None:
            c.weight_decay = 1e-4 if c.optimizer == "sgd" else 1e-2
        if c.pretrained_lr_scale is None:
            c.pretrained_lr_scale = 0.1 if has_head else 1.0
        if c.amp == "auto":
            c.amp = "bf16" if cuda else "off"
        if c.channels_last is None:
            c.channels_last = cuda
        if c.workers is None:
            # On CPU the ~1 ms of augmentation per image is noise next to a ~100 ms training
            # forward/backward per image; on a GPU it is the bottleneck, so it gets processes.
            c.workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if cuda else 0
        if c.warmup_steps is None and total_steps is not None:
            c.warmup_steps = min(500, int(0.05 * total_steps))
        c.validate()
        return c

    def validate(self) -> None:
        def bad(msg):
            raise FinetuneError(msg)
        if self.loss not in LOSSES:
            bad(f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.optimizer not in ("sgd", "adamw"):
            bad(f"--optimizer {self.optimizer!r}: choose sgd or adamw")
        if self.schedule not in ("cosine", "step", "constant"):
            bad(f"--schedule {self.schedule!r}: choose cosine, step or constant")
        if self.freeze_until not in FREEZE_LEVELS:
            bad(f"--freeze-until {self.freeze_until!r}: choose one of {', '.join(FREEZE_LEVELS)}")
        if self.bn not in ("frozen", "train"):
            bad(f"--bn {self.bn!r}: choose frozen or train")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            bad(f"--amp {self.amp!r}: choose auto, off, bf16 or fp16")
        domain, metric = self.select()
        if metric not in SELECT_METRICS or (domain is not None and not self.camera):
            bad(f"--select-metric {self.select_metric!r}: choose one of {', '.join(SELECT_METRICS)}"
                + (f", optionally after a domain ({'/'.join(SELECT_DOMAINS)}:) with --camera" if not self.camera else ""))
        if domain is not None and domain not in SELECT_DOMAINS:
            bad(f"--select-metric {self.select_metric!r}: the domain is one of {', '.join(SELECT_DOMAINS)}")
        if self.target_photos and not self.camera:
            bad("--target-photos adapts a camera run: give --camera camera.json too")
        if self.target_val and not self.camera:
            bad("--target-val validates a camera run: give --camera camera.json too")
        if self.target_val and self.val_identities == 0:
            bad("--target-val is validated beside held-out identities (the --clean-limit guard): "
                "--val-identities must be > 0")
        if domain == "target" and not self.target_val:
            bad(f"--select-metric {self.select_metric!r}: the target domain needs --target-val DIR")
        if self.train_until and not self.camera:
            bad("--train-until applies to camera runs: give --camera camera.json too")
        if self.camera:
            if self.freeze_until == "level0":
                bad("--freeze-until level0 leaves only the fc to train; a camera run needs level0 trainable at least")
            if self.train_until is not None and (
                    self.train_until not in FREEZE_LEVELS[2:]
                    or FREEZE_LEVELS.index(self.train_until) <= FREEZE_LEVELS.index(self.freeze_until)):
                bad(f"--train-until {self.train_until!r}: a level above --freeze-until {self.freeze_until} "
                    f"(one of {', '.join(FREEZE_LEVELS[FREEZE_LEVELS.index(self.freeze_until) + 1:])})")
            if self.xq_distance not in ("squared", "cosine"):
                bad(f"--xq-distance {self.xq_distance!r}: choose squared or cosine")
            if (self.camera_versions < 1 or self.xq_weight < 0 or self.relational_weight < 0 or self.clean_limit < 0
                    or self.match_threshold < 0):
                bad("--camera-versions must be >= 1; --xq-weight, --relational-weight, --clean-limit and "
                    "--match-threshold >= 0")
        if self.export not in EXPORT_CHOICES:
            bad(f"--export {self.export!r}: choose one of {', '.join(EXPORT_CHOICES)}")
        if self.export == "last-eligible" and not self.camera:
            bad("--export last-eligible applies to camera runs (the clean guard): give --camera camera.json too")
        for name in ("epochs", "identities_per_batch", "images_per_identity", "accumulate",
                     "checkpoint_every", "val_every"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1")
        if self.workers is not None and self.workers < 0:
            bad("--workers must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            bad("--max-steps must be >= 1")
        if self.lr is not None and not self.lr > 0:
            bad("--lr must be > 0")
        if self.distill < 0:
            bad("--distill must be >= 0")
        if self.val_identities < 0:
            bad("--val-identities must be >= 0")
        from ..data.augment import parse_degradations
        try:
            parse_degradations(self.degrade)
        except ValueError as e:                   # says which item and why
            bad(f"--degrade: {e}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise FinetuneError(f"config.json has unknown fields {sorted(unknown)} (written by a newer version?)")
        return cls(**d)
