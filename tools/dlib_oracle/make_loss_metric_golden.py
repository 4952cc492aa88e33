"""Write tests/data/loss_metric_golden.npz: loss value and gradient of dlib's own C++
``loss_metric_::compute_loss_value_and_gradient`` (via dlib_oracle) on seeded cases.

Why a committed golden file: the loss port's test (tests/test_train_losses.py) must check against
dlib's C++ without building the oracle in every run.  Re-run this script to regenerate it
(deterministic: fixed seeds, dlib's CPU code); the test suite also re-derives a few cases
live from the oracle (tests/test_oracle.py) so the file cannot silently go stale.

Layout: for case ``cNN``: ``cNN_embeddings`` (N×K float32), ``cNN_labels`` (N int64),
``cNN_margin``/``cNN_dist_thresh`` (float32 scalars as dlib stores them), ``cNN_loss``
(float64, dlib's return value), ``cNN_gradient`` (N×K float32, what dlib writes into the
subnetwork's gradient), ``cNN_name`` (a description).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver import DlibOracle  # noqa: E402

OUT = HERE.parents[1] / "tests" / "data" / "loss_metric_golden.npz"


def _clustered(rng, labels, k, spread, scale):
    """Class centres at ``scale`` apart (roughly), samples ``spread`` around them: distances
    straddle dist_thresh ± margin so every branch of the loss is active."""
    labels = np.asarray(labels)
    centres = {c: rng.normal(size=k) * scale / np.sqrt(2 * k) for c in np.unique(labels)}
    x = np.stack([centres[c] + rng.normal(size=k) * spread / np.sqrt(2 * k) for c in labels])
    return x.astype(np.float32)


def cases():
    rng = np.random.default_rng(20240604)
    out = []

    def add(name, x, labels, margin=0.04, thresh=0.6):
        out.append((name, np.asarray(x, np.float32), np.asarray(labels, np.int64), margin, thresh))

    add("12 samples, 4 classes, K=5, spread ~ threshold", _clustered(rng, np.repeat(range(4), 3), 5, 0.6, 0.7),
        np.repeat(range(4), 3))
    add("dlib example batch 5x5, K=128", _clustered(rng, np.repeat(range(5), 5), 128, 0.6, 0.25),
        np.repeat(range(5), 5))
    add("35 ids x 3 (larger batch), K=128", _clustered(rng, np.repeat(range(35), 3), 128, 0.58, 0.2),
        np.repeat(range(35), 3))
    lab = np.array([7, 42, 7, 42, 3, 3, 42, 7])
    add("non-contiguous labels, shuffled order", _clustered(rng, lab, 16, 0.6, 0.65), lab)
    lab = np.array([0] * 7 + [1])
    add("more positive than negative pairs (neg_thresh index capped)", _clustered(rng, lab, 8, 0.7, 0.6), lab)
    lab = np.repeat(range(3), 4)
    add("well separated: loss 0, gradient 0", _clustered(rng, lab, 8, 0.05, 20.0), lab)
    x = _clustered(rng, np.repeat(range(3), 3), 6, 0.5, 0.5)
    x[3] = x[0]                      # a negative pair at distance 0 (gradient clamp 0.001)
    add("identical embeddings with different labels (D=0 negative)", x, np.repeat(range(3), 3))
    x = _clustered(rng, np.repeat(range(2), 3), 4, 0.3, 0.6)
    x[1] = x[0]                      # a positive pair at distance 0 (inactive)
    add("identical embeddings with the same label (D=0 positive)", x, np.repeat(range(2), 3))
    add("old loss_metric_ defaults margin 0.1, threshold 0.75", _clustered(rng, np.repeat(range(4), 4), 32, 0.8, 0.9),
        np.repeat(range(4), 4), 0.1, 0.75)
    add("K=1 (scalar embeddings)", rng.normal(size=(10, 1)) * 0.5, np.repeat(range(5), 2))
    g = np.repeat(np.eye(4, dtype=np.float32) * 0.45, 2, axis=0)
    add("ties: equal negative distances at the hard-negative threshold", g, np.repeat(range(4), 2))
    add("all zero embeddings", np.zeros((6, 4)), np.repeat(range(3), 2))
    return out


def main() -> None:
    oracle = DlibOracle()
    arrays = {}
    for i, (name, x, labels, margin, thresh) in enumerate(cases()):
        loss, grad = oracle.loss_metric(x, labels, margin, thresh)
        p = f"c{i:02d}_"
        arrays.update({p + "embeddings": x, p + "labels": labels, p + "margin": np.float32(margin),
                       p + "dist_thresh": np.float32(thresh), p + "loss": np.float64(loss),
                       p + "gradient": grad, p + "name": np.str_(name)})
        print(f"{p[:-1]}  loss {loss:.9g}  |grad| {np.abs(grad).sum():.6g}  {name}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
