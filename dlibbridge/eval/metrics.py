"""Verification and identification metrics on descriptors, as the literature reports them.

Verification works on pair distances (Euclidean on the raw 128-d descriptors, as dlib
compares them; "same person" means ``distance < threshold``, dlib's convention):

* LFW's 10-fold accuracy, the threshold chosen on the other nine folds (mean ± std);
* accuracy at dlib's fixed 0.6 threshold, and at the best threshold;
* ROC, its AUC, the equal error rate and its threshold;
* TAR at a fixed FAR (FaceNet's VAL@FAR), what deployments are tuned for.

Identification works on labelled descriptors: rank-1 accuracy on a gallery/probe split, and
dlib's chinese-whispers clustering (its face-clustering example) scored against the truth.

Everything takes plain arrays, so fine-tuning validates with the same code.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DLIB_THRESHOLD = 0.6          # dlib's documented same/different threshold
FAR_TARGETS = (1e-3, 1e-4)    # FaceNet's VAL@FAR operating points


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Euclidean distance per row, in float64 so that summation order cannot move a pair
    across a threshold between two engines whose descriptors agree to float precision."""
    d = np.asarray(emb1, np.float64) - np.asarray(emb2, np.float64)
    return np.sqrt(np.einsum("ij,ij->i", d, d))


def _check(dist, same):
    dist = np.asarray(dist, np.float64)
    same = np.asarray(same, bool)
    if dist.ndim != 1 or dist.shape != same.shape:
        raise ValueError("distances and labels must be 1-d arrays of equal length")
    if not np.all(np.isfinite(dist)):
        raise ValueError("distances must be finite")
    return dist, same


def accuracy_at(dist, same, threshold: float) -> float:
    """Fraction of pairs decided correctly by ``same iff distance < threshold``."""
    dist, same = _check(dist, same)
    return float(np.mean((dist < threshold) == same)) if len(dist) else float("nan")


def best_threshold(dist, same) -> tuple[float, float]:
    """The threshold with the highest accuracy on these pairs, and that accuracy.

    Exhaustive over every distinct cut (not a grid): cut k accepts the k smallest
    distances; its threshold is the midpoint to the next distinct distance.  Ties in
    accuracy go to the smallest threshold, so the choice is deterministic."""
    dist, same = _check(dist, same)
    n = len(dist)
    if n == 0:
        raise ValueError("no pairs")
    order = np.argsort(dist, kind="stable")
    d, s = dist[order], same[order]
    # correct(k) = same pairs among the first k + different pairs after them
    cum_same = np.concatenate([[0], np.cumsum(s)])
    cum_diff = np.concatenate([[0], np.cumsum(~s)])
    correct = cum_same + (cum_diff[-1] - cum_diff)
    valid = np.ones(n + 1, bool)
    valid[1:n] = d[1:] > d[:-1]            # cannot cut between equal distances
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        t = float(d[0])                    # accepts nothing (strict <)
    elif k == n:
        t = float(np.nextafter(d[-1], np.inf))
    else:
        t = float((d[k - 1] + d[k]) / 2)
        if not d[k - 1] < t:               # adjacent floats: keep the cut exact
            t = float(d[k])
    return t, float(correct[k] / n)


def kfold_accuracy(dist, same, folds) -> dict:
    """LFW's protocol: for each fold, pick the best threshold on the other folds and
    measure accuracy on this one.  std is the population std over folds (numpy's default,
    as FaceNet's LFW evaluation reports it)."""
    dist, same = _check(dist, same)
    folds = np.asarray(folds)
    ids = np.unique(folds)
    if len(ids) < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    accs, thresholds = [], []
    for k in ids:
        test = folds == k
        t, _ = best_threshold(dist[~test], same[~test])
        thresholds.append(t)
        accs.append(accuracy_at(dist[test], same[test], t))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "per_fold": [float(a) for a in accs], "thresholds": [float(t) for t in thresholds]}


def kfold_decisions(dist, same, folds) -> np.ndarray:
    """Each pair's same/different decision under the k-fold protocol (its own fold's
    threshold), for listing the errors that make up the reported accuracy."""
    dist, same = _check(dist, same)
    folds = np.asarray(folds)
    out = np.zeros(len(dist), bool)
    for k in np.unique(folds):
        test = folds == k
        t, _ = best_threshold(dist[~test], same[~test])
        out[test] = dist[test] < t
    return out


def roc_curve(dist, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, threshold) at every distinct distance, deciding ``same iff d <= t``;
    the first point (-inf) accepts nothing: scikit-learn's ROC of the scores ``-dist``
    (``drop_intermediate=False``) with the thresholds turned back into distances."""
    from sklearn.metrics import roc_curve as sk_roc_curve
    dist, same = _check_both(dist, same, "ROC")
    far, tar, thr = sk_roc_curve(same, -dist, drop_intermediate=False)
    return far, tar, np.r_[-np.inf, -thr[1:]]


def roc_auc(dist, same) -> float:
    """Area under the ROC: the probability that a random same pair is closer than a
    random different pair, ties counting one half (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score
    dist, same = _check_both(dist, same, "ROC")
    return float(roc_auc_score(same, -dist))


def _check_both(dist, same, what: str) -> tuple[np.ndarray, np.ndarray]:
    dist, same = _check(dist, same)
    if same.all() or not same.any():
        raise ValueError(f"{what} needs both same and different pairs")
    return dist, same


def equal_error_rate(dist, same) -> tuple[float, float]:
    """(EER, threshold) where FAR = FRR, linearly interpolated between the two ROC points
    that bracket the crossing (the threshold likewise)."""
    far, tar, thr = roc_curve(dist, same)
    frr = 1.0 - tar
    i = int(np.argmax(far >= frr))         # first point where FAR has caught up (never 0: FRR(−inf) = 1)
    df, dr = far[i] - far[i - 1], frr[i] - frr[i - 1]
    a = (frr[i - 1] - far[i - 1]) / (df - dr) if df != dr else 0.0
    eer = far[i - 1] + a * df
    t0 = thr[i - 1] if np.isfinite(thr[i - 1]) else thr[i]
    return float(eer), float(t0 + a * (thr[i] - t0))


def tar_at_far(dist, same, far: float) -> dict:
    """TAR at the loosest threshold whose FAR does not exceed ``far`` (FaceNet's VAL@FAR).

    The threshold is the (k+1)-th smallest different-pair distance, k = floor(far * #diff),
    with ``same iff d < t``: exactly at most k impostors are accepted.  When far * #diff < 1
    the answer is TAR at FAR = 0; ``far_resolution`` (1/#diff) says how fine FAR can be
    measured with this many pairs."""
    dist, same = _check(dist, same)
    neg = np.sort(dist[~same])
    pos = dist[same]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs both same and different pairs")
    k = int(math.floor(far * len(neg) + 1e-9))
    t = float(neg[k]) if k < len(neg) else float("inf")
    return {"tar": float(np.mean(pos < t)), "threshold": t, "far": float(np.mean(neg < t)),
            "far_resolution": 1.0 / len(neg)}


def verification_metrics(dist, same, folds=None, far_targets: Sequence[float] = FAR_TARGETS) -> dict:
    """Every verification number of results.json for one model (schema: docs/evaluation.md)."""
    dist, same = _check(dist, same)
    t_best, acc_best = best_threshold(dist, same)
    eer, t_eer = equal_error_rate(dist, same)
    out = {
        "n_pairs": int(len(dist)), "n_same": int(same.sum()), "n_different": int((~same).sum()),
        "accuracy": None, "accuracy_std": None, "folds": None,
        "accuracy_at_0.6": accuracy_at(dist, same, DLIB_THRESHOLD),
        "auc": roc_auc(dist, same),
        "eer": eer, "eer_threshold": t_eer,
        "best_threshold": t_best, "accuracy_at_best_threshold": acc_best,
        "tar_at_far": {}, "tar_at_far_details": {},
    }
    if folds is not None and len(np.unique(folds)) >= 2:
        kf = kfold_accuracy(dist, same, folds)
        out.update(accuracy=kf["mean"], accuracy_std=kf["std"],
                   folds={"accuracy": kf["per_fold"], "threshold": kf["thresholds"]})
    for f in far_targets:
        key = far_key(f)
        r = tar_at_far(dist, same, f)
        out["tar_at_far"][key] = r["tar"]
        out["tar_at_far_details"][key] = r
    return out


def far_key(f: float) -> str:
    """'1e-3' for 0.001: the key style results.json uses."""
    m, e = f"{f:e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


# ============================================================================ identification

def _nearest(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Index of the nearest row of ``ref`` for each query row (squared Euclidean)."""
    q, r = np.asarray(query, np.float64), np.asarray(ref, np.float64)
    rn = np.einsum("ij,ij->i", r, r)
    out = np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        qq = q[s:s + chunk]
        d2 = np.einsum("ij,ij->i", qq, qq)[:, None] + rn[None, :] - 2 * qq @ r.T
        out[s:s + chunk] = np.argmin(d2, axis=1)
    return out


def rank1_identification(emb: np.ndarray, labels: Sequence, seed: int = 0) -> dict:
    """Closed-set identification: one random image per person forms the gallery (people
    with a single image join it as distractors), every other image is a probe; rank-1
    accuracy is the fraction of probes whose nearest gallery image is the same person."""
    labels = np.asarray(labels)
    if len(emb) != len(labels):
        raise ValueError("embeddings and labels differ in length")
    rng = np.random.default_rng(seed)
    gallery = np.zeros(len(labels), bool)
    for name in np.unique(labels):
        idx = np.flatnonzero(labels == name)
        gallery[idx[rng.integers(len(idx))]] = True
    probes = ~gallery
    if not probes.any():
        return {"rank1": None, "n_probes": 0, "n_gallery": int(gallery.sum())}
    nn = _nearest(emb[probes], emb[gallery])
    hit = labels[gallery][nn] == labels[probes]
    return {"rank1": float(hit.mean()), "n_probes": int(probes.sum()), "n_gallery": int(gallery.sum())}


def clustering_metrics(emb: np.ndarray, labels: Sequence, threshold: float = DLIB_THRESHOLD) -> dict:
    """Cluster with dlib's ``chinese_whispers_clustering`` (what dlib's face clustering
    example does) and compare with the true identities: purity (each cluster counted by
    its majority person), number of clusters vs identities, and the adjusted Rand index."""
    import dlib
    from sklearn.metrics import adjusted_rand_score
    labels = np.asarray(labels)
    if len(emb) == 0:
        raise ValueError("no embeddings to cluster")
    vecs = [dlib.vector(np.asarray(e, np.float64).tolist()) for e in emb]
    clusters = np.asarray(dlib.chinese_whispers_clustering(vecs, float(threshold)))
    majority = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        majority += int(counts.max())
    return {"purity": majority / len(labels), "n_clusters": int(len(np.unique(clusters))),
            "n_identities": int(len(np.unique(labels))), "adjusted_rand_index": float(adjusted_rand_score(labels, clusters)),
            "threshold": float(threshold), "n_images": int(len(labels))}


# ============================================================================ enrolled photo vs probe

FPIR_TARGET = 1e-2            # open-set identification's operating point (NIST FRVT's TPIR@FPIR)


def _distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances, rows of ``a`` × rows of ``b``, in float64 (see :func:`pair_distances`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def cross_verification(enrol: np.ndarray, enrol_labels, probe: np.ndarray, probe_labels,
                       enrol_sources=None, probe_sources=None,
                       far_targets: Sequence[float] = FAR_TARGETS) -> dict:
    """Verification as deployed: every (enrolled photo, probe) pair, e.g. a clean enrolment
    photo against a camera's picture — not two pictures of one camera.  A pair whose two
    images come from the same source photo (``*_sources``, equal ids; the same photo through
    two cameras) is left out: it is easier than any real pair.  TAR at each FAR, accuracy at
    dlib's 0.6 and at the best threshold."""
    d = _distance_matrix(enrol, probe)
    same = np.asarray(enrol_labels)[:, None] == np.asarray(probe_labels)[None, :]
    keep = np.ones(d.shape, bool)
    if enrol_sources is not None:
        keep = np.asarray(enrol_sources)[:, None] != np.asarray(probe_sources)[None, :]
    dist, same = d[keep], same[keep]
    t, acc = best_threshold(dist, same)
    return {"n_pairs": int(len(dist)), "n_same": int(same.sum()), "n_different": int((~same).sum()),
            "accuracy_at_0.6": accuracy_at(dist, same, DLIB_THRESHOLD), "best_threshold": t,
            "accuracy_at_best_threshold": acc,
            "tar_at_far": {far_key(f): tar_at_far(dist, same, f)["tar"] for f in far_targets}}


def gallery_identification(gallery: np.ndarray, gallery_labels, probe: np.ndarray, probe_labels,
                           fpir: float = FPIR_TARGET) -> dict:
    """Identification against a gallery of enrolled people (e.g. one clean photo each).

    * ``rank1``: fraction of probes whose nearest gallery entry is their own person (closed set;
      every probe's person must be enrolled);
    * ``tpir``: open set at FPIR = ``fpir``.  Each probe is also used as a non-mated search by
      leaving its own person out of the gallery (its score: distance to the nearest other
      person), so no people need be set aside as strangers.  The threshold accepts at most
      floor(fpir × probes) non-mated searches (``d < t``, as :func:`tar_at_far`); TPIR is the
      fraction of probes whose nearest entry is their own person *and* closer than it."""
    g_lab, p_lab = np.asarray(gallery_labels), np.asarray(probe_labels)
    if not np.isin(p_lab, g_lab).all():
        raise ValueError("every probe's person must be in the gallery")
    if len(np.unique(g_lab)) < 2:
        raise ValueError("identification needs at least 2 people in the gallery")
    d = _distance_matrix(probe, gallery)
    mate = p_lab[:, None] == g_lab[None, :]
    mated = np.where(mate, d, np.inf).min(1)
    non_mated = np.where(mate, np.inf, d).min(1)
    hit = mated < non_mated
    k = int(math.floor(fpir * len(non_mated) + 1e-9))
    t = float(np.sort(non_mated)[k]) if k < len(non_mated) else float("inf")
    return {"rank1": float(hit.mean()), "tpir": float(np.mean(hit & (mated < t))), "fpir": float(np.mean(non_mated < t)),
            "fpir_target": fpir, "threshold": t, "n_probes": int(len(p_lab)), "n_gallery": int(len(g_lab))}


def one_per_person(labels, seed: int = 0) -> np.ndarray:
    """Index of one seeded pick per person (in order of first appearance): an enrolment gallery."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    _, first = np.unique(labels, return_index=True)
    return np.array([rng.choice(np.flatnonzero(labels == labels[i])) for i in np.sort(first)], np.int64)
