"""LFW's ``pairs.txt``: read, write, and generate the same layout from identity folders.

LFW's View 2 protocol (Huang et al. 2007) is what every published face-verification number
refers to: a header ``10 300``, then for each of 10 folds 300 matched pairs (``name i j``)
and 300 mismatched pairs (``name1 i name2 j``), images at ``name/name_%04d.jpg``.  Pairs
generated here for a user's own identity folders keep that layout (balanced, identity-
disjoint folds, seeded) so the same code and the same protocol apply, and so the file can
be kept and reused.  Generated files name images by file name instead of number.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import write_atomic
from .._paths import confined
from ..data.images import is_image_file
from ..errors import DlibbridgeError



class PairsFormatError(DlibbridgeError, ValueError):
    """A pairs file that does not follow LFW's pairs.txt layout; says where."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        self.source, self.line = source, line
        where = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
        super().__init__(where + message)


@dataclass(frozen=True)
class Pair:
    """One LFW pair.  ``ref`` is an image number (LFW: ``name/name_%04d.jpg``) or, in
    generated pair files, a file name inside the identity folder (robust to files being
    added later, which would shift numbers)."""
    name1: str
    ref1: int | str
    name2: str
    ref2: int | str

    @property
    def same(self) -> bool:
        return self.name1 == self.name2


@dataclass
class PairSet:
    """Pairs grouped into folds; each fold holds ``per_fold`` matched pairs followed by
    ``per_fold`` mismatched pairs, exactly LFW View 2's layout."""
    folds: list[list[Pair]]

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def per_fold(self) -> int:
        return len(self.folds[0]) // 2 if self.folds else 0

    def pairs(self) -> list[Pair]:
        return [p for fold in self.folds for p in fold]

    def fold_ids(self) -> np.ndarray:
        return np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(self.folds)]) \
            if self.folds else np.zeros(0, np.int64)


def _parse_ref(tok: str, source: str, line: int) -> int | str:
    if tok.isdigit():
        n = int(tok)
        if n < 1:
            raise PairsFormatError(f"image number must be >= 1, got {tok}", source, line)
        return n
    if "/" in tok or "\\" in tok or tok in (".", ".."):
        raise PairsFormatError(f"image reference {tok!r} must be a number or a plain file name", source, line)
    return tok


def parse_pairs(text: str, source: str = "<pairs>") -> PairSet:
    """Parse LFW's pairs.txt: a header ``<folds> <n>`` (View 2, "10 300") or ``<n>``
    (View 1, one set), then per fold ``n`` lines ``name i j`` and ``n`` lines
    ``name1 i name2 j``.  Blank lines are ignored; anything else out of place is an error
    with its line number."""
    lines = [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise PairsFormatError("empty pairs file", source)
    hline, header = lines[0]
    if not (1 <= len(header) <= 2 and all(t.isdigit() for t in header)):
        raise PairsFormatError(
            f"header must be '<folds> <pairs per fold>' (LFW View 2: '10 300') or '<pairs>', got {' '.join(header)!r}",
            source, hline)
    n_folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    if n_folds < 1 or per_fold < 1:
        raise PairsFormatError("header counts must be positive", source, hline)
    expected = n_folds * per_fold * 2
    body = lines[1:]
    if len(body) != expected:
        raise PairsFormatError(
            f"header announces {n_folds} fold(s) x ({per_fold} matched + {per_fold} mismatched) = "
            f"{expected} pairs, file has {len(body)} pair lines", source, hline)
    folds: list[list[Pair]] = []
    it = iter(body)
    for _ in range(n_folds):
        fold = []
        for matched in (True, False):
            for _ in range(per_fold):
                ln, t = next(it)
                if matched:
                    if len(t) != 3:
                        raise PairsFormatError(
                            f"expected a matched pair 'name n1 n2' here, got {len(t)} fields", source, ln)
                    fold.append(Pair(t[0], _parse_ref(t[1], source, ln), t[0], _parse_ref(t[2], source, ln)))
                else:
                    if len(t) != 4:
                        raise PairsFormatError(
                            f"expected a mismatched pair 'name1 n1 name2 n2' here, got {len(t)} fields", source, ln)
                    if t[0] == t[2]:
                        raise PairsFormatError(f"mismatched pair names the same person {t[0]!r}", source, ln)
                    fold.append(Pair(t[0], _parse_ref(t[1], source, ln), t[2], _parse_ref(t[3], source, ln)))
        folds.append(fold)
    return PairSet(folds)


def read_pairs(path: str | os.PathLike) -> PairSet:
    if not Path(path).is_file():
        raise FileNotFoundError(f"pairs file {path} not found")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PairsFormatError(f"not a text file ({e})", str(path)) from None
    return parse_pairs(text, str(path))


def format_pairs(ps: PairSet) -> str:
    """LFW's own layout (tab-separated, one-number header for a single set), so a parsed
    LFW file is written back byte-identical."""
    for i, fold in enumerate(ps.folds):
        n = len(fold) // 2
        if n != ps.per_fold or len(fold) != 2 * n or not all(p.same for p in fold[:n]) \
                or any(p.same for p in fold[n:]):
            raise ValueError(f"fold {i} is not {ps.per_fold} matched then {ps.per_fold} mismatched pairs")
    for p in ps.pairs():
        for name in (p.name1, p.name2, str(p.ref1), str(p.ref2)):
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"name {name!r} cannot be written to a pairs file (whitespace)")
    out = [f"{ps.per_fold}" if ps.n_folds == 1 else f"{ps.n_folds}\t{ps.per_fold}"]
    for p in ps.pairs():
        out.append(f"{p.name1}\t{p.ref1}\t{p.ref2}" if p.same else f"{p.name1}\t{p.ref1}\t{p.name2}\t{p.ref2}")
    return "\n".join(out) + "\n"


def write_pairs(ps: PairSet, path: str | os.PathLike) -> None:
    write_atomic(path, format_pairs(ps).encode("utf-8"))


def scan_identities(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{identity: sorted image file names}`` for a folder with one sub-folder per person
    (LFW, dlib's metric-learning example, FaceNet); folders without images are left out."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} does not exist or is not a folder")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f.name for f in d.iterdir() if f.is_file() and is_image_file(f))
        if files:
            out[d.name] = files
    if not out:
        raise ValueError(f"{root} has no identity sub-folders with images (expected DIR/<person>/<image>)")
    return out


def image_path(root: Path, identities: dict[str, list[str]], name: str, ref: int | str) -> Path:
    """The file a pair reference points at: a name is taken literally; a number n is LFW's
    ``name/name_%04d.jpg`` when that exists, else the n-th image (1-based, sorted) of the
    folder, which is what LFW's numbering is for its own layout."""
    # a pairs file may come from anywhere: it names files inside the data folder only
    folder = confined(root, name, source="the pairs file", links=False)
    if isinstance(ref, str):
        return confined(folder, ref, source="the pairs file", links=False)
    lfw = root / name / f"{name}_{ref:04d}.jpg"
    if lfw.is_file():
        return lfw
    files = identities.get(name, [])
    if ref > len(files):
        raise FileNotFoundError(
            f"pair refers to image {ref} of {name!r}, but {root / name} has {len(files)} image(s)")
    return root / name / files[ref - 1]


def resolve_pairs(ps: PairSet, root: str | os.PathLike,
                  identities: dict[str, list[str]] | None = None) -> list[tuple[Path, Path]]:
    """Paths of both images of every pair; all missing files are reported at once."""
    root = Path(root)
    identities = scan_identities(root) if identities is None else identities
    out, missing = [], []
    for p in ps.pairs():
        try:
            a, b = image_path(root, identities, p.name1, p.ref1), image_path(root, identities, p.name2, p.ref2)
        except FileNotFoundError as e:
            missing.append(str(e))
            continue
        for f in (a, b):
            if not f.is_file():
                missing.append(f"missing image {f}")
        out.append((a, b))
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"{len(missing)} pair image(s) not found under {root} (wrong --data for this pairs file?):\n  {shown}{more}")
    return out


def _split_identities(identities: dict[str, list[str]], n_folds: int, rng: np.random.Generator) -> list[list[str]]:
    """Identity-disjoint folds of about equal image counts (LFW's folds share no person,
    so a threshold is never tuned on the people it is tested on)."""
    names = list(identities)
    order = rng.permutation(len(names))
    names = sorted((names[i] for i in order), key=lambda n: -len(identities[n]))  # stable: ties stay shuffled
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    load = [0] * n_folds
    for n in names:
        k = min(range(n_folds), key=lambda i: (load[i], len(folds[i])))
        folds[k].append(n)
        load[k] += len(identities[n])
    return folds


def _sample_matched(ids: list[str], identities, n: int, rng) -> list[Pair]:
    """n distinct same-person pairs: a random eligible person, then two random images, so
    people with many photos do not dominate (they would, quadratically, under uniform
    sampling of all pairs)."""
    avail = {i: len(identities[i]) * (len(identities[i]) - 1) // 2 for i in ids if len(identities[i]) >= 2}
    if _matched_available(ids, identities) < n:
        raise ValueError(f"only {_matched_available(ids, identities)} distinct matched pairs exist in this fold, need {n}")
    used: set = set()
    out = []
    while len(out) < n:
        cands = sorted(i for i, a in avail.items() if a > 0)
        name = cands[rng.integers(len(cands))]
        files = identities[name]
        a, b = sorted(rng.choice(len(files), 2, replace=False).tolist())
        if (name, a, b) in used:
            continue
        used.add((name, a, b))
        avail[name] -= 1
        out.append(Pair(name, files[a], name, files[b]))
    return out


def _sample_mismatched(ids: list[str], identities, n: int, rng) -> list[Pair]:
    """n distinct different-person pairs: two random people, one random image each."""
    possible = _mismatched_available(ids, identities)
    if possible < n:
        raise ValueError(f"only {possible} distinct mismatched pairs exist in this fold, need {n}")
    used: set = set()
    out = []
    while len(out) < n:
        x, y = rng.choice(len(ids), 2, replace=False).tolist()
        n1, n2 = ids[x], ids[y]
        f1, f2 = identities[n1][rng.integers(len(identities[n1]))], identities[n2][rng.integers(len(identities[n2]))]
        key = tuple(sorted([(n1, f1), (n2, f2)]))
        if key in used:
            continue
        used.add(key)
        out.append(Pair(n1, f1, n2, f2))
    return out


def _matched_available(ids: list[str], identities) -> int:
    return sum(len(identities[i]) * (len(identities[i]) - 1) // 2 for i in ids)


def _mismatched_available(ids: list[str], identities) -> int:
    total = sum(len(identities[i]) for i in ids)
    return (total * total - sum(len(identities[i]) ** 2 for i in ids)) // 2


def _check_request(n_pairs: int, n_folds: int) -> None:
    if n_folds < 1:
        raise ValueError("n_folds must be >= 1")
    if n_pairs <= 0 or n_pairs % (2 * n_folds):
        raise ValueError(f"--gen-pairs {n_pairs}: must be a positive multiple of {2 * n_folds} "
                         f"(equal matched and mismatched pairs in each of {n_folds} folds)")


def fit_request(identities: dict[str, list[str]], n_pairs: int, n_folds: int = 10,
                seed: int = 0) -> tuple[int, int, list[str]]:
    """The largest ``(n_pairs, n_folds)`` within the request that these identities can supply,
    and a line for each thing lowered: a small photo set should get an evaluation it can
    support (said so), not a refusal of the LFW defaults.  Fewer than the 4 identities (2 with
    2+ images) two identity-disjoint folds need is refused, naming ``--folds``; ``--folds 1``
    is then the user's explicit choice.  :func:`generate_pairs` with the result gives the pairs."""
    _check_request(n_pairs, n_folds)
    eligible = [n for n, f in identities.items() if len(f) >= 2]
    notes = []
    if n_folds >= 2 and (len(identities) < 2 * n_folds or len(eligible) < n_folds):
        most = min(len(identities) // 2, len(eligible))
        if most < 2:
            raise ValueError(
                f"{len(identities)} identities ({len(eligible)} with >= 2 images) are too few for 2 "
                "identity-disjoint folds (need >= 4 identities, >= 2 with 2+ images); --folds 1 evaluates on one "
                "set of pairs, without k-fold accuracy")
        notes.append(f"--folds {n_folds} lowered to {most}: {len(identities)} identities ({len(eligible)} with "
                     f">= 2 images) allow at most {most} identity-disjoint folds")
        n_folds = most
    folds = _split_identities(identities, n_folds, np.random.default_rng(seed))   # generate_pairs' split
    capacity = min(min(_matched_available(ids, identities), _mismatched_available(ids, identities)) for ids in folds)
    per = min(n_pairs // (2 * n_folds), capacity)
    if per < 1:
        raise ValueError(f"--gen-pairs {n_pairs}: too few for {n_folds} folds of matched and mismatched pairs "
                         f"(at least {2 * n_folds})" if capacity else
                         "these identities give a fold without a matched or a mismatched pair; use fewer --folds")
    if 2 * n_folds * per != n_pairs:
        why = (f"the smallest of the {n_folds} folds has {capacity} distinct matched or mismatched pairs"
               if per == capacity else f"a multiple of {2 * n_folds} (as many matched as mismatched pairs per fold)")
        notes.append(f"--gen-pairs {n_pairs} lowered to {2 * n_folds * per}: {why}")
    return 2 * n_folds * per, n_folds, notes


def writable_identities(identities: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """The identities and photos a pairs file can name (LFW's format separates fields by
    whitespace, so a name holding a space, a tab or a newline would be written as a file that
    cannot be read back), and the ``identity/photo`` paths left out."""
    kept, left = {}, []
    for name, files in identities.items():
        ok = [f for f in files if not any(c.isspace() for c in name + f)]
        left += [f"{name}/{f}" for f in files if f not in ok]
        if ok:
            kept[name] = ok
    return kept, left


def generate_pairs(identities: dict[str, list[str]], n_pairs: int, n_folds: int = 10, seed: int = 0) -> PairSet:
    """Balanced, seeded, fold-structured pairs from identity folders, LFW View 2 style:
    ``n_pairs / (2 * n_folds)`` matched and as many mismatched pairs per fold, folds
    identity-disjoint.  Same inputs and seed give the same file."""
    _check_request(n_pairs, n_folds)
    for name in identities:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"identity folder {name!r}: names with whitespace cannot go in a pairs file")
    eligible = [n for n, f in identities.items() if len(f) >= 2]
    if len(identities) < 2 * n_folds or len(eligible) < n_folds:
        max_folds = min(len(identities) // 2, len(eligible))
        raise ValueError(
            f"{len(identities)} identities ({len(eligible)} with >= 2 images) are too few for {n_folds} "
            f"identity-disjoint folds (need >= {2 * n_folds} identities, >= {n_folds} with 2+ images)"
            + (f"; use --folds {max_folds} (the most these identities allow)" if max_folds >= 2 else ""))
    rng = np.random.default_rng(seed)
    per = n_pairs // (2 * n_folds)
    folds = []
    for k, ids in enumerate(_split_identities(identities, n_folds, rng)):
        try:
            folds.append(_sample_matched(ids, identities, per, rng) + _sample_mismatched(ids, identities, per, rng))
        except ValueError as e:
            raise ValueError(f"--gen-pairs {n_pairs}: fold {k + 1}/{n_folds} ({len(ids)} identities): {e}; "
                             f"ask for fewer pairs") from None
    return PairSet(folds)
