"""Image augmentation for fine-tuning on aligned 150×150 face chips.

Two families, both operating on one uint8 RGB chip ``(H, W, 3)`` with an explicit
``numpy.random.Generator`` (so a sample's augmentation depends only on its seed, never on which
worker or process drew it — that is what makes runs reproducible and resumable):

* **jitter** — what dlib's metric-learning example does to every training crop: a small random
  similarity transform of the chip (rotation ±3°, object scale 0.97–1.0, shift ±2 %, like dlib's
  ``jitter_image``), a left-right flip half of the time, and a colour disturbance (random gamma
  and per-channel gain, in the spirit of dlib's ``disturb_colors``).  The transform stays small
  because the network was trained on dlib-aligned chips: large crops would teach it a different
  alignment than the one used at inference.
* **degradations** — for cameras worse than the web photos dlib was trained on: grayscale,
  Gaussian blur, down-then-up scaling (low resolution) and JPEG compression.  Each is applied
  with its own probability; :func:`degrade` applies a fixed degradation (for evaluating a
  "degraded camera" scenario).

The spec strings used on the command line (``--degrade gray=0.3,blur=0.2,lowres=0.3,jpeg=0.3``)
are parsed by :func:`parse_degradations`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

__all__ = ["Jitter", "Degradations", "Augment", "parse_degradations", "degrade",
           "to_grayscale", "blur", "down_up", "jpeg"]


# ------------------------------------------------------------------------------------------
# Geometric + colour jitter (dlib example style)
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Jitter:
    """Parameters of the per-crop jitter.  Defaults follow dlib's ``jitter_image`` (3°, object
    height 0.97–1.0 of the crop, ±2 % translation, 50 % flip) and apply it, as dlib's example
    does, to 90 % of the crops."""
    prob: float = 0.9
    max_rotation_deg: float = 3.0
    min_scale: float = 0.97
    max_scale: float = 1.0
    max_translate: float = 0.02
    flip_prob: float = 0.5
    # Colour strength matched to dlib's disturb_colors: on the johns the median mean-|Δpixel| of
    # jitter + colour is 19.9 here vs 18.6 for dlib.jitter_image(..., disturb_colors=True), and
    # 12.3 vs 12.7 for the geometry alone (tests/test_augment.py).
    gamma_sigma: float = 0.25        # log-gamma std; 0 disables the gamma change
    gain_range: float = 0.2          # per-channel gain in [1 - r, 1 + r]

    def geometric(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = chip.shape[:2]
        # dlib crops a square around the chip centre whose side is (chip side − 6)/scale,
        # shifted by a fraction of the side, rotated, and resamples it to the chip size.
        side = (min(h, w) - 6) / rng.uniform(self.min_scale, self.max_scale)
        tx, ty = rng.uniform(-self.max_translate, self.max_translate, size=2) * (min(h, w) - 6)
        angle = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)
        zoom = min(h, w) / side                   # crop side → output side
        m = cv2.getRotationMatrix2D(((w - 1) / 2 + tx, (h - 1) / 2 + ty), angle, zoom)
        # getRotationMatrix2D keeps the rotation centre fixed; move it to the output centre.
        m[0, 2] += (w - 1) / 2 - ((w - 1) / 2 + tx)
        m[1, 2] += (h - 1) / 2 - ((h - 1) / 2 + ty)
        out = cv2.warpAffine(chip, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < self.flip_prob:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def colour(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        gamma = math.exp(rng.normal() * self.gamma_sigma) if self.gamma_sigma > 0 else 1.0
        gains = rng.uniform(1 - self.gain_range, 1 + self.gain_range, size=3)
        gains /= gains.mean()                     # colour cast without a brightness change
        levels = np.arange(256, dtype=np.float64) / 255.0
        luts = [np.clip(255.0 * g * levels ** gamma + 0.5, 0, 255).astype(np.uint8) for g in gains]
        out = np.empty_like(chip)
        for c in range(3):
            out[..., c] = cv2.LUT(chip[..., c], luts[c])
        return out

    def __call__(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Colour first, every time (dlib disturbs colours of all crops), then geometry 90 %.
        out = self.colour(chip, rng)
        if rng.random() < self.prob:
            out = self.geometric(out, rng)
        return out


# ------------------------------------------------------------------------------------------
# Degradations
# ------------------------------------------------------------------------------------------

def to_grayscale(chip: np.ndarray) -> np.ndarray:
    """Luma replicated into three channels (the network still takes RGB)."""
    g = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


def blur(chip: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(chip, (0, 0), sigmaX=float(sigma)) if sigma > 0 else chip


def down_up(chip: np.ndarray, side: int) -> np.ndarray:
    """Shrink to ``side`` pixels (area averaging, like a small sensor) then enlarge back
    bilinearly, as an aligner would when it meets a low-resolution face."""
    h, w = chip.shape[:2]
    side = int(side)
    if side >= min(h, w):
        return chip
    small = cv2.resize(chip, (max(1, side * w // h), side), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(chip: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode a chip")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


_DEGRADATIONS = ("gray", "blur", "lowres", "jpeg")


@dataclass(frozen=True)
class Degradations:
    """Random camera degradations, each with its own probability (0 = off).  Ranges are
    inclusive: blur sigma in pixels, low-resolution side in pixels, JPEG quality 1–100."""
    gray: float = 0.0
    blur: float = 0.0
    lowres: float = 0.0
    jpeg: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    lowres_side: tuple[int, int] = (24, 72)
    jpeg_quality: tuple[int, int] = (15, 60)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, k) > 0 for k in _DEGRADATIONS)

    def __call__(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Draw every random number unconditionally so that enabling one degradation does not
        # change the draws (and thus the results) of the others.
        u = rng.random(4)
        sigma = rng.uniform(*self.blur_sigma)
        side = int(rng.integers(self.lowres_side[0], self.lowres_side[1] + 1))
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        if u[0] < self.gray:
            chip = to_grayscale(chip)
        if u[1] < self.blur:
            chip = blur(chip, sigma)
        if u[2] < self.lowres:
            chip = down_up(chip, side)
        if u[3] < self.jpeg:
            chip = jpeg(chip, quality)
        return chip


def parse_degradations(spec: str | None) -> Degradations:
    """``"gray=0.3,blur=0.2,lowres=0.5,jpeg=0.3"`` → :class:`Degradations` (a bare name means
    probability 0.5; "" or None means none).  Unknown names and probabilities outside [0, 1]
    are refused with the list of valid names."""
    if not spec:
        return Degradations()
    probs: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, val = item.partition("=")
        name = name.strip()
        if name not in _DEGRADATIONS:
            raise ValueError(f"unknown degradation {name!r} in {spec!r}; valid: {', '.join(_DEGRADATIONS)}")
        try:
            p = float(val) if val else 0.5
        except ValueError:
            raise ValueError(f"degradation {name!r}: probability {val!r} is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"degradation {name!r}: probability {p} is outside [0, 1]")
        probs[name] = p
    return Degradations(**probs)


def degrade(chip: np.ndarray, *, gray: bool = False, blur_sigma: float = 0.0,
            lowres_side: int | None = None, jpeg_quality: int | None = None) -> np.ndarray:
    """A fixed, deterministic degradation (same order as the random one) — e.g. the benchmark's
    "grayscale + low resolution" camera."""
    if gray:
        chip = to_grayscale(chip)
    chip = blur(chip, blur_sigma)
    if lowres_side:
        chip = down_up(chip, lowres_side)
    if jpeg_quality:
        chip = jpeg(chip, jpeg_quality)
    return chip


# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """The full training-time transform: jitter (optional) then degradations (optional).
    Picklable, so it can run inside DataLoader workers."""
    jitter: Jitter | None = field(default_factory=Jitter)
    degradations: Degradations = field(default_factory=Degradations)

    def __call__(self, chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if chip.dtype != np.uint8 or chip.ndim != 3 or chip.shape[2] != 3:
            raise ValueError(f"augmentation expects a uint8 RGB chip (H, W, 3), got {chip.dtype} {chip.shape}")
        if self.jitter is not None:
            chip = self.jitter(chip, rng)
        if self.degradations.enabled:
            chip = self.degradations(chip, rng)
        return chip

    def describe(self) -> dict:
        """Plain data for the run's resolved config."""
        return {"jitter": None if self.jitter is None else asdict(self.jitter),
                "degradations": asdict(self.degradations)}
