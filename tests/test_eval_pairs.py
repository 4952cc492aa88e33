"""eval.pairs: LFW-style pairs files read, written and generated."""
from __future__ import annotations


import numpy as np
import pytest

from dlibbridge.eval import pairs as pr


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


def fake_identities(n_ids=30, seed=3) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {f"id{i:02d}": [f"{j:03d}.jpg" for j in range(int(rng.integers(1, 12)))] for i in range(n_ids)}


def test_too_few_identities_for_the_folds_names_the_option_and_the_most_allowed():
    from dlibbridge.eval.pairs import generate_pairs
    ids = {f"p{i}": [f"p{i}/a.jpg", f"p{i}/b.jpg"] for i in range(8)}
    with pytest.raises(ValueError, match=r"use --folds 4 \(the most these identities allow\)"):
        generate_pairs(ids, 3000, n_folds=10)


def test_a_small_set_gets_fewer_folds_and_pairs_with_a_note_for_each():
    """8 people x 4 images: 4 folds at most; each fold (2 people) has 2 x 6 matched and
    16 mismatched pairs, so 3000 pairs become 4 folds x 12 x 2 = 96."""
    ids = {f"p{i}": [f"{c}.jpg" for c in "abcd"] for i in range(8)}
    n, k, notes = pr.fit_request(ids, 3000, 10, seed=0)
    assert (n, k) == (96, 4)
    assert notes[0].startswith("--folds 10 lowered to 4") and notes[1].startswith("--gen-pairs 3000 lowered to 96")
    ps = pr.generate_pairs(ids, n, k, seed=0)
    assert (ps.n_folds, ps.per_fold, len(set(ps.pairs()))) == (4, 12, 96)
    assert pr.fit_request(ids, 40, 2, seed=0) == (40, 2, [])         # a request the set meets is kept


def test_fewer_than_two_folds_possible_names_folds_1():
    ids = {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg"], "c": ["1.jpg"]}
    with pytest.raises(ValueError, match="--folds 1"):
        pr.fit_request(ids, 40, 10)
    assert pr.fit_request(ids, 2, 1)[:2] == (2, 1)
