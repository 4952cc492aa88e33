"""eval.metrics: verification and identification metrics on known answers and against scikit-learn."""
from __future__ import annotations


import numpy as np
import pytest

from dlibbridge.eval import metrics as mt


HAND_DIST = [0.1, 0.2, 0.3, 0.7, 0.5, 0.8, 0.9, 1.0]


HAND_SAME = [True] * 4 + [False] * 4


def test_hand_computed_example():
    d = mt.pair_distances(*embeddings_at(HAND_DIST))
    np.testing.assert_allclose(d, HAND_DIST, atol=1e-12)
    s = np.array(HAND_SAME)
    assert mt.accuracy_at(d, s, 0.6) == 6 / 8              # 0.7 rejected, 0.5 accepted
    t, acc = mt.best_threshold(d, s)
    assert acc == 7 / 8 and t == pytest.approx(0.4)         # first of the two 7/8 cuts
    assert mt.roc_auc(d, s) == 15 / 16                      # 15 of 16 (same, diff) orderings right
    eer, t_eer = mt.equal_error_rate(d, s)
    assert eer == pytest.approx(0.25) and t_eer == pytest.approx(0.5)
    r = mt.tar_at_far(d, s, 0.25)                           # one impostor of four may pass
    assert (r["tar"], r["far"], r["threshold"]) == (1.0, 0.25, pytest.approx(0.8))
    r = mt.tar_at_far(d, s, 0.1)                            # none may: threshold at the closest impostor
    assert (r["tar"], r["far"], r["threshold"], r["far_resolution"]) == (0.75, 0.0, pytest.approx(0.5), 0.25)


def test_kfold_threshold_comes_from_the_other_folds():
    # fold 0: same 0.1 0.2, diff 0.5 0.6  → its best cut 0.35 is used on fold 1
    # fold 1: same 0.3 0.55, diff 0.9 1.0 → its best cut 0.725 is used on fold 0
    d = mt.pair_distances(*embeddings_at([0.1, 0.2, 0.5, 0.6, 0.3, 0.55, 0.9, 1.0]))
    s = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kf = mt.kfold_accuracy(d, s, folds)
    assert kf["thresholds"] == [pytest.approx(0.725), pytest.approx(0.35)]
    assert kf["per_fold"] == [0.5, 0.75]                    # fold 0 accepts both impostors; fold 1 rejects 0.55
    assert kf["mean"] == 0.625 and kf["std"] == 0.125
    assert mt.kfold_decisions(d, s, folds).tolist() == [True, True, True, True, True, False, False, False]


def test_separable_embeddings_are_perfect_everywhere():
    rng = np.random.default_rng(0)
    dist = np.r_[rng.uniform(0.1, 0.5, 500), rng.uniform(0.7, 1.2, 500)]
    same = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    folds = rng.permutation(np.repeat(np.arange(10), 100))
    m = mt.verification_metrics(mt.pair_distances(*embeddings_at(dist)), same, folds)
    assert (m["accuracy"], m["accuracy_std"], m["auc"], m["eer"], m["accuracy_at_best_threshold"]) == (1, 0, 1, 0, 1)
    assert 0.5 < m["best_threshold"] < 0.7
    assert all(0.5 < t < 0.7 for t in m["folds"]["threshold"])
    assert m["tar_at_far"] == {"1e-3": 1.0, "1e-4": 1.0}


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
    dist, same = noisy_scores()
    far, tar, thr = mt.roc_curve(dist, same)
    fpr, tpr, sk_thr = roc_curve(same, -dist, drop_intermediate=False)
    np.testing.assert_array_equal(far, fpr)
    np.testing.assert_array_equal(tar, tpr)
    np.testing.assert_array_equal(thr[1:], -sk_thr[1:])
    assert mt.roc_auc(dist, same) == pytest.approx(roc_auc_score(same, -dist), abs=1e-12)
    # best threshold: exhaustive over sklearn's accuracy at every cut between distinct values
    u = np.unique(dist)
    cuts = np.r_[u[0], (u[1:] + u[:-1]) / 2, u[-1] + 1]
    best = max(accuracy_score(same, dist < c) for c in cuts)
    t, acc = mt.best_threshold(dist, same)
    assert acc == pytest.approx(best, abs=1e-12) and accuracy_score(same, dist < t) == pytest.approx(acc)
    # TAR@FAR: the highest TPR among sklearn's ROC points with FPR <= target
    for target in (1e-3, 1e-2, 0.1):
        want = tpr[fpr <= target + 1e-12].max()
        assert mt.tar_at_far(dist, same, target)["tar"] == pytest.approx(want, abs=1e-12)
    # EER: where sklearn's FPR and FNR cross, by linear interpolation between ROC points
    fnr = 1 - tpr
    i = np.flatnonzero(fpr >= fnr)[0]
    a = (fnr[i - 1] - fpr[i - 1]) / ((fpr[i] - fpr[i - 1]) - (fnr[i] - fnr[i - 1]))
    assert mt.equal_error_rate(dist, same)[0] == pytest.approx(fpr[i - 1] + a * (fpr[i] - fpr[i - 1]), abs=1e-12)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="equal length"):
        mt.accuracy_at([0.1, 0.2], [True], 0.6)
    with pytest.raises(ValueError, match="finite"):
        mt.best_threshold([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="both same and different"):
        mt.roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="2 folds"):
        mt.kfold_accuracy([0.1, 0.2], [True, False], [0, 0])
    assert mt.far_key(1e-3) == "1e-3" and mt.far_key(1e-4) == "1e-4" and mt.far_key(5e-4) == "5e-4"


def test_rank1_known_answer_whatever_the_gallery_draw():
    # A and B are tight pairs; C's two images lie far apart, nearer to A/B than to each
    # other, so C's probe misses whichever of its images is the gallery: 2 of 3 probes hit.
    x = np.zeros((6, 128))
    x[:, 0] = [0.0, 0.01, 10.0, 10.01, 20.0, 5.0]
    labels = ["A", "A", "B", "B", "C", "C"]
    for seed in range(5):
        r = mt.rank1_identification(x, labels, seed=seed)
        assert r == {"rank1": 2 / 3, "n_probes": 3, "n_gallery": 3}


def test_clustering_with_dlib_chinese_whispers():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 128)) * 3                 # far apart (distances ~40)
    x = np.concatenate([c + rng.normal(scale=0.01, size=(k, 128)) for c, k in zip(centers, (4, 5, 6))])
    labels = ["a"] * 4 + ["b"] * 5 + ["c"] * 6
    m = mt.clustering_metrics(x, labels)
    assert (m["purity"], m["n_clusters"], m["n_identities"], m["adjusted_rand_index"]) == (1.0, 3, 3, 1.0)
    # a and b on top of each other become one cluster, counted as b (5 of its 9): purity (5 + 6) / 15
    x2 = x.copy()
    x2[4:9] = centers[0] + rng.normal(scale=0.01, size=(5, 128))
    m = mt.clustering_metrics(x2, labels)
    assert (m["purity"], m["n_clusters"]) == (11 / 15, 2)


def embeddings_at(distances) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 128-d embedding pairs whose Euclidean distances are exactly ``distances``
    (each pair along its own random axis, so the test goes through pair_distances)."""
    d = np.asarray(distances, np.float64)
    rng = np.random.default_rng(7)
    axis = rng.integers(0, 128, len(d))
    a = rng.normal(size=(len(d), 128))
    b = a.copy()
    b[np.arange(len(d)), axis] += d
    return a, b


def noisy_scores(n=3000, seed=0, decimals=2):
    """Overlapping same/different distance populations with many ties (rounded)."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.normal(0.45, 0.12, n), rng.normal(0.8, 0.12, n))
    return np.round(np.abs(dist), decimals), same


def _brute_tar(pos, neg, far):
    """TAR at the loosest threshold among the impostor distances that accepts <= far of them."""
    best = 0.0
    for t in sorted(set(neg)) + [np.inf]:
        if np.mean(np.array(neg) < t) <= far:
            best = max(best, float(np.mean(np.array(pos) < t)))
    return best


def test_cross_verification_matches_a_loop_over_pairs():
    g = np.random.default_rng(3)
    enrol, probe = g.normal(size=(9, 4)), g.normal(size=(12, 4))
    el, pl = np.repeat(np.arange(3), 3), np.repeat(np.arange(4), 3) % 3
    es, ps = np.arange(9), np.r_[np.arange(9), 20, 21, 22]      # probe i < 9 is enrolled photo i seen by a camera
    r = mt.cross_verification(enrol, el, probe, pl, es, ps, far_targets=(0.1, 0.3))
    pairs = [(np.linalg.norm(enrol[i] - probe[j]), el[i] == pl[j]) for i in range(9) for j in range(12) if es[i] != ps[j]]
    dist = np.array([p[0] for p in pairs])
    same = np.array([p[1] for p in pairs])
    assert r["n_pairs"] == 9 * 12 - 9 and r["n_same"] == same.sum()
    assert r["accuracy_at_0.6"] == pytest.approx(np.mean((dist < 0.6) == same))
    assert r["accuracy_at_best_threshold"] == pytest.approx(max(np.mean((dist < t) == same) for t in np.r_[dist, np.inf]))
    for f, key in ((0.1, "1e-1"), (0.3, "3e-1")):
        assert r["tar_at_far"][key] == pytest.approx(_brute_tar(dist[same], dist[~same], f))
    assert mt.cross_verification(enrol, el, probe, pl)["n_pairs"] == 9 * 12


def test_gallery_identification_matches_a_loop_over_probes():
    g = np.random.default_rng(4)
    gallery, gl = g.normal(size=(5, 3)), np.arange(5)
    probe, pl = g.normal(size=(40, 3)), g.integers(0, 5, 40)
    probe[:20] = gallery[pl[:20]] + g.normal(0, 0.2, (20, 3))    # half near their own entry
    r = mt.gallery_identification(gallery, gl, probe, pl, fpir=0.1)
    d = np.linalg.norm(probe[:, None] - gallery[None], axis=2)
    mated = d[np.arange(40), pl]
    other = np.array([min(d[i, j] for j in range(5) if j != pl[i]) for i in range(40)])
    hit = mated < other
    assert r["rank1"] == pytest.approx(hit.mean()) and r["n_probes"] == 40
    best = 0.0
    for t in sorted(set(other)) + [np.inf]:
        if np.mean(other < t) <= 0.1:
            best = max(best, float(np.mean(hit & (mated < t))))
    assert r["tpir"] == pytest.approx(best) and r["fpir"] <= 0.1
    assert 0 < r["tpir"] <= r["rank1"] < 1
    with pytest.raises(ValueError, match="gallery"):
        mt.gallery_identification(gallery[:2], gl[:2], probe, pl)


def test_one_per_person_picks_one_image_of_each():
    labels = np.array([3, 3, 1, 1, 1, 7])
    idx = mt.one_per_person(labels, seed=2)
    assert labels[idx].tolist() == [3, 1, 7]
    assert np.array_equal(idx, mt.one_per_person(labels, seed=2))
