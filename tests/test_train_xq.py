"""Cross-quality fine-tuning pieces: each loss term against a numpy reference, the frozen/trained
split of the network, the feature cache and batch-norm adaptation (AdaBN) of the deployed model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dlibbridge.port.infer import embed_chips
from dlibbridge.train import xq
from dlibbridge.train.losses import MetricLoss


def _ref_terms(sd, sc, tc):
    """numpy reference of the three teacher terms."""
    xq_ = np.mean(np.sum((sd - tc) ** 2, 1))
    same = np.mean(np.sum((sc - tc) ** 2, 1))
    n = len(sc)
    diffs = [(np.linalg.norm(sc[i] - sc[j]) - np.linalg.norm(tc[i] - tc[j])) ** 2
             for i in range(n) for j in range(i + 1, n)]
    return xq_, float(np.mean(diffs)), same


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_terms_match_numpy_reference(seed):
    g = np.random.default_rng(seed)
    sd, sc, tc = (g.normal(0, 0.1, (8, 128)).astype(np.float32) for _ in range(3))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cfg = xq.XQConfig(w_identity=0.5, w_xq=2.0, w_relational=3.0, w_same=0.25)
    t = xq.xq_losses(torch.from_numpy(sd), torch.from_numpy(sc), torch.from_numpy(tc), labels, cfg, MetricLoss())
    r_xq, r_rel, r_same = _ref_terms(sd.astype(np.float64), sc.astype(np.float64), tc.astype(np.float64))
    assert float(t["xq"]) == pytest.approx(r_xq, rel=1e-5)
    assert float(t["relational"]) == pytest.approx(r_rel, rel=1e-4)
    assert float(t["same"]) == pytest.approx(r_same, rel=1e-5)
    ident = float(MetricLoss()(torch.from_numpy(np.concatenate([sd, sc])), torch.cat([labels, labels])))
    assert float(t["identity"]) == pytest.approx(ident, rel=1e-6)
    total = 0.5 * ident + 2.0 * r_xq + 3.0 * r_rel + 0.25 * r_same
    assert float(t["total"]) == pytest.approx(total, rel=1e-4)


def test_worked_example_of_docs():
    """The worked example in docs/finetune.md: two faces, 2-d for readability."""
    tc = torch.tensor([[0.0, 0.0], [0.6, 0.0]])
    sc = torch.tensor([[0.0, 0.1], [0.6, 0.0]])
    sd = torch.tensor([[0.3, 0.0], [0.6, 0.4]])
    cfg = xq.XQConfig()
    t = xq.xq_losses(sd, sc, tc, torch.tensor([0, 1]), cfg, lambda e, l: torch.zeros(()))
    assert float(t["xq"]) == pytest.approx((0.09 + 0.16) / 2)
    assert float(t["same"]) == pytest.approx(0.01 / 2)
    assert float(t["relational"]) == pytest.approx((np.hypot(0.6, 0.1) - 0.6) ** 2, rel=1e-5)


def test_bank_term_matches_numpy_reference():
    """Retrieval of each degraded face's own clean teacher descriptor among the other people's
    (the person's other chips neither target nor negative)."""
    g = np.random.default_rng(5)
    bank = g.normal(0, 0.3, (12, 16))
    bank_labels = np.repeat(np.arange(6), 2)
    own = np.array([0, 3, 7, 10])
    labels = bank_labels[own]
    s = bank[own] + g.normal(0, 0.2, (4, 16))
    tau = 0.07
    ref = []
    for i in range(4):
        keep = (bank_labels != labels[i]) | (np.arange(12) == own[i])
        logits = -((s[i] - bank) ** 2).sum(1) / tau
        ref.append(np.log(np.exp(logits[keep]).sum()) - logits[own[i]])
    got = xq.bank_loss(torch.from_numpy(s), torch.from_numpy(bank), torch.from_numpy(bank_labels),
                       torch.from_numpy(own), torch.from_numpy(labels), tau)
    assert float(got) == pytest.approx(float(np.mean(ref)), rel=1e-6)
    cfg = xq.XQConfig(w_identity=0.0, w_xq=0.0, w_relational=0.0, w_bank=2.0, bank_tau=tau)
    t = xq.xq_losses(torch.from_numpy(s), torch.from_numpy(s), torch.from_numpy(bank[own]), torch.from_numpy(labels),
                     cfg, lambda e, l: torch.zeros(()),
                     bank=(torch.from_numpy(bank), torch.from_numpy(bank_labels), torch.from_numpy(own)))
    assert float(t["total"]) == pytest.approx(2.0 * float(np.mean(ref)), rel=1e-6)


def test_cosine_cross_quality_ignores_scale():
    tc = torch.tensor([[0.3, 0.4], [0.0, 1.0]])
    t = xq.xq_losses(2 * tc, tc, tc, torch.tensor([0, 1]), xq.XQConfig(xq_distance="cosine"), lambda e, l: torch.zeros(()))
    assert float(t["xq"]) == pytest.approx(0.0, abs=1e-7)


def test_relational_term_ignores_a_rigid_motion():
    g = np.random.default_rng(3)
    tc = torch.from_numpy(g.normal(0, 0.1, (6, 128)).astype(np.float32))
    q, _ = torch.linalg.qr(torch.from_numpy(g.normal(size=(128, 128))).float())
    moved = tc @ q + 0.05
    t = xq.xq_losses(moved, moved, tc, torch.tensor([0, 0, 1, 1, 2, 2]), xq.XQConfig(), MetricLoss())
    assert float(t["relational"]) < 1e-9
    assert float(t["same"]) > 1e-3


@pytest.fixture(scope="module")
def deployed(face_model_path):
    from dlibbridge.port.checkpoint import load_model
    return load_model(face_model_path, trainable=False)


@pytest.mark.parametrize("train_from", ["stem", "level3", "level1", "level0"])
def test_prefix_then_suffix_is_the_model(deployed, johns_chips, train_from):
    chips = torch.from_numpy(johns_chips[2][:6])
    with torch.no_grad():
        e = deployed(chips)
        e2 = xq.run_suffix(deployed, xq.run_prefix(deployed, chips, train_from), train_from)
    assert float((e - e2).abs().max()) == 0.0


def test_adapt_batchnorm_identity_cases_and_target_statistics(deployed, johns_chips):
    chips = johns_chips[2][:12]
    other = np.ascontiguousarray(chips[:, :, ::-1] // 2)        # a darker, mirrored "camera"
    e = embed_chips(deployed, chips)
    # alpha 0, or a target domain equal to the source: the model is unchanged
    assert np.abs(embed_chips(xq.adapt_batchnorm(deployed, chips, other, alpha=0.0), chips) - e).max() < 1e-5
    assert np.abs(embed_chips(xq.adapt_batchnorm(deployed, chips, chips), chips) - e).max() < 1e-5
    # fully adapted: the first affine's output on the target has the source's statistics
    adapted = xq.adapt_batchnorm(deployed, chips, other)
    outs = {}
    for name, m in (("base", deployed), ("adapted", adapted)):
        with torch.no_grad():
            x = m.input(torch.from_numpy(chips if name == "base" else other))
            outs[name] = m.stem.unit.norm(m.stem.unit.conv(x))
    for f in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3), unbiased=False)):
        assert torch.allclose(f(outs["base"]), f(outs["adapted"]), atol=1e-4, rtol=1e-3)


def test_cache_and_training_step_shapes(deployed, johns_chips):
    chips = johns_chips[2][:20]
    labels = np.unique(np.asarray(johns_chips[1][:20]), return_inverse=True)[1]
    cfg = xq.XQConfig(train_from="level0", versions=2, steps=3, identities=2, per_identity=2, warmup=1)
    cache = xq.build_cache(deployed, chips, lambda c, r: c // 2 + 10, cfg)
    assert cache["clean"].shape[:2] == (20, 2) and cache["degraded"].shape[:2] == (20, 2)
    with torch.no_grad():
        t = deployed(torch.from_numpy(np.ascontiguousarray(chips[:, :, ::-1])))
    assert float((cache["teacher"][:, 1] - t).abs().max()) < 1e-5
    student, rows = xq.train_xq(deployed, cache, labels, cfg)
    assert len(rows) == 3 and all(np.isfinite(r["total"]) for r in rows)
    # lower stages untouched, the trained stage moved
    assert torch.equal(student.level1[0].branch1.conv.weight, deployed.level1[0].branch1.conv.weight)
    assert not torch.equal(student.level0[0].branch1.conv.weight, deployed.level0[0].branch1.conv.weight)


def test_whole_network_cache_keeps_the_chips_and_trains_the_stem(deployed, johns_chips):
    """Nothing frozen (``train_from`` = stem): the cache holds the uint8 chips themselves (exact),
    the teacher is the base model on them, and a step moves the stem."""
    chips = johns_chips[2][:20]
    labels = np.unique(np.asarray(johns_chips[1][:20]), return_inverse=True)[1]
    cfg = xq.XQConfig(train_from="stem", versions=2, steps=2, identities=2, per_identity=2, warmup=1)
    cache = xq.build_cache(deployed, chips, lambda c, r: c // 2 + 10, cfg)
    assert cache["clean"].dtype == torch.uint8 and torch.equal(cache["clean"][:, 0], torch.from_numpy(chips))
    assert torch.equal(cache["degraded"][:, 0], torch.from_numpy(chips // 2 + 10))
    with torch.no_grad():
        t = deployed(torch.from_numpy(chips))
    assert float((cache["teacher"][:, 0] - t).abs().max()) < 1e-5
    student, _ = xq.train_xq(deployed, cache, labels, cfg)
    assert not torch.equal(student.stem.unit.conv.weight, deployed.stem.unit.conv.weight)


def test_train_until_keeps_the_levels_above(deployed, johns_chips):
    """``train_until``: only the named block learns; the levels above it and the fc stay the
    base's although the loss is taken on the descriptors they compute."""
    chips = johns_chips[2][:20]
    labels = np.unique(np.asarray(johns_chips[1][:20]), return_inverse=True)[1]
    cfg = xq.XQConfig(train_from="level1", train_until="level1", versions=2, steps=2, identities=2,
                      per_identity=2, warmup=1, lr=1e-3)
    cache = xq.build_cache(deployed, chips, lambda c, r: c // 2 + 10, cfg)
    student, _ = xq.train_xq(deployed, cache, labels, cfg)
    assert not torch.equal(student.level1[0].branch1.conv.weight, deployed.level1[0].branch1.conv.weight)
    for name in ("level0", "fc"):
        for a, b in zip(getattr(student, name).parameters(), getattr(deployed, name).parameters()):
            assert torch.equal(a, b), name


def test_one_photo_people_are_drawn_as_instances(deployed, johns_chips):
    """People with one chip are drawn like the others (before, only two had 2+ chips and a batch
    of 4 people was refused): their K rows are that chip under K camera draws."""
    chips = np.concatenate([johns_chips[2][:6], johns_chips[2][-2:]])
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 3])
    cfg = xq.XQConfig(train_from="level0", versions=2, steps=2, identities=4, per_identity=2, warmup=1)
    cache = xq.build_cache(deployed, chips, lambda c, r: c // 2 + r.integers(0, 10, dtype=np.uint8), cfg)
    tr = xq.XQTrainer(deployed, cache, labels, cfg)
    assert sorted(tr.ids.tolist()) == [0, 1, 2, 3] and tr.groups[2].tolist() == [6]
    rows = [tr.step() for _ in range(cfg.steps)]
    assert all(np.isfinite(r["total"]) and r["identity"] > 0 for r in rows)
