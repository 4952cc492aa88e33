"""What a fine-tuning run depends on: :class:`FinetuneConfig`, its defaults and the checks made before a run starts."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..data.augment import parse_degradations
from .losses import LOSSES
from ..errors import DlibbridgeError


CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
PAIR_LOSSES = ("metric", "triplet")
FREEZE_LEVELS = ("none", "stem", "level4", "level3", "level2", "level1", "level0")
SELECT_METRICS = ("tar@far", "auc", "accuracy")
#: Validation domains of a camera run (``--camera``): the held-out identities' clean chips and
#: the same chips degraded by the camera profile.
SELECT_DOMAINS = ("camera", "clean")
#: What ``--camera`` changes in the defaults: the recipe measured in docs/benchmarks.md
#: (cross-quality distillation on cached features of frozen lower levels).  An option given
#: explicitly wins over these.
#: Only level2 is trained (stem..level3 frozen and cached, level1, level0 and the fc kept): training
#: the upper levels fits the training people (camera-A TAR@1e-3 on them 35 -> 57-59 %) but does not
#: carry over to new ones as well.  Validation runs at FAR 1e-2: with ~12 held-out people, 1e-3
#: rests on ~21 impostor pairs and its clean guard refused good steps.
CAMERA_RECIPE = {"identities_per_batch": 16, "images_per_identity": 4, "optimizer": "adamw", "lr": 1e-4,
                 "weight_decay": 1e-4, "freeze_until": "level3", "train_until": "level2", "distill": 1.0,
                 "xq_distance": "cosine", "max_steps": 300, "warmup_steps": 20, "select_metric": "camera:tar@far",
                 "select_far": 1e-2,
                 "checkpoint_every": 100}
# Config fields that may differ on --resume without changing what is computed.
RESUME_OVERRIDABLE = ("workers", "progress")


class FinetuneError(DlibbridgeError, ValueError):
    """A fine-tuning job that cannot run as configured; the message says what to change."""



@dataclass
class FinetuneConfig:
    """Everything a run depends on.  ``None`` fields are resolved (by :meth:`resolved`) from
    the others, and the resolved config is what ``config.json`` records."""
    data: str
    out: str
    base: str | None = None                  # None: the installed dlib face model
    loss: str = "metric"
    margin: float | None = None              # per-loss default (losses.make_loss)
    scale: float = 64.0                      # arcface/cosface s
    epochs: int = 10
    max_steps: int | None = None
    identities_per_batch: int = 5            # P (dlib's example: 5; dlib's own training: 35)
    images_per_identity: int = 5             # K (dlib's example: 5; dlib's own training: 15)
    batches_per_epoch: int | None = None     # default: every training image about once
    accumulate: int = 1                      # micro-batches per optimiser step (whole identities)
    optimizer: str = "sgd"
    lr: float | None = None                  # sgd 1e-4; adamw 1e-6 (1e-5 with a head)
    momentum: float = 0.9
    weight_decay: float | None = None        # sgd 1e-4 (dlib's example), adamw 1e-2
    schedule: str = "cosine"                 # cosine | step | constant
    warmup_steps: int | None = None          # default: 5 % of the steps, at most 500
    step_every: int | None = None            # step schedule: decay every N steps (default total/3)
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.01               # cosine floor, as a fraction of lr
    freeze_until: str = "none"
    pretrained_lr_scale: float | None = None  # default 0.1 with a new head, else 1.0
    distill: float = 0.0                     # same-input distillation weight (teacher on the student's input)
    bn: str = "frozen"                       # frozen | train
    calibration_batches: int = 20            # for --bn train
    augment: bool = True
    degrade: str = ""
    val_identities: float = 0.1              # fraction (< 1) or count (>= 1) of identities
    val_every: int = 1                       # epochs between validations
    val_max_images: int = 2000
    select_metric: str = "tar@far"
    select_far: float = 1e-3
    patience: int | None = None              # validations without improvement before stopping
    export: str = "best"                     # best | last
    checkpoint_every: int = 200
    device: str = "auto"
    amp: str = "auto"                        # auto | off | bf16 | fp16
    channels_last: bool | None = None        # default: on for CUDA
    workers: int | None = None               # data processes (default: CUDA 8, CPU 0)
    seed: int = 0
    onnx: bool = False
    progress: bool = True
    camera: str | None = None                # camera.json: run the cross-quality recipe for that camera
    target_photos: str | None = None         # unlabeled target-camera chips: batch-norm adaptation
    xq_weight: float = 1.0                   # cross-quality term (camera runs)
    xq_distance: str = "squared"             # its distance: squared | cosine (1 - cos)
    relational_weight: float = 1.0           # relational guard (camera runs)
    camera_versions: int = 4                 # degraded versions cached per training chip
    train_until: str | None = None           # camera runs: last trained level; the levels above and the fc stay the base's
    clean_limit: float = 0.01                # camera runs: most clean TAR@FAR a selected step may lose

    @classmethod
    def for_camera(cls, data: str, out: str, camera: str, **given) -> "FinetuneConfig":
        """A camera run: :data:`CAMERA_RECIPE` under whatever is given explicitly."""
        return cls(data=data, out=out, camera=camera, **{**CAMERA_RECIPE, **given})

    def select(self) -> tuple[str | None, str]:
        """``select_metric`` split into (domain, metric); the domain is None outside camera runs."""
        domain, _, metric = self.select_metric.rpartition(":")
        return (domain or ("camera" if self.camera else None)), metric

    def resolved(self, has_head: bool, cuda: bool) -> "FinetuneConfig":
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
        if self.train_until and not self.camera:
            bad("--train-until applies to camera runs: give --camera camera.json too")
        if self.camera:
            if self.freeze_until == "none":
                bad("--camera trains on cached features of frozen lower levels: --freeze-until must name a level")
            if self.freeze_until == "level0":
                bad("--freeze-until level0 leaves only the fc to train; a camera run needs level0 trainable at least")
            if self.train_until is not None and (
                    self.train_until not in FREEZE_LEVELS[2:]
                    or FREEZE_LEVELS.index(self.train_until) <= FREEZE_LEVELS.index(self.freeze_until)):
                bad(f"--train-until {self.train_until!r}: a level above --freeze-until {self.freeze_until} "
                    f"(one of {', '.join(FREEZE_LEVELS[FREEZE_LEVELS.index(self.freeze_until) + 1:])})")
            if self.xq_distance not in ("squared", "cosine"):
                bad(f"--xq-distance {self.xq_distance!r}: choose squared or cosine")
            if self.camera_versions < 1 or self.xq_weight < 0 or self.relational_weight < 0 or self.clean_limit < 0:
                bad("--camera-versions must be >= 1; --xq-weight, --relational-weight and --clean-limit >= 0")
        if self.export not in ("best", "last"):
            bad(f"--export {self.export!r}: choose best or last")
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
