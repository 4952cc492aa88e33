"""``dlibbridge finetune-detector``'s settings, torch-free so the command line can list them
without loading torch (the training is :mod:`dlibbridge.train.detector`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DlibbridgeError
from ..options import option


class DetectorConfigError(DlibbridgeError, ValueError):
    """Settings of ``finetune-detector`` out of range."""


@dataclass(frozen=True)
class DetectorFinetune:
    """What to fine-tune dlib's CNN face detector on, and how."""
    photos_dir: str = option(help="clean photos of the kind the camera will see (any layout, no labels)",
                             positional=True, metavar="PHOTOS_DIR")
    camera: str = option(help="the camera's profile (dlibbridge camera on its photos), with its detection setting",
                         metavar="CAMERA_JSON", required=True)
    out: str = option(help="detector to write (DET.json, the report, goes beside it)", flags=("-o", "--out"),
                      metavar="DET.dat", required=True)
    base: str | None = option(None, "detector to start from (default dlib's mmod_human_face_detector)",
                              metavar="DET.dat")
    steps: int = option(300, "SGD steps", metavar="N")
    batch_size: int = option(4, "camera views per step", metavar="N")
    lr: float = option(0.01, "learning rate (SGD, momentum 0.9) of the folded convolutions")
    crop: int = option(160, "side of the square crops around a face the loss is computed on, in the "
                       "upsampled camera view", metavar="PX")
    holdout: int = option(20, "photos (the last ones) never trained on: the report's unseen photos", metavar="N")
    max_photos: int | None = option(None, "use N photos spread over the folder (default all)", type=int, metavar="N")
    seed: int = option(0, "random seed of the views and crops")

    def __post_init__(self):
        for name in ("steps", "batch_size", "holdout"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise DetectorConfigError(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        if not self.lr > 0:
            raise DetectorConfigError(f"lr must be positive, not {self.lr!r}")
        if not (isinstance(self.crop, int) and self.crop >= 80):
            raise DetectorConfigError(f"crop must be at least 80 pixels (the detector's window), not {self.crop!r}")
        if self.max_photos is not None and self.max_photos <= self.holdout:
            raise DetectorConfigError(f"max_photos must exceed holdout ({self.holdout})")
