"""Evaluation: pairs files, metrics with known answers (cross-checked against scikit-learn),
identification, engines, the cache, the report, and the end-to-end proof that dlib's own
package and the torch port give the same numbers on aligned celeba-dev photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dlibbridge import evaluate as ev
from dlibbridge import metrics as mt
from dlibbridge import pairs as pr


# ---------------------------------------------------------------------------- helpers

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


# ---------------------------------------------------------------------------- pairs files

LFW_SAMPLE = (
    "2\t2\n"
    "Abel_Pacheco\t1\t4\n"
    "Akhmed_Zakayev\t1\t3\n"
    "Abdel_Madi_Shabneh\t1\tDean_Barker\t1\n"
    "Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1\n"
    "Zico\t1\t2\n"
    "Zico\t2\t3\n"
    "Zulfiqar_Ahmed\t1\tZoe_Ball\t1\n"
    "Zumrati_Juma\t1\tZach_Pillar\t1\n"
)


def test_lfw_pairs_round_trip_byte_identical():
    ps = pr.parse_pairs(LFW_SAMPLE)
    assert (ps.n_folds, ps.per_fold) == (2, 2)
    first = ps.folds[0]
    assert first[0] == pr.Pair("Abel_Pacheco", 1, "Abel_Pacheco", 4) and first[0].same
    assert first[2] == pr.Pair("Abdel_Madi_Shabneh", 1, "Dean_Barker", 1) and not first[2].same
    assert pr.format_pairs(ps) == LFW_SAMPLE
    assert ps.fold_ids().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_view1_single_number_header_round_trips(tmp_path):
    text = "2\nA\t1\t2\nB\t1\t3\nA\t1\tB\t2\nC\t1\tA\t2\n"
    ps = pr.parse_pairs(text)
    assert (ps.n_folds, ps.per_fold) == (1, 2)
    pr.write_pairs(ps, tmp_path / "p.txt")
    assert (tmp_path / "p.txt").read_text() == text
    assert pr.read_pairs(tmp_path / "p.txt").pairs() == ps.pairs()


def test_view2_header_of_the_real_protocol_parses():
    lines = ["10\t300"]
    for f in range(10):
        lines += [f"P{f}_{i}\t1\t2" for i in range(300)]
        lines += [f"P{f}_{i}\t1\tQ{f}_{i}\t1" for i in range(300)]
    ps = pr.parse_pairs("\n".join(lines) + "\n")
    assert (ps.n_folds, ps.per_fold, len(ps.pairs())) == (10, 300, 6000)
    assert sum(p.same for p in ps.pairs()) == 3000


@pytest.mark.parametrize("text, line, words", [
    ("", None, "empty"),
    ("ten 300\n", 1, "header"),
    ("1 2\nA 1 2\nB 1 2\nA 1 B 1\n", 1, "3 pair lines"),
    ("1 1\nA 1 2 3 4\nA 1 B 1\n", 2, "matched pair"),
    ("1 1\nA 1 2\nA 1 B\n", 3, "mismatched pair"),
    ("1 1\nA 1 2\nA 1 A 2\n", 3, "same person"),
    ("1 1\nA 0 2\nA 1 B 1\n", 2, ">= 1"),
    ("1 1\nA ../x.jpg 2\nA 1 B 1\n", 2, "plain file name"),
])
def test_malformed_pairs_files_say_where(text, line, words):
    with pytest.raises(pr.PairsFormatError) as e:
        pr.parse_pairs(text, "pairs.txt")
    assert words in str(e.value)
    assert e.value.line == line
    if line:
        assert f"pairs.txt:{line}:" in str(e.value)


def fake_identities(n_ids=30, seed=3) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {f"id{i:02d}": [f"{j:03d}.jpg" for j in range(int(rng.integers(1, 12)))] for i in range(n_ids)}


def test_generated_pairs_are_balanced_disjoint_unique_and_seeded(tmp_path):
    ids = fake_identities()
    ps = pr.generate_pairs(ids, 200, n_folds=10, seed=5)
    assert (ps.n_folds, ps.per_fold) == (10, 10)
    people = []
    for fold in ps.folds:
        assert [p.same for p in fold] == [True] * 10 + [False] * 10
        names = {p.name1 for p in fold} | {p.name2 for p in fold}
        people.append(names)
        for p in fold:
            assert p.ref1 in ids[p.name1] and p.ref2 in ids[p.name2]
            assert not (p.same and p.ref1 == p.ref2)
    for i in range(10):
        for j in range(i + 1, 10):
            assert not people[i] & people[j], "folds must not share identities"
    keys = [frozenset([(p.name1, p.ref1), (p.name2, p.ref2)]) for p in ps.pairs()]
    assert len(set(keys)) == len(keys), "no pair twice"
    # seeded: same seed, same pairs; another seed, other pairs
    assert pr.format_pairs(pr.generate_pairs(ids, 200, 10, seed=5)) == pr.format_pairs(ps)
    assert pr.format_pairs(pr.generate_pairs(ids, 200, 10, seed=6)) != pr.format_pairs(ps)
    # written in LFW's layout (file names as references) and read back unchanged
    pr.write_pairs(ps, tmp_path / "gen.txt")
    assert (tmp_path / "gen.txt").read_text().startswith("10\t10\n")
    assert pr.read_pairs(tmp_path / "gen.txt").pairs() == ps.pairs()


def test_generate_pairs_refuses_impossible_requests():
    ids = fake_identities()
    with pytest.raises(ValueError, match="multiple of 20"):
        pr.generate_pairs(ids, 210)
    with pytest.raises(ValueError, match="ask for fewer pairs"):
        pr.generate_pairs(ids, 20 * 1000)
    with pytest.raises(ValueError, match="too few"):
        pr.generate_pairs({"a": ["1.jpg", "2.jpg"], "b": ["1.jpg"]}, 20)


def test_resolve_lfw_numbers_file_names_and_missing(tmp_path):
    for rel in ("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", "bob/x.png", "bob/y.png", "cy/a.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    ps = pr.parse_pairs("1\nAnn_Lee\t1\t2\nbob\t2\tcy\ta.jpg\n")
    got = pr.resolve_pairs(ps, tmp_path)
    assert got == [(tmp_path / "Ann_Lee/Ann_Lee_0001.jpg", tmp_path / "Ann_Lee/Ann_Lee_0002.jpg"),
                   (tmp_path / "bob/y.png", tmp_path / "cy/a.jpg")]   # number n = n-th sorted image
    with pytest.raises(FileNotFoundError, match="2 pair image"):
        pr.resolve_pairs(pr.parse_pairs("1\nAnn_Lee\t1\t3\nbob\t1\tcy\tzz.jpg\n"), tmp_path)


# ---------------------------------------------------------------------------- metrics, known answers

# same-person distances 0.1 0.2 0.3 0.7; different-person 0.5 0.8 0.9 1.0
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


# ---------------------------------------------------------------------------- identification

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


# ---------------------------------------------------------------------------- engines and cache

@pytest.fixture(scope="module")
def port(face_model_path):
    """The torch port of dlib's face model, converted once (conversion takes seconds)."""
    from dlibbridge.convert import to_torch
    return to_torch(face_model_path)


@pytest.fixture(scope="module")
def torch_embedder(face_model_path, port):
    return ev.TorchEmbedder(face_model_path, port)


def test_engines_agree_and_flip_and_jitter_semantics(face_model_path, johns_chips, port, torch_embedder):
    chips = johns_chips[2][:4]
    dl = ev.make_embedder(ev.ModelSpec.parse(f"dlib:{face_model_path}"))
    assert np.abs(dl.embed(chips) - torch_embedder.embed(chips)).max() <= 1e-5
    flip_t = ev.TorchEmbedder(face_model_path, port, flip=True)
    flip_d = ev.make_embedder(ev.ModelSpec.parse(f"dlib:{face_model_path}"), flip=True)
    mirrored = np.ascontiguousarray(chips[:, :, ::-1])
    want = (torch_embedder.embed(chips) + torch_embedder.embed(mirrored)) / 2
    np.testing.assert_allclose(flip_t.embed(chips), want, atol=1e-7)
    assert np.abs(flip_d.embed(chips) - want).max() <= 1e-5
    assert flip_t.cache_name() != torch_embedder.cache_name() != dl.cache_name()
    # dlib treats num_jitters=1 as no jitter; the port follows
    one_t = ev.TorchEmbedder(face_model_path, port, jitter=1)
    np.testing.assert_array_equal(one_t.embed(chips[:2]), torch_embedder.embed(chips[:2]))
    jit = ev.TorchEmbedder(face_model_path, port, jitter=3).embed(chips[:2])
    assert jit.shape == (2, 128) and np.isfinite(jit).all()
    assert np.linalg.norm(jit - torch_embedder.embed(chips[:2]), axis=1).max() < 0.3   # same faces, jittered
    with pytest.raises(ValueError, match="uint8 chips"):
        torch_embedder.embed(chips[:, :100])


def test_checkpoint_and_onnx_models_run(tmp_path, johns_chips, port, torch_embedder):
    from dlibbridge.convert import export_onnx, save_torch
    chips = johns_chips[2][:3]
    want = torch_embedder.embed(chips)
    save_torch(port, tmp_path / "m.pt")
    ck = ev.make_embedder(ev.ModelSpec.parse(str(tmp_path / "m.pt")))
    np.testing.assert_array_equal(ck.embed(chips), want)
    export_onnx(port, tmp_path / "m.onnx")
    spec = ev.ModelSpec.parse(str(tmp_path / "m.onnx"))
    assert spec.engine == "onnx"
    assert np.abs(ev.make_embedder(spec).embed(chips) - want).max() <= 1e-5
    with pytest.raises(ValueError, match="dlib engine"):
        ev.ModelSpec.parse(f"dlib:{tmp_path / 'm.onnx'}")
    with pytest.raises(ValueError, match="dlib engine"):
        ev.ModelSpec.parse(str(tmp_path / "m.pt"), "dlib")
    with pytest.raises(FileNotFoundError):
        ev.ModelSpec.parse(str(tmp_path / "nope.dat"))


class CountingEmbedder(ev.TorchEmbedder):
    """The real torch port, counting the faces it is asked to embed."""
    faces = 0

    def _forward_batch(self, x):
        CountingEmbedder.faces += len(x)
        return super()._forward_batch(x)


def test_cache_is_reused_and_keyed_by_content(tmp_path, face_model_path, johns_dir, port):
    data = tmp_path / "data"
    shutil.copytree(johns_dir / "John_Salley", data / "js")
    paths = sorted((data / "js").glob("*.jpg"))[:6]
    emb = CountingEmbedder(face_model_path, port)
    src = ev.ChipSource(data, None)
    first, status = ev.compute_embeddings(paths, [emb], src, tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6 and status == ["chip"] * 6
    again, _ = ev.compute_embeddings(paths, [emb], src, tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6, "second run must come from the cache"
    np.testing.assert_array_equal(first, again)
    moved = data / "renamed"
    shutil.move(data / "js", moved)           # same bytes elsewhere: still cached
    ev.compute_embeddings(sorted(moved.glob("*.jpg"))[:6], [emb], ev.ChipSource(data, None),
                          tmp_path / "cache", progress=False)
    assert CountingEmbedder.faces == 6


# ---------------------------------------------------------------------------- end to end

def _subset(src: Path, dst: Path, n_ids: int, per_id: int) -> Path:
    """The first ``n_ids`` identities with >= per_id photos, ``per_id`` photos each (copied:
    the alignment pipeline works on a whole folder)."""
    taken = 0
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.jpg"))
        if len(files) >= per_id:
            (dst / d.name).mkdir(parents=True)
            for f in files[:per_id]:
                shutil.copy(f, dst / d.name / f.name)
            taken += 1
            if taken == n_ids:
                return dst
    raise AssertionError("not enough identities")


@pytest.fixture(scope="module")
def celeba_eval(shared_dir, tmp_path_factory):
    """300 generated pairs (10 folds) over 20 celeba-dev identities x 6 loose crops, aligned
    by the pipeline, embedded by dlib's package and by the torch port in one run."""
    tmp = tmp_path_factory.mktemp("celeba")
    data = _subset(shared_dir / "data" / "celeba-dev", tmp / "data", 20, 6)
    cfg = ev.EvalConfig(models=[ev.ModelSpec.parse("dlib:default"), ev.ModelSpec.parse("torch:default")],
                        data=data, gen_pairs=300, seed=0, report=tmp / "report", cache_dir=tmp / "cache",
                        jobs=2, progress=False)
    return cfg, ev.run(cfg)


def test_dlib_and_torch_port_give_the_same_numbers_on_celeba_dev(celeba_eval):
    cfg, res = celeba_eval
    assert res.results["images"]["total"] == 120
    assert res.results["images"]["detected"] + res.results["images"]["fallback"] == 120
    d, t = res.results["models"]
    assert (d["engine"], t["engine"]) == ("dlib", "torch")
    assert d["n_pairs"] == t["n_pairs"] == 300 and d["skipped_pairs"] == 0
    assert d["accuracy"] < 1.0, "a test that cannot fail proves nothing: this set must have errors"
    exact = ["accuracy", "accuracy_std", "accuracy_at_0.6", "accuracy_at_best_threshold", "auc", "eer", "tar_at_far"]
    for k in exact:
        assert d[k] == t[k], k                        # to the last digit
    assert d["folds"]["accuracy"] == t["folds"]["accuracy"]
    np.testing.assert_allclose(d["folds"]["threshold"], t["folds"]["threshold"], atol=1e-5)
    for k in ("best_threshold", "eer_threshold"):
        assert d[k] == pytest.approx(t[k], abs=1e-5)
    assert d["identification"] == t["identification"] or (
        d["identification"]["rank1"] == t["identification"]["rank1"]
        and d["identification"]["clustering"]["n_clusters"] == t["identification"]["clustering"]["n_clusters"])
    np.testing.assert_array_equal(res.outcomes[0].decided_same, res.outcomes[1].decided_same)
    np.testing.assert_allclose(res.outcomes[0].dist, res.outcomes[1].dist, atol=1e-5)


def test_results_json_schema(celeba_eval):
    cfg, res = celeba_eval
    on_disk = json.loads(res.results_file.read_text())
    assert res.results_file == cfg.report / "results.json"
    assert on_disk["schema_version"] == 1
    assert on_disk["pairs"]["n_folds"] == 10 and on_disk["pairs"]["per_fold"] == 15
    assert on_disk["pairs"]["generated"] == {"n": 300, "seed": 0}
    assert Path(on_disk["pairs"]["file"]).is_file()       # generated pairs are kept for reuse
    for m in on_disk["models"]:
        for key in ("name", "accuracy", "accuracy_std", "accuracy_at_0.6", "auc", "eer", "eer_threshold",
                    "best_threshold", "folds", "skipped_pairs", "identification"):
            assert key in m
        assert set(m["tar_at_far"]) == {"1e-3", "1e-4"}
        assert len(m["folds"]["accuracy"]) == 10
        assert m["accuracy"] == pytest.approx(np.mean(m["folds"]["accuracy"]))
        assert set(m["identification"]) == {"rank1", "n_probes", "n_gallery", "clustering"}
        assert m["identification"]["n_probes"] == 100


def test_report_files(celeba_eval):
    import cv2
    from dlibbridge.report import write_report
    cfg, res = celeba_eval
    html = write_report(res, cfg.report)
    out = cfg.report
    assert html == out / "report.html"
    for name in ("roc.png", "distances.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
    errors = sorted((out / "errors").rglob("*.png"))
    assert errors, "the celeba subset has mistakes; they must be shown"
    for f in errors:
        img = cv2.imread(str(f))
        assert img.shape == (150, 306, 3)                 # two chips and a gutter
    md = (out / "report.md").read_text()
    page = html.read_text()
    for f in ["roc.png", "distances.png"] + [str(p.relative_to(out)) for p in errors]:
        assert f"({f})" in md and f"src='{f}'" in page
    assert "dlib_face_recognition_resnet_model_v1 [dlib]" in md and "dlib_face_recognition_resnet_model_v1 [torch]" in page


def test_reusing_generated_pairs_and_refusing_to_overwrite(celeba_eval, tmp_path):
    cfg, res = celeba_eval
    pairs_file = Path(res.results["pairs"]["file"])
    again = ev.run(ev.EvalConfig(models=[ev.ModelSpec.parse("torch:default")], data=cfg.data, pairs=pairs_file,
                                 json_path=tmp_path / "r.json", cache_dir=cfg.cache_dir, progress=False,
                                 identification=False))
    assert again.results["models"][0]["accuracy"] == res.results["models"][1]["accuracy"]
    assert again.results["models"][0]["identification"] is None
    other = tmp_path / "mine.txt"
    other.write_text("1\nA\t1\t2\nA\t1\tB\t1\n")
    with pytest.raises(FileExistsError, match="differs"):
        ev.run(ev.EvalConfig(models=[ev.ModelSpec.parse("torch:default")], data=cfg.data, pairs=other,
                             gen_pairs=300, cache_dir=cfg.cache_dir, progress=False))
    assert other.read_text() == "1\nA\t1\t2\nA\t1\tB\t1\n"


def test_cli_evaluate_on_johns(tmp_path, johns_dir, capsys):
    from dlibbridge.cli import main
    rc = main(["evaluate", "default", "--data", str(johns_dir), "--gen-pairs", "40", "--folds", "2",
               "--json", str(tmp_path / "r.json"), "--pairs", str(tmp_path / "p.txt"),
               "--cache", str(tmp_path / "cache"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "acc 2-fold" in out and "dlib_face_recognition_resnet_model_v1 [torch]" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == {"total": 55, "chip": 55, "detected": 0, "fallback": 0, "failed": 0}
    assert pr.read_pairs(tmp_path / "p.txt").n_folds == 2


@pytest.mark.parametrize("model, extra, words", [
    ("default", ["--pairs", "{bad}"], "bad.txt:1: header"),
    ("default", [], "give --pairs FILE"),
    ("default", ["--gen-pairs", "30"], "multiple of 20"),
    ("default", ["--pairs", "{missing}"], "not found"),
    ("default", ["--pairs", "{wrong_person}"], "John_Stockton"),
    ("{garbage}", ["--pairs", "{good}", "--engine", "dlib"], "dlib cannot load"),
    ("{garbage}", ["--pairs", "{good}"], "garbage.dat"),
    ("{missing}", ["--pairs", "{good}"], "model file"),
])
def test_cli_evaluate_bad_input_is_a_clear_error(tmp_path, johns_dir, capsys, model, extra, words):
    from dlibbridge.cli import main
    files = {"bad": "hello\n", "good": "1\nJohn_Salley\t1\t2\nJohn_Salley\t1\tJohn_Savage\t1\n",
             "wrong_person": "1\nJohn_Salley\t1\t2\nJohn_Salley\t1\tJohn_Stockton\t1\n",
             "garbage": "\x01\x02 not a dlib network"}
    paths = {k: tmp_path / (k + (".dat" if k == "garbage" else ".txt")) for k in list(files) + ["missing"]}
    for k, text in files.items():
        paths[k].write_text(text)
    rc = main(["evaluate", model.format(**paths), "--data", str(johns_dir), "--no-cache", "-q",
               "--json", str(tmp_path / "r.json")] + [a.format(**paths) for a in extra])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
