"""``dlibbridge embed``: a folder of aligned chips → ``OUT.npz`` of descriptors.

The engines (dlib .dat through the torch port or dlib itself, dlibbridge checkpoints,
TorchScript, ONNX) are :mod:`dlibbridge.eval.evaluate`'s embedders; images are decoded by
:func:`dlibbridge.data.images.read_image` (dlib's own JPEG decoder, so a chip gives the descriptor
dlib's pipeline would).  A chip that is not exactly 150×150 or cannot be read is listed with
its reason and left out — never resized, since a resized chip is a different face to the
network.

Decoding overlaps the network: worker processes read the next batches while the current
one is embedded (:func:`dlibbridge.data.prefetch.prefetched`, shared with ``evaluate``), so a
run takes about as long as the slower of the two stages, not their sum (docs/benchmarks.md).

Long runs are resumable: progress goes to ``OUT.partial.npz`` every few batches and a rerun
with the same model and image list continues from there.  ``OUT.npz`` is written atomically.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import sha256_file, write_npz
from .._load import DamagedFileError, read_npz
from .._lock import LOCK_NAME, folder_lock
from .._paths import resolved
from ..data.images import CHIP_SHAPE, is_image_file, walk_files
from ..data.prefetch import default_workers, prefetched
from ..errors import DlibbridgeError

SAVE_EVERY_S = 30.0


class EmbedError(DlibbridgeError, ValueError):
    pass


@dataclass
class EmbedResult:
    out: Path
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    resumed_from: int = 0


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files below ``root`` (recursive, hidden entries skipped), as sorted POSIX paths
    relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise EmbedError(f"{root} is not a folder")
    return [rel for rel in walk_files(root) if is_image_file(rel)]


def _read_chip(path: Path) -> np.ndarray:
    from ..data.images import read_image
    rgb = read_image(path).rgb
    if rgb.shape != CHIP_SHAPE:
        raise ValueError(f"wrong size: {rgb.shape[1]}x{rgb.shape[0]}, an aligned chip is "
                         f"{CHIP_SHAPE[1]}x{CHIP_SHAPE[0]} (align with `dlibbridge align`)")
    return rgb


def _read_batch(images_dir: Path, rels: list[str]) -> tuple[list[str], np.ndarray | None, list[tuple[str, str]]]:
    """Chips of one batch: (paths read, their stacked chips or None, (path, reason) skipped)."""
    from ..data.images import ImageReadError
    paths, chips, skipped = [], [], []
    for rel in rels:
        try:
            chips.append(_read_chip(images_dir / rel))
            paths.append(rel)
        except (ImageReadError, ValueError) as e:
            skipped.append((rel, str(e)))
    return paths, (np.stack(chips) if chips else None), skipped


def _batches(images_dir: Path, files: list[str], start: int, batch_size: int, workers: int):
    """(end index, paths, chips, skipped) per batch from ``start``, in order; with workers,
    up to two batches per worker are decoded ahead while the caller embeds."""
    starts = range(start, len(files), batch_size)
    reads = prefetched(functools.partial(_read_batch, images_dir), (files[i:i + batch_size] for i in starts), workers)
    with contextlib.closing(reads):
        for i, batch in zip(starts, reads):
            yield (min(i + batch_size, len(files)),) + batch


def _fingerprint(model: Path, engine: str, files: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([sha256_file(model), engine, files]).encode())
    return h.hexdigest()


def embed_folder(model: str, images_dir: str | os.PathLike, out: str | os.PathLike, *,
                 batch_size: int = 64, device: str = "cpu", engine: str = "torch",
                 progress: bool = True, workers: int | None = None) -> EmbedResult:
    """Embed every chip below ``images_dir`` with ``model``; see the module docstring.
    ``workers``: decode processes (0 = decode in this process; default
    :func:`default_workers`)."""
    from .embedders import ModelSpec, make_embedder

    if batch_size < 1:
        raise EmbedError("batch size must be at least 1")
    if workers is not None and workers < 0:
        raise EmbedError("workers must be 0 or more")
    images_dir, out = Path(images_dir), Path(out)
    spec = ModelSpec.parse(model, engine)
    if resolved(out, "-o") == resolved(spec.path, "MODEL"):
        raise EmbedError(f"refusing to write the output over the model {spec.path}")
    files = list_images(images_dir)
    if not files:
        raise EmbedError(f"no images found below {images_dir}")
    embedder = make_embedder(spec, device=device, batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)      # as every output's folder: made before the work
    with folder_lock(out.parent, "dlibbridge embed", lock_file=out.with_name(f".{out.name}{LOCK_NAME}")):
        return _embed(embedder, spec, files, images_dir, out, batch_size, progress, workers)


def _embed(embedder, spec, files: list[str], images_dir: Path, out: Path, batch_size: int, progress: bool,
           workers: int | None) -> EmbedResult:
    from tqdm import tqdm

    fp = _fingerprint(spec.path, spec.engine, files)
    partial = out.with_name(out.name + ".partial.npz")
    done, kept, embs, skipped = 0, [], [], []
    if partial.is_file():
        try:
            z = read_npz(partial, what="partial embeddings")
            if str(z["fingerprint"]) == fp:
                done = int(z["done"])
                kept = z["paths"].tolist()
                embs = [z["embeddings"]]
                skipped = [tuple(x) for x in z["skipped"].tolist()]
        except (DamagedFileError, KeyError):
            done = 0   # unreadable partial progress (ours, remade from the chips): start over
    resumed_from = done

    def checkpoint(n: int) -> None:
        write_npz(partial, fingerprint=np.array(fp), done=np.array(n), paths=np.array(kept, dtype=str),
                  embeddings=np.concatenate(embs) if embs else np.zeros((0, 128), np.float32),
                  skipped=np.array(skipped, dtype=str).reshape(-1, 2))

    last_save = time.monotonic()
    bar = tqdm(total=len(files), initial=done, desc="embedding", unit="img", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    nworkers = default_workers(len(files) - done, batch_size) if workers is None else workers
    try:
        with contextlib.closing(_batches(images_dir, files, done, batch_size, nworkers)) as batches:
            for end, batch_paths, chips, batch_skipped in batches:
                skipped.extend(batch_skipped)
                if chips is not None:
                    embs.append(embedder.embed(chips))
                    kept.extend(batch_paths)
                bar.update(end - done)
                done = end
                if time.monotonic() - last_save > SAVE_EVERY_S and done < len(files):
                    checkpoint(done)
                    last_save = time.monotonic()
    except KeyboardInterrupt:
        if done > resumed_from:         # Ctrl-C keeps every finished batch
            checkpoint(done)
        raise
    finally:
        bar.close()
    if not kept:
        raise EmbedError(f"none of the {len(files)} images below {images_dir} could be embedded "
                         f"(first problem: {skipped[0][0]}: {skipped[0][1]})")
    write_npz(out, paths=np.array(kept, dtype=str), embeddings=np.concatenate(embs).astype(np.float32),
              skipped_paths=np.array([p for p, _ in skipped], dtype=str),
              skipped_reasons=np.array([r for _, r in skipped], dtype=str))
    if partial.exists():
        partial.unlink()
    return EmbedResult(out, kept, skipped, resumed_from)
