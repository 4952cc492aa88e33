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
  Gaussian blur, down-then-up scaling (low resolution), sensor noise, exposure (brightness and
  contrast) and JPEG compression.  Each is applied with its own probability and parameter
  range; :func:`degrade` applies a fixed degradation (for evaluating a "degraded camera"
  scenario).  :mod:`dlibbridge.data.camera` draws them from a measured camera instead.

The spec strings used on the command line are parsed by :func:`parse_degradations`:
``NAME[=PROB[:LO-HI]]`` joined by commas, e.g. ``gray=0.3,lowres=0.7:24-48,jpeg=0.5:20-40``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

__all__ = ["Jitter", "Degradations", "Augment", "parse_degradations", "degrade",
           "to_grayscale", "blur", "down_up", "jpeg", "add_noise", "brightness_contrast"]


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


def down_up(chip: np.ndarray, side: int,
            at_low_res: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Shrink to ``side`` pixels (area averaging, like a small sensor) then enlarge back
    bilinearly, as an aligner would when it meets a low-resolution face.  ``at_low_res``
    (image → image), when given, is applied to the small image: what the camera does at its
    own resolution (sensor noise, JPEG) before the aligner enlarges it."""
    h, w = chip.shape[:2]
    side = int(side)
    if side >= min(h, w):
        return chip if at_low_res is None else at_low_res(chip)
    small = cv2.resize(chip, (max(1, side * w // h), side), interpolation=cv2.INTER_AREA)
    if at_low_res is not None:
        small = at_low_res(small)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(chip: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode a chip")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def add_noise(chip: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian sensor noise of ``sigma`` grey levels, the same in the three channels when the
    chip is gray (a monochrome sensor has one), independent per channel otherwise."""
    if sigma <= 0:
        return chip
    gray = bool(np.array_equal(chip[..., 0], chip[..., 1]) and np.array_equal(chip[..., 1], chip[..., 2]))
    n = rng.normal(0.0, sigma, size=chip.shape[:2] + ((1,) if gray else (chip.shape[2],)))
    return np.clip(chip + n + 0.5, 0, 255).astype(np.uint8)


def brightness_contrast(chip: np.ndarray, *, gain: float, mean_from: float, mean_to: float) -> np.ndarray:
    """Exposure change: pixel values spread around ``mean_from`` scaled by ``gain`` (contrast)
    and moved to ``mean_to`` (brightness), clipped as a sensor saturates."""
    lut = np.clip((np.arange(256) - mean_from) * gain + mean_to + 0.5, 0, 255).astype(np.uint8)
    return lut[chip]


_DEGRADATIONS = ("gray", "blur", "lowres", "jpeg", "noise", "exposure")
#: The range field of each degradation, its type and bounds (a spec's LO-HI must lie inside).
_RANGES = {"blur": ("blur_sigma", float, 0.0, 20.0), "lowres": ("lowres_side", int, 2, 150),
           "jpeg": ("jpeg_quality", int, 1, 100), "noise": ("noise_sigma", float, 0.0, 64.0),
           "exposure": ("exposure_gain", float, 0.05, 1.0)}


@dataclass(frozen=True)
class Degradations:
    """Random camera degradations, each with its own probability (0 = off).  Ranges are
    inclusive: blur sigma in pixels, low-resolution side in pixels, JPEG quality 1–100, noise
    sigma in grey levels, exposure gain (a dark, flat camera: the chip's brightness and its
    contrast around it both scaled by the gain)."""
    gray: float = 0.0
    blur: float = 0.0
    lowres: float = 0.0
    jpeg: float = 0.0
    noise: float = 0.0
    exposure: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    lowres_side: tuple[int, int] = (24, 72)
    jpeg_quality: tuple[int, int] = (15, 60)
    noise_sigma: tuple[float, float] = (2.0, 8.0)
    exposure_gain: tuple[float, float] = (0.3, 0.8)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, k) > 0 for k in _DEGRADATIONS)

    def describe(self) -> dict:
        return asdict(self)

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
        # Drawn after the original four, so specs without noise/exposure keep their results.
        u2 = rng.random(2)
        noise_sigma = rng.uniform(*self.noise_sigma)
        gain = rng.uniform(*self.exposure_gain)
        if u2[0] < self.noise:
            chip = add_noise(chip, noise_sigma, rng)
        if u2[1] < self.exposure:
            chip = brightness_contrast(chip, gain=gain, mean_from=0.0, mean_to=0.0)
        if u[3] < self.jpeg:
            chip = jpeg(chip, quality)
        return chip


def parse_degradations(spec: str | None) -> Degradations:
    """``"gray=0.3,lowres=0.7:24-48,jpeg=0.5:20-40"`` → :class:`Degradations`.  Each item is
    ``NAME[=PROB[:LO-HI]]``: a bare name means probability 0.5, a missing range keeps the
    default one; "" or None means none.  Unknown names, probabilities outside [0, 1] and ranges
    that are reversed, out of bounds or given to ``gray`` are refused with the reason."""
    if not spec:
        return Degradations()
    values: dict[str, object] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, val = item.partition("=")
        name = name.strip()
        if name not in _DEGRADATIONS:
            raise ValueError(f"unknown degradation {name!r} in {spec!r}; valid: {', '.join(_DEGRADATIONS)}")
        prob, _, rng_text = val.partition(":")
        try:
            p = float(prob) if prob.strip() else 0.5
        except ValueError:
            raise ValueError(f"degradation {name!r}: probability {prob!r} is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"degradation {name!r}: probability {p} is outside [0, 1]")
        values[name] = p
        if rng_text.strip():
            if name not in _RANGES:
                raise ValueError(f"degradation {name!r} takes no range (got {rng_text!r})")
            key, kind, lo_bound, hi_bound = _RANGES[name]
            lo_text, sep, hi_text = rng_text.partition("-")
            try:
                lo, hi = kind(lo_text), kind(hi_text if sep else lo_text)
            except ValueError:
                raise ValueError(f"degradation {name!r}: range {rng_text!r} is not LO-HI "
                                 f"({kind.__name__} values)") from None
            if not lo_bound <= lo <= hi <= hi_bound:
                raise ValueError(f"degradation {name!r}: range {rng_text!r} must satisfy "
                                 f"{lo_bound} <= LO <= HI <= {hi_bound}")
            values[key] = (lo, hi)
    return Degradations(**values)


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
    degradations: Degradations = field(default_factory=Degradations)   # or camera.CameraDegradations

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
                "degradations": self.degradations.describe()}
