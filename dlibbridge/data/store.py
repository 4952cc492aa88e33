"""Face images in, training batches out.

Two halves, both used by ``align`` and by training code:

* :func:`read_image` turns any photo a user is likely to have into the 8-bit RGB array that
  dlib's detector and ``get_face_chip`` expect, or raises :class:`ImageReadError` whose
  ``reason`` is one of the stable codes in :data:`REASONS`.  A dataset of thousands of photos
  always holds a few broken ones; callers record the reason and move on.

* The chip store (:func:`pack`, :class:`ChipStore`) keeps every aligned chip of a data set in
  one raw uint8 array of N×150×150×3 that is memory-mapped, plus labels and paths, so a
  training epoch does no PNG/JPEG decoding: loading a batch is an index into the array.
  :class:`ChipDataset` (a map-style torch dataset) and :class:`PKBatchSampler` (P identities ×
  K images per batch, what metric learning needs) read it.  torch is imported only inside the
  methods that build tensors, so packing and reading a store need numpy only.

Typical training use::

    store = ChipStore("celeba.store")
    ds = ChipDataset(store)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=PKBatchSampler(ds.labels, p=32, k=4, seed=0),
        collate_fn=ChipDataset.collate, num_workers=2)
    for chips, labels in loader:   # chips: uint8 (B, 3, 150, 150) RGB; labels: int64 (B,)
        ...

Decoding decisions (each is the one that keeps chips identical to what dlib computes):

* JPEG is decoded by dlib's own decoder (``dlib.load_rgb_image``) by default.  It differs
  from Pillow/OpenCV (libjpeg-turbo) by up to ~45 grey levels per pixel on chroma edges, which
  moves descriptors by ~0.06 on average (docs/benchmarks.md); with dlib's decoder a chip
  equals the one dlib's examples compute.  Its libjpeg warnings are captured to tell truncated
  files and corrupt ones (Pillow decodes corrupt entropy-coded data silently into garbage).
  ``decoder="pillow"`` uses Pillow instead.
* EXIF orientation is applied to the decoded pixels (dlib itself ignores it).
* Transparent pixels are composited onto black with dlib's own integer arithmetic
  ``(v * ((alpha << 8) // 255)) >> 8`` (what ``load_rgb_image`` does for RGBA PNGs).
* 16-bit samples keep their high byte (``v >> 8``), as Pillow does for 16-bit RGB PNGs; dlib
  saturates them to 255 instead, which is no use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .align import STATE_DIR as ALIGN_STATE_DIR
from .images import CHIP_SHAPE, ImageReadError, read_image, walk_files
from ..errors import DlibbridgeError
from .._io import write_json
from .._load import read_npz
from .._lock import LOCK_NAME, folder_lock
from .._paths import Folder, resolved

_COMPACT_JSON = dict(indent=None, newline=False, fsync=False, ensure_ascii=False)   # index/progress: one line, no fsync (pack re-checks on resume)

__all__ = ["CHIP_SHAPE", "StoreError", "NotAChipError", "ChipEntry", "chip_entries", "read_chips", "pack", "ChipStore",
           "ChipDataset", "PKBatchSampler"]

# --------------------------------------------------------------------------------------------
# The chip store
# --------------------------------------------------------------------------------------------

STORE_VERSION = 1
_CHIPS = "chips.u8"      # raw N*150*150*3 bytes, row-major; np.memmap reads it
_LABELS = "labels.npy"   # int32 (N,), index into identities, -1 for chips without identity
_INDEX = "index.json"    # version, count, identities, paths, sources, skipped
_PROGRESS = "progress.json"
_FLUSH_EVERY = 512       # chips between progress checkpoints of a resumable pack


class StoreError(DlibbridgeError, ValueError):
    """A chip store that cannot be built or opened."""


@dataclasses.dataclass(frozen=True)
class ChipEntry:
    """One chip to pack: ``path`` relative to the chips folder."""

    path: str
    identity: str = ""      # '' = no identity (flat folder)
    source: str = ""        # the photo it came from, when known (manifest)


def chip_entries(chips_dir: str | os.PathLike) -> list[ChipEntry]:
    """The chips of ``chips_dir``: from its ``manifest.csv`` (written by ``align``) when there
    is one, else every image file below it, the first sub-folder being the identity."""
    import csv

    root = Path(chips_dir)
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder")
    manifest = root / "manifest.csv"
    _refuse_unfinished_align(root, manifest)
    entries = []
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            folder = Folder(root, manifest)
            for row in reader:
                if row.get("chip"):
                    folder.path(row["chip"], reader.line_num)
                    entries.append(ChipEntry(row["chip"], row.get("identity", ""), row.get("source", "")))
    else:
        for rel in walk_files(root):
            parts = rel.split("/")
            entries.append(ChipEntry(rel, parts[0] if len(parts) > 1 else ""))
    # Identity-contiguous order: the K images of one identity in a batch lie close together.
    entries.sort(key=lambda e: (e.identity, e.path))
    return entries


def _refuse_unfinished_align(root: Path, manifest: Path) -> None:
    """An align that was killed leaves its state folder and no manifest.csv (or a manifest
    older than its journal): its chips are a partial set, and packing them would train on it
    without anyone noticing."""
    journal = root / ALIGN_STATE_DIR / "journal.jsonl"
    if not journal.is_file():
        return
    if not manifest.is_file() or journal.stat().st_mtime_ns > manifest.stat().st_mtime_ns:
        raise StoreError(f"{root} is an unfinished align output (its journal is newer than manifest.csv, or "
                         "there is no manifest.csv): run the same `dlibbridge align` command again to finish it")


class NotAChipError(StoreError):
    """A readable image that is not a 150x150 aligned chip, where chips were expected."""


def read_chips(root: str | os.PathLike, entries: Sequence[ChipEntry]) -> tuple[list[tuple[ChipEntry, np.ndarray]], list[str]]:
    """Decode ``entries`` below ``root`` for a pass over aligned chips (calibration, validation):
    (entry, RGB chip) of every readable one, and ``"path (reason)"`` of every unreadable one,
    left out.  A readable image of another size raises :class:`NotAChipError`: a folder of
    photos is not aligned chips, and using it as such would quietly measure something else."""
    root = Path(root)
    read, skipped = [], []
    for e in entries:
        try:
            rgb = read_image(root / e.path).rgb
        except ImageReadError as err:
            skipped.append(f"{e.path} ({err.reason})")
            continue
        if rgb.shape != CHIP_SHAPE:
            raise NotAChipError(f"{root / e.path} is {rgb.shape[1]}x{rgb.shape[0]}, not an aligned 150x150 "
                                f"chip (align photos first with `dlibbridge align`)")
        read.append((e, rgb))
    return read, skipped


def pack(chips_dir: str | os.PathLike, store: str | os.PathLike, *, overwrite: bool = False,
         progress: bool = True, on_chip: Callable[[int], None] | None = None) -> "ChipStore":
    """Build the store ``store`` (a folder) from the chips in ``chips_dir``.

    Resumable: the work goes to ``<store>.partial`` with a checkpoint every few hundred chips;
    a rerun over the same chips continues there.  The finished folder appears by one rename,
    so ``store`` is never half-written.  Files that are not valid 150×150 chips are left out
    and listed (with their reason) under ``skipped`` in ``index.json``.  ``on_chip(i)`` is
    called after each chip (progress hooks; an exception from it interrupts the pack cleanly).
    """
    chips_dir, store = Path(chips_dir), Path(store)
    lock = store.with_name(f".{store.name}{LOCK_NAME}")
    with contextlib.ExitStack() as held:
        held.enter_context(folder_lock(store, "dlibbridge pack", lock_file=lock, create=False))
        if (chips_dir / ALIGN_STATE_DIR).is_dir():   # no align may write the chips while they are packed
            held.enter_context(folder_lock(chips_dir, "dlibbridge pack", lock_file=chips_dir / ALIGN_STATE_DIR / "lock"))
        return _pack(chips_dir, store, overwrite, progress, on_chip)


def _pack(chips_dir: Path, store: Path, overwrite: bool, progress: bool,
          on_chip: Callable[[int], None] | None) -> "ChipStore":
    if store.exists() or store.is_symlink():
        if not overwrite:
            raise StoreError(f"{store} exists (add --overwrite to replace it)")
        if not is_store(store):
            raise StoreError(f"{store} exists and is not a chip store; --overwrite only "
                             f"replaces a store written by pack (left untouched)")
    if resolved(store, "-o") == resolved(chips_dir, "CHIPS_DIR") or chips_dir.resolve() in store.resolve().parents:
        raise StoreError("the store must be outside the chips folder")
    entries = chip_entries(chips_dir)
    if not entries:
        raise StoreError(f"no chips found in {chips_dir}")
    fingerprint = hashlib.sha256(
        json.dumps([dataclasses.astuple(e) for e in entries]).encode()).hexdigest()

    partial = store.with_name(store.name + ".partial")
    old = store.with_name(store.name + ".old")
    for leftover, ours in ((partial, _is_partial_store), (old, is_store)):
        if (leftover.exists() or leftover.is_symlink()) and not ours(leftover):
            raise StoreError(f"{leftover} exists and was not written by pack; "
                             f"move it away first (left untouched)")
    state = _read_progress(partial, fingerprint)
    if state is None:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        _allocate(partial / _CHIPS, len(entries) * int(np.prod(CHIP_SHAPE)))
        state = {"fingerprint": fingerprint, "next": 0, "written": 0, "skipped": []}
        write_json(partial / _PROGRESS, **_COMPACT_JSON, obj=state)

    n = len(entries)
    chips = np.memmap(partial / _CHIPS, dtype=np.uint8, mode="r+", shape=(n, *CHIP_SHAPE))
    bar = _progress_bar(n, "packing", progress, initial=state["next"])
    try:
        for i in range(state["next"], n):
            entry = entries[i]
            try:
                rgb = read_image(chips_dir / entry.path).rgb
                if rgb.shape != CHIP_SHAPE:
                    raise ImageReadError("corrupt", f"a chip must be {CHIP_SHAPE[0]}x{CHIP_SHAPE[1]}, "
                                                    f"this is {rgb.shape[1]}x{rgb.shape[0]}")
                chips[state["written"]] = rgb
                state["written"] += 1
            except ImageReadError as e:
                state["skipped"].append({"index": i, "path": entry.path, "reason": e.reason, "detail": e.detail})
            state["next"] = i + 1
            if state["next"] % _FLUSH_EVERY == 0:
                chips.flush()
                write_json(partial / _PROGRESS, **_COMPACT_JSON, obj=state)
            bar.update(1)
            if on_chip is not None:
                on_chip(i)
    finally:
        bar.close()
        chips.flush()
        del chips
        if state["next"] % _FLUSH_EVERY:
            write_json(partial / _PROGRESS, **_COMPACT_JSON, obj=state)

    skipped = {s["index"] for s in state["skipped"]}
    kept = [e for i, e in enumerate(entries) if i not in skipped]
    if not kept:
        raise StoreError(f"none of the {n} files in {chips_dir} is a valid chip")
    os.truncate(partial / _CHIPS, len(kept) * int(np.prod(CHIP_SHAPE)))
    identities = sorted({e.identity for e in kept if e.identity})
    ident_index = {name: j for j, name in enumerate(identities)}
    labels = np.array([ident_index.get(e.identity, -1) for e in kept], dtype=np.int32)
    np.save(partial / _LABELS, labels)
    write_json(partial / _INDEX, **_COMPACT_JSON, obj={
        "version": STORE_VERSION, "count": len(kept), "chip_shape": list(CHIP_SHAPE),
        "chips_dir": str(chips_dir.resolve()), "identities": identities,
        "paths": [e.path for e in kept], "sources": [e.source for e in kept],
        "skipped": [{k: v for k, v in s.items() if k != "index"} for s in state["skipped"]],
    })
    os.unlink(partial / _PROGRESS)
    if store.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(store, old)
        os.replace(partial, store)
        shutil.rmtree(old)
    else:
        os.replace(partial, store)
    return ChipStore(store)


def _allocate(path: Path, size: int) -> None:
    """Reserve every block of the memory-mapped chip array before a chip is written: a sparse
    file on a full disk turns the first write into the map into SIGBUS (the process dies with
    exit 135 and no message); reserved up front, a full disk is one clear error here."""
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise StoreError(f"no space for the store: {size / 2**20:.0f} MiB needed in {path.parent}, "
                         f"{free / 2**20:.0f} MiB free")
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            f.truncate(0)
            raise StoreError(f"no space for the store in {path.parent}: {e.strerror} "
                             f"({size / 2**20:.0f} MiB needed)") from None


_STORE_FILES = frozenset({_CHIPS, _LABELS, _INDEX})


def is_store(path: Path) -> bool:
    """True only for a real folder that holds exactly what ``pack`` writes, with a readable
    ``index.json`` of a known store version: the one thing ``--overwrite`` may replace."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = {p.name for p in path.iterdir()}
        index = json.loads((path / _INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return names == _STORE_FILES and isinstance(index, dict) and index.get("version") == STORE_VERSION


def _is_partial_store(path: Path) -> bool:
    """True for an interrupted pack's ``.partial`` folder: only pack's own files (those of a
    finished store, its progress checkpoint and its temporary json)."""
    if path.is_symlink() or not path.is_dir():
        return False
    allowed = _STORE_FILES | {_PROGRESS} | {f".tmp-{n}" for n in (_INDEX, _PROGRESS)}
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return _CHIPS in names and names <= allowed


def _read_progress(partial: Path, fingerprint: str) -> dict | None:
    try:
        state = json.loads((partial / _PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("fingerprint") == fingerprint else None


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


class ChipStore:
    """A packed chip store opened read-only.

    ``chips`` is an (N, 150, 150, 3) uint8 ``np.memmap`` (RGB), ``labels`` int32 (N,)
    indices into ``identities`` (-1: no identity), ``paths[i]`` the chip file chip i came from
    (relative to the chips folder) and ``sources[i]`` its photo when known.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            index = json.loads((self.path / _INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.path} is not a chip store: {e}") from None
        if index.get("version") != STORE_VERSION:
            raise StoreError(f"{self.path}: store version {index.get('version')} not supported")
        n = int(index["count"])
        shape = (n, *index["chip_shape"])
        expected = int(np.prod(shape))
        actual = os.path.getsize(self.path / _CHIPS)
        if actual != expected:
            raise StoreError(f"{self.path / _CHIPS} has {actual} bytes, expected {expected}")
        self.chips = np.memmap(self.path / _CHIPS, dtype=np.uint8, mode="r", shape=shape)
        self.labels = read_npz(self.path / _LABELS, what="chip store labels file",
                               advice="pack the store again")[""]
        self.identities: list[str] = index["identities"]
        self.paths: list[str] = index["paths"]
        self.sources: list[str] = index["sources"]
        self.skipped: list[dict] = index["skipped"]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: slice | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chips, labels) for ``indices``: a slice is a view of the memory map (no copy); a
        list/array of indices is gathered into one (B, 150, 150, 3) array."""
        if isinstance(indices, slice):
            return self.chips[indices], self.labels[indices]
        idx = np.asarray(indices, dtype=np.int64)
        # A plain gather: sorting the indices first (file order) and un-permuting the result
        # measured 5x slower from the page cache.
        return np.asarray(self.chips[idx]), self.labels[idx]

    def __reduce__(self):
        # Pickled by path (DataLoader workers under spawn): each process maps the file itself
        # instead of receiving a copy of every chip.
        return (ChipStore, (self.path,))

    def identity_indices(self) -> dict[int, np.ndarray]:
        """label → sorted chip indices of that identity (chips without identity left out)."""
        return _group_by_label(self.labels)


def _group_by_label(labels: np.ndarray) -> dict[int, np.ndarray]:
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    groups = {}
    for part in np.split(order, bounds):
        if len(part) and labels[part[0]] >= 0:
            groups[int(labels[part[0]])] = part
    return groups


class ChipDataset:
    """Map-style torch dataset over a :class:`ChipStore` (or its path).

    Item i is ``(chip, label)``: chip a uint8 tensor (3, 150, 150) in RGB — what the port's
    input layer (``arch.DlibInput``) takes, it does dlib's (x − mean)/256 — and label a python
    int (-1 for no identity).  ``indices`` restricts the dataset to part of the store (a
    train/validation split); item i is store chip ``indices[i]``.

    ``transform(chip, rng)`` maps a (150, 150, 3) uint8 numpy chip to another (the signature
    of ``augment.Augment``).  Its generator is seeded by (``seed``, epoch, store index), so a
    sample's augmentation depends on nothing else (not on DataLoader workers or order): runs
    are reproducible and resumable.  Call :meth:`set_epoch` before iterating each epoch (with
    the default non-persistent DataLoader workers, which copy the dataset per epoch).

    An item may also be an ``(i, key)`` pair: its generator is then seeded by (``seed``,
    ``*key``) instead.  Fine-tuning passes (epoch, batch, position in the *global* batch), so a
    sample's augmentation is the same whatever the number of processes sharing the batch.
    ``targets`` replaces the labels returned (one per item: e.g. training class numbers).

    ``__getitems__`` makes a ``DataLoader`` fetch a whole batch with one gather from the
    memory map instead of one read per item.  Pass ``collate_fn=ChipDataset.collate``: the
    default collate works too, but its ``torch.stack`` runs on torch's intra-op threads, which
    on a busy machine was 10× slower than the numpy stack used here.
    """

    def __init__(self, store: ChipStore | str | os.PathLike, indices: Iterable[int] | None = None,
                 transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
                 seed: int = 0, targets: Sequence[int] | np.ndarray | None = None):
        self.store = store if isinstance(store, ChipStore) else ChipStore(store)
        self.indices = (np.arange(len(self.store)) if indices is None
                        else np.asarray(list(indices), dtype=np.int64))
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(self.store)):
            raise IndexError(f"indices outside the store's {len(self.store)} chips")
        if targets is not None and len(targets) != len(self.indices):
            raise ValueError(f"{len(targets)} targets for {len(self.indices)} items")
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def labels(self) -> np.ndarray:
        """Labels of this dataset's items, in item order (what :class:`PKBatchSampler` needs)."""
        return self.store.labels[self.indices] if self.targets is None else self.targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]) -> list:
        import torch

        keyed = len(items) > 0 and isinstance(items[0], tuple)
        positions = np.asarray([it[0] for it in items] if keyed else items, dtype=np.int64)
        rows = self.indices[positions]
        chips, labels = self.store.batch(rows)
        if self.targets is not None:
            labels = self.targets[positions]
        keys = [it[1] for it in items] if keyed else [(self.epoch, row) for row in rows.tolist()]
        out = []
        for key, chip, label in zip(keys, chips, labels.tolist()):
            if self.transform is not None:
                chip = self.transform(np.array(chip), np.random.default_rng([self.seed, *key]))
            out.append((torch.from_numpy(np.ascontiguousarray(chip.transpose(2, 0, 1))), label))
        return out

    @staticmethod
    def collate(samples: Sequence) -> tuple:
        """(chips uint8 (B, 3, 150, 150), labels int64 (B,)) from a list of items."""
        import torch

        chips = np.stack([chip.numpy() for chip, _ in samples])
        return torch.from_numpy(chips), torch.tensor([label for _, label in samples], dtype=torch.int64)


class PKBatchSampler:
    """Batches of ``p`` identities × ``k`` images each, for metric learning.

    dlib's metric loss learns from pairs inside a mini-batch, so every batch must hold several
    images of the same people; a random sampler almost never does.  Each epoch walks a fresh
    shuffle of the identities (each identity appears about equally often), and takes ``k``
    distinct images of each, drawing with replacement only when an identity has fewer than
    ``k``.  Identities with fewer than ``min_images`` images are left out (a lone image has
    no positive pair).  Yields lists of indices into ``labels`` (i.e. dataset items); use as a
    ``DataLoader(batch_sampler=...)``.  Deterministic for a given ``seed`` and
    :meth:`set_epoch`.

    ``batches`` per epoch defaults to (images in eligible identities) // (p·k), so one epoch
    sees about every image once.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, p: int, k: int, *,
                 batches: int | None = None, seed: int = 0, min_images: int = 2):
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1 (got p={p}, k={k})")
        self.groups = {lab: idx for lab, idx in _group_by_label(np.asarray(labels)).items()
                       if len(idx) >= min_images}
        if len(self.groups) < p:
            raise ValueError(f"p={p} identities per batch, but only {len(self.groups)} identities "
                             f"have at least {min_images} images")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        total = sum(len(v) for v in self.groups.values())
        self.batches = batches if batches is not None else max(1, total // (p * k))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        ids = np.array(sorted(self.groups))
        queue: list[int] = []   # the current shuffle of identities; the next one is at the end
        for _ in range(self.batches):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not queue:
                    queue = rng.permutation(ids).tolist()
                # Across a reshuffle an identity may come up twice for one batch: take the
                # next one not yet in it, leaving the other where it is for a later batch.
                j = next(j for j in range(len(queue) - 1, -1, -1) if queue[j] not in chosen)
                chosen.append(queue.pop(j))
            batch = []
            for lab in chosen:
                pool = self.groups[lab]
                pick = rng.choice(pool, size=self.k, replace=len(pool) < self.k)
                batch.extend(int(i) for i in pick)
            yield batch
