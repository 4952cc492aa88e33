#!/usr/bin/env python3
"""Re-derive the calibration constants of ``dlibbridge.data.camera`` from clean aligned chips.

Prints, for the chips in CHIPS_DIR (default ../shared/data/johns, decoded by dlib):
* REFERENCE_SPECTRUM_DB — median band spectrum (noise floor removed), relative to band 0;
* SIDE_PER_CYCLE — median of side / cutoff for chips shrunk by ``augment.down_up`` to each side;
* BLUR_CYCLES — median of cutoff × sigma for chips blurred by ``augment.blur``;
* NOISE_FLOOR — median per-channel noise estimate of the clean chips (their texture);
* RESIDUAL_TABLE — median flat-region residual of the gray chips with noise, then JPEG.
The cutoffs use the reference spectrum currently in dlibbridge/data/camera.py: after changing it,
run again until the figures settle.

Usage (from the repo root):  python tools/calibrate_camera.py [CHIPS_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dlibbridge.data import augment, camera


def main() -> None:
    import dlib
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1].parent / "shared/data/johns")
    chips = [dlib.load_rgb_image(str(f)) for f in sorted(folder.rglob("*.jpg")) + sorted(folder.rglob("*.png"))]
    chips = [c for c in chips if c.shape[:2] == (camera.CHIP, camera.CHIP)]
    print(f"{len(chips)} chips from {folder}")
    spectra = [camera.band_spectrum_db(camera._luma(c), camera.noise_sigma(camera._luma(c))) for c in chips]
    ref = np.median(spectra, axis=0)
    print("REFERENCE_SPECTRUM_DB =", np.round(ref - ref[0], 1).tolist())

    def cutoffs(transform):
        out = []
        for c in chips:
            d = transform(c)
            f = camera.spectral_cutoff(camera._luma(d), camera.noise_sigma(camera._luma(d)))
            out.append(np.nan if f is None else f)
        return np.array(out)

    for side in (16, 24, 32, 48, 64, 80, 100, 120):
        f = cutoffs(lambda c: augment.down_up(c, side))
        print(f"down_up {side:3d}: side / cutoff = {side / np.nanmedian(f):.2f}  "
              f"(no cutoff in {np.isnan(f).mean():.0%})")
    for sigma in (1.0, 1.5, 2.0, 3.0):
        f = cutoffs(lambda c: augment.blur(c, sigma))
        print(f"blur {sigma:.1f}: cutoff x sigma = {np.nanmedian(f) * sigma:.1f}")
    print(f"NOISE_FLOOR = {np.median([camera.channel_noise(c) for c in chips]):.2f}")
    gray = [augment.to_grayscale(c) for c in chips]
    table = [[np.median([camera.flat_residual(camera._luma(augment.jpeg(augment.add_noise(c, s, np.random.default_rng(i)), q)))
                         for i, c in enumerate(gray)]) for s in camera.RESIDUAL_SIGMAS] for q in camera.RESIDUAL_QUALITIES]
    print("RESIDUAL_TABLE =", np.round(table, 2).tolist())


if __name__ == "__main__":
    main()
