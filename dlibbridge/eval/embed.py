"""``dlibbridge embed``: a folder of photos or aligned chips → ``OUT.npz`` of descriptors.

The engines (dlib .dat through the torch port or dlib itself, dlibbridge checkpoints,
TorchScript, ONNX) are :mod:`dlibbridge.eval.evaluate`'s embedders, and images become chips as
``evaluate`` makes them (:class:`~dlibbridge.eval.evaluate.ChipSource`): a 150×150 image is
taken as an aligned chip, anything else is a photo, aligned as dlib does (detector, 5 landmarks,
``get_face_chip``; :class:`~dlibbridge.eval.evaluate.PhotoAlignment` says which face), so a
photo gives the same descriptor in both commands.  Images decode with dlib's own JPEG decoder.
An image that gives no chip (unreadable, no face with ``--no-fallback``) is listed with its
reason and left out.  Each descriptor is stored with its person (the first sub-folder below the
input, align's manifest ``identity``) and how its chip was made.

Decoding and aligning overlap the network: worker processes prepare the next batches while
the current one is embedded (:func:`dlibbridge.data.prefetch.prefetched`), so a run takes
about as long as the slower of the two stages, not their sum (docs/benchmarks.md).

Long runs are resumable: progress goes to ``OUT.partial.npz`` every few batches and a rerun
with the same model and image list continues from there.  ``OUT.npz`` is written atomically.

Under ``torchrun`` each process embeds a contiguous share of the sorted images, cut at batch
boundaries (:meth:`dlibbridge.port.dist.Dist.shard`), with its own ``OUT.rankRofW.partial.npz``
(kept until OUT is written, so a rerun redoes only unfinished shards); rank 0 gathers the
shares and writes OUT, identical to a single process's.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import sha256_file, write_npz
from .._load import DamagedFileError, read_npz
from .._lock import LOCK_NAME, folder_lock
from .._paths import resolved
from ..data.align import identity_of
from ..data.images import is_image_file, walk_files
from ..errors import DlibbridgeError
from ..options import DEVICE_AUTO

SAVE_EVERY_S = 30.0


class EmbedError(DlibbridgeError, ValueError):
    pass


@dataclass
class EmbedResult:
    out: Path
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    resumed_from: int = 0
    rank: int = 0      # under torchrun, this process's rank: only rank 0's result is the whole


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files below ``root`` (recursive, hidden entries skipped), as sorted POSIX paths
    relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise EmbedError(f"{root} is not a folder")
    return [rel for rel in walk_files(root) if is_image_file(rel)]


def _fingerprint(model: Path, engine: str, chips: str, files: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([sha256_file(model), engine, chips, files]).encode())
    return h.hexdigest()


def embed_folder(model: str, images_dir: str | os.PathLike, out: str | os.PathLike, *,
                 batch_size: int = 64, device: str = DEVICE_AUTO, engine: str = "torch",
                 progress: bool = True, workers: int | None = None,
                 alignment: "PhotoAlignment | None" = None) -> EmbedResult:
    """Embed every image below ``images_dir`` with ``model``; see the module docstring.
    ``workers``: processes decoding and aligning (0 = in this process; default
    :func:`~dlibbridge.data.prefetch.default_workers`); ``alignment``: how photos are aligned
    (default: ``evaluate``'s)."""
    from ..port.dist import init_distributed, rank_device
    from .embedders import ModelSpec, make_embedder
    from .evaluate import ChipSource, PhotoAlignment

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
    dist = init_distributed("cpu")
    lo, hi = dist.shard(len(files), batch_size)
    embedder = make_embedder(spec, device=rank_device(device, dist), batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)      # as every output's folder: made before the work
    loader = ChipSource(images_dir, None, workers=workers, **(alignment or PhotoAlignment()).alignment())
    # Under torchrun rank 0 holds OUT's lock for the job; the ranks' partial files are their own.
    lock = (folder_lock(out.parent, "dlibbridge embed", lock_file=out.with_name(f".{out.name}{LOCK_NAME}"))
            if dist.main else contextlib.nullcontext())
    with lock:
        return _embed(embedder, spec, files[lo:hi], images_dir, out, batch_size, progress, loader, dist)


def _embed(embedder, spec, files: list[str], images_dir: Path, out: Path, batch_size: int, progress: bool,
           loader: "ChipSource", dist) -> EmbedResult:
    from .._progress import progress_bar

    fp = _fingerprint(spec.path, spec.engine, loader.cache_tag(), files)
    partial = out.with_name(out.name + (f".rank{dist.rank}of{dist.world}" if dist.world > 1 else "") + ".partial.npz")
    done, kept, statuses, embs, skipped = 0, [], [], [], []
    if partial.is_file():
        try:
            z = read_npz(partial, what="partial embeddings")
            if str(z["fingerprint"]) == fp:
                done = int(z["done"])
                kept, statuses = z["paths"].tolist(), z["statuses"].tolist()
                embs = [z["embeddings"]]
                skipped = [tuple(x) for x in z["skipped"].tolist()]
        except (DamagedFileError, KeyError):
            done = 0   # unreadable partial progress (ours, remade from the chips): start over
    resumed_from = done

    def checkpoint(n: int) -> None:
        write_npz(partial, fingerprint=np.array(fp), done=np.array(n), paths=np.array(kept, dtype=str),
                  statuses=np.array(statuses, dtype=str),
                  embeddings=np.concatenate(embs) if embs else np.zeros((0, 128), np.float32),
                  skipped=np.array(skipped, dtype=str).reshape(-1, 2))

    last_save = time.monotonic()
    bar = progress_bar(total=len(files), initial=done, desc="embedding", unit="img", enabled=progress and dist.main)
    images = loader.load([images_dir / rel for rel in files[done:]], batch_size)
    try:
        with contextlib.closing(images):
            for start in range(done, len(files), batch_size):
                rels = files[start:start + batch_size]
                got = [(rel, chip, status) for rel, (chip, status) in zip(rels, itertools.islice(images, len(rels)))]
                skipped.extend((rel, status.removeprefix("failed:")) for rel, chip, status in got if chip is None)
                ok = [(rel, chip, status) for rel, chip, status in got if chip is not None]
                if ok:
                    embs.append(embedder.embed(np.stack([chip for _, chip, _ in ok])))
                    kept.extend(rel for rel, _, _ in ok)
                    statuses.extend(status for _, _, status in ok)
                bar.update(len(rels))
                done = start + len(rels)
                if time.monotonic() - last_save > SAVE_EVERY_S and done < len(files):
                    checkpoint(done)
                    last_save = time.monotonic()
    except KeyboardInterrupt:
        if done > resumed_from:         # Ctrl-C keeps every finished batch
            checkpoint(done)
        raise
    finally:
        bar.close()
    if dist.world > 1:
        # The finished shard stays on disk until OUT is written: a rerun after any rank failed
        # redoes only the shards that were not finished.
        checkpoint(done)
        shards = dist.gather_obj((kept, statuses, embs, skipped))
        if dist.main:
            kept = [p for k, _, _, _ in shards for p in k]
            statuses = [x for _, st, _, _ in shards for x in st]
            embs = [e for _, _, es, _ in shards for e in es]
            skipped = [x for _, _, _, sk in shards for x in sk]
    problem = None
    if dist.main:
        if not kept:
            problem = (f"none of the {len(skipped)} images below {images_dir} could be embedded "
                       f"(first problem: {skipped[0][0]}: {skipped[0][1]})")
        else:
            write_npz(out, paths=np.array(kept, dtype=str), embeddings=np.concatenate(embs).astype(np.float32),
                      identities=np.array([identity_of(rel) for rel in kept], dtype=str),
                      statuses=np.array(statuses, dtype=str),
                      skipped_paths=np.array([p for p, _ in skipped], dtype=str),
                      skipped_reasons=np.array([r for _, r in skipped], dtype=str))
    problem = dist.broadcast_obj(problem)
    if problem:
        raise EmbedError(problem)
    if partial.exists():
        partial.unlink()
    return EmbedResult(out, kept, skipped, resumed_from, dist.rank)
