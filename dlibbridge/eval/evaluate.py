"""``dlibbridge evaluate``: models side by side on LFW-style pairs and identity folders.

Pipeline: pairs (:mod:`dlibbridge.eval.pairs`, read or generated) → chips (already aligned, or
through the alignment pipeline :mod:`dlibbridge.data.align`) → descriptors from each model
(dlib's own package or the torch port, cached per model) → metrics
(:mod:`dlibbridge.eval.metrics`) → ``results.json`` (schema in docs/evaluation.md); the report
is drawn from the returned :class:`Evaluation` by :mod:`dlibbridge.eval.report`.

Why both engines: ``--engine dlib`` runs dlib's own ``compute_face_descriptor``, the torch
port runs ``dlibbridge.to_torch``; the same pairs through both must give the same numbers,
which is the port's end-to-end proof.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .._io import sha256_file, write_atomic, write_json
from .._paths import resolved
from ..options import option
from .metrics import (DLIB_THRESHOLD, FAR_TARGETS, FPIR_TARGET, clustering_metrics, cross_verification, far_key,
                      gallery_identification, kfold_decisions, one_per_person, pair_distances, rank1_identification,
                      verification_metrics)
from ..data.images import CHIP_SIZE
from .embedders import (EMBED_DIM, Embedder, EmbeddingCache, ModelSpec, content_key, default_cache_dir, label_models,
                        make_embedder)
from .pairs import (PairSet, fit_request, format_pairs, generate_pairs, read_pairs, resolve_pairs, scan_identities,
                    writable_identities)

RESULTS_SCHEMA_VERSION = 1


# ============================================================================ chips

class ChipSource:
    """Image file → the 150x150 chip dlib's network sees, and how it was obtained.

    Files that are already 150x150 are taken as chips (an aligned data set such as
    ``dlibbridge align``'s output or dlib's johns).  Anything else is aligned as
    :func:`dlibbridge.data.align.align` does — dlib's detector, 5-point landmarks and
    ``get_face_chip`` (:func:`~dlibbridge.data.align.align_photo`) — and its chip kept in
    ``chips_dir`` with align's journal and manifest, so later runs and other models align
    nothing again.

    :meth:`load` reads and aligns in worker processes (:func:`dlibbridge.data.prefetch.prefetched`,
    the mechanism ``embed`` decodes with) a few batches ahead of the caller, who embeds
    meanwhile: a run takes about as long as the slower of the two stages, not their sum.

    Status strings: ``chip``, ``detected``, ``fallback`` (no face found; the central box
    of ``--fallback center``, meant for pre-cropped sets like LFW) or ``failed:<reason>``.
    """

    #: Work per task handed to a worker, in chip decodes (~1 ms): large enough that the task's
    #: round trip is noise, small enough that the photos of a batch are spread over every
    #: worker and none finishes far behind the others.  Aligning a photo (dlib's detector,
    #: landmarks, the chip written and read back) costs ~40 decodes; counted as 8, a task is 4
    #: photos or 32 chips.
    CHUNK = 32
    ALIGN_COST = 8

    def __init__(self, data_root: Path, chips_dir: Path | None, detector: str = "hog", upsample: int = 1,
                 multi: str = "center", fallback: str | None = "center", workers: int | None = None):
        from ..data.align import AlignSettings
        self.data_root = Path(data_root)
        self.settings = AlignSettings(detector=detector, upsample=upsample, multi=multi, fallback=fallback)
        self.workers = workers
        self.chips_dir = None if chips_dir is None else Path(chips_dir)   # None: a temporary folder
        self._tmp = None
        self._sources: dict | None = None       # rel → data.align.Source (chip names as align gives them)
        self._rows: dict[str, list[dict]] = {}  # photos loaded so far → their manifest rows

    def cache_tag(self) -> str:
        """Names everything that changes a raw photo's chip, for the descriptor cache."""
        s = self.settings
        return f"{s.detector}-up{s.upsample}-{s.multi}-{s.fallback or 'nofallback'}"

    @classmethod
    def in_cache(cls, data_root: Path, cache_dir: Path | None, **kw) -> "ChipSource":
        """Chips kept under ``cache_dir/chips/<folder>-<path hash>-<settings>`` (a fresh
        temporary folder without a cache)."""
        src = cls(data_root, None, **kw)
        if cache_dir is not None:
            root = resolved(data_root, "--data")
            h = hashlib.sha256(str(root).encode()).hexdigest()[:12]
            src.chips_dir = Path(cache_dir) / "chips" / f"{root.name}-{h}-{src.cache_tag()}"
        return src

    @staticmethod
    def _is_chip_sized(path: Path) -> bool:
        from PIL import Image
        try:
            with Image.open(path) as im:
                return im.size == (CHIP_SIZE, CHIP_SIZE)
        except Exception:                  # unreadable: the alignment pipeline reports why
            return False

    def _journal(self):
        from ..data.align import Journal, list_sources
        if self.chips_dir is None:
            import tempfile
            self._tmp = tempfile.TemporaryDirectory(prefix="dlibbridge-chips-")
            self.chips_dir = Path(self._tmp.name)
        self.chips_dir.mkdir(parents=True, exist_ok=True)
        if self._sources is None:
            self._sources = {s.rel: s for s in list_sources(self.data_root)}
        return Journal(self.data_root, self.chips_dir, self.settings, command="dlibbridge evaluate")

    def _task(self, path: Path, chip_sized: bool, journal) -> tuple:
        """What a worker does for ``path`` (see :func:`_load`); photos an earlier run aligned
        only have their chip read."""
        if chip_sized:
            return ("read", str(path), "chip", "failed:")
        rel = path.relative_to(self.data_root).as_posix()
        src = self._sources.get(rel)
        if src is None:                    # a hidden file: no chip name of align's
            return ("done", "failed:not_aligned")
        try:
            sha = sha256_file(path) if path.stat().st_size else ""
        except OSError:                    # unreadable: aligning it records why
            sha = ""
        rows = journal.finished(rel, sha)
        if rows is None:
            return ("align", str(self.data_root), str(self.chips_dir), src, self.settings, sha)
        self._rows[rel] = rows
        return _chip_task(self.chips_dir, rows)

    def load(self, paths: Sequence[Path], batch_size: int = 64) -> Iterator[tuple[np.ndarray | None, str]]:
        """(chip or None, status) of each path, in order.  Photos aligned now are recorded in
        ``chips_dir``'s journal as the caller takes them, so an interrupted run keeps them;
        ``batch_size``: how many images the caller takes at a time (the workers keep that
        much ready beyond their own tasks).  Workers: ``self.workers``, else
        :func:`~dlibbridge.data.prefetch.default_workers` (more when photos need aligning)."""
        from ..data.align import hog_detector_pickle, use_hog_detector_pickle, write_manifest
        from ..data.prefetch import default_workers, prefetched
        paths = [Path(p) for p in paths]
        chip_sized = [self._is_chip_sized(p) for p in paths]
        journal = None if all(chip_sized) else self._journal()
        try:
            tasks = [self._task(p, c, journal) for p, c in zip(paths, chip_sized)]
            aligning = any(t[0] == "align" for t in tasks)
            chunks = self._chunks(tasks)
            workers = default_workers(len(tasks), batch_size, aligning=aligning) if self.workers is None \
                else self.workers
            workers = min(workers, len(chunks))
            hog = hog_detector_pickle() if aligning and workers and self.settings.detector == "hog" else None
            per_batch = math.ceil(batch_size * len(chunks) / len(tasks)) if tasks else 0   # tasks of one batch
            results = prefetched(_load_chunk, chunks, workers, ahead=2 * workers + per_batch,
                                 initializer=use_hog_detector_pickle, initargs=(hog,))
            with contextlib.closing(results):
                for chunk, got in zip(chunks, results):
                    for task, (chip, status, rows) in zip(chunk, got):
                        if rows is not None:
                            src, sha = task[3], task[5]
                            journal.record(src, sha, rows)
                            self._rows[src.rel] = rows
                        yield chip, status
        finally:
            if journal is not None:
                journal.close()
                write_manifest(self.chips_dir, [r for rel in sorted(self._rows) for r in self._rows[rel]])


    def _chunks(self, tasks: list[tuple]) -> list[list[tuple]]:
        chunks, chunk, cost = [], [], 0
        for t in tasks:
            chunk.append(t)
            cost += self.ALIGN_COST if t[0] == "align" else 1
            if cost >= self.CHUNK:
                chunks.append(chunk)
                chunk, cost = [], 0
        return chunks + [chunk] if chunk else chunks


def _chip_task(chips_dir: Path | str, rows: list[dict]) -> tuple:
    """The task for a photo whose manifest rows are known: read its chip, or nothing to do.
    One chip per photo under evaluate's center/largest policies."""
    r = rows[0]
    if r.get("chip") and r["status"] in ("ok", "fallback"):
        return ("read", str(Path(chips_dir) / r["chip"]), "detected" if r["status"] == "ok" else "fallback",
                "failed:chip_")
    return ("done", f"failed:{r.get('reason') or r['status']}")


def _load(task: tuple) -> tuple[np.ndarray | None, str, list[dict] | None]:
    """One image in a worker (or in the caller with no workers): ``("read", file, status,
    failure prefix)`` decodes a chip; ``("align", data root, chips dir, source, settings,
    sha256)`` aligns a photo, writes its chip and returns the manifest rows to record;
    ``("done", status)`` is a photo known to have no chip."""
    from ..data.images import ImageReadError, read_image
    kind = task[0]
    if kind == "done":
        return None, task[1], None
    rows = None
    if kind == "align":
        from ..data.align import align_photo
        _, root, chips_dir, src, settings, sha = task
        rows = align_photo(root, chips_dir, src, settings, sha)
        task = _chip_task(chips_dir, rows)
        if task[0] == "done":
            return None, task[1], rows
    _, path, status, failed = task
    try:
        chip = read_image(path).rgb
    except ImageReadError as e:
        return None, f"{failed}{e.reason}", rows
    if status != "chip" and chip.shape != (CHIP_SIZE, CHIP_SIZE, 3):
        return None, "failed:chip_size", rows
    return chip, status, rows


def _load_chunk(tasks: list[tuple]) -> list[tuple[np.ndarray | None, str, list[dict] | None]]:
    return [_load(t) for t in tasks]


# ============================================================================ evaluation

@dataclass
class EvalConfig:
    """Everything ``dlibbridge evaluate`` takes; defaults are the protocol's."""
    models: list[ModelSpec] = option(
        positional=True, nargs="+", metavar="MODEL",
        help="dlib .dat, dlibbridge torch checkpoint, TorchScript or ONNX file; 'default' = the installed dlib "
             "model; prefix dlib: or torch: to pick the engine for one model")
    data: Path = option(help="identity folders: DIR/<person>/<image>", required=True, type=Path, metavar="DIR")
    pairs: Path | None = option(None, "LFW pairs.txt to evaluate on (with --gen-pairs: where to save the generated "
                                "pairs)", type=Path, metavar="PAIRS")
    gen_pairs: int | None = option(None, "generate N balanced pairs in identity-disjoint folds from DIR (seeded, "
                                   "saved for reuse)", type=int, metavar="N")
    n_folds: int = option(10, "folds for --gen-pairs", flags=("--folds",), metavar="K")
    seed: int = option(0, "seed for --gen-pairs and the gallery split")
    report: Path | None = option(None, "write report.html/report.md, plots and worst errors here", type=Path,
                                 metavar="OUT_DIR")
    json_path: Path | None = option(None, "results.json path (default: OUT_DIR/results.json or ./results.json)",
                                    flags=("--json",), type=Path, metavar="PATH")
    flip: bool = option(False, "average each descriptor with its mirror image's", action="store_true")
    jitter: int = option(0, "average N of dlib's random jitters per face (dlib's 99.38%% LFW figure used 100)",
                         metavar="N", show_default=False)
    identification: bool = option(True, "skip rank-1 and clustering", flags=("--no-identification",),
                                  action="store_false")
    probes: Path | None = option(None, "the same people's pictures from another camera, DIR/<person>/<image>: "
                                 "also each --data photo (the enrolment) against each probe, and the probes "
                                 "identified in a gallery of one --data photo per person", type=Path, metavar="DIR")
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    detector: str = option("hog", "face detector for non-chip images", choices=("hog", "cnn"), show_default=False)
    upsample: int = option(1, "detector upsampling", metavar="N")
    multi: str = option("center", "several faces in a photo: the most central (default; LFW's subject is centred) "
                        "or largest", choices=("center", "largest"))
    fallback: str | None = option("center", "photos without a detected face get no chip (default: a central box, as "
                                  "for LFW crops)", flags=("--no-fallback",), action="store_const", const=None)
    workers: int | None = option(None, "processes decoding and aligning images while the network runs (0: none; "
                                 "default: one per core when photos need aligning, else as embed's: one per core "
                                 "beyond the first, none for small sets)", hidden_flags=("--jobs", "-j"), type=int,
                                 metavar="N")
    device: str = option("cpu", "torch device, e.g. cuda")
    batch_size: int = option(64, "faces per forward pass", metavar="N")
    progress: bool = option(True, "no progress bars", flags=("--quiet", "-q"), action="store_false")


def load_pairs_for(cfg: EvalConfig, identities: dict[str, list[str]]) -> tuple[PairSet, Path | None]:
    """Read ``--pairs``, or generate ``--gen-pairs N`` and save it (to ``--pairs`` when
    given, else beside results.json).  An existing file is reused only if it is exactly
    what this seed generates; otherwise we refuse rather than overwrite someone's pairs."""
    if cfg.gen_pairs is None:
        if cfg.pairs is None:
            raise ValueError("give --pairs FILE (LFW pairs.txt format) or --gen-pairs N")
        return read_pairs(cfg.pairs), cfg.pairs
    identities, unwritable = writable_identities(identities)
    if unwritable:
        print(f"note: {len(unwritable)} photos left out of the generated pairs: a pairs file cannot hold names "
              f"with whitespace (e.g. {unwritable[0]!r}); rename them to include them", file=sys.stderr)
    n_pairs, n_folds, notes = fit_request(identities, cfg.gen_pairs, cfg.n_folds, cfg.seed)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    ps = generate_pairs(identities, n_pairs, n_folds, cfg.seed)
    out = cfg.pairs or results_path(cfg).with_name(f"pairs-{n_pairs}-seed{cfg.seed}.txt")
    text = format_pairs(ps)
    if out.exists():
        if out.read_text(encoding="utf-8", errors="replace") != text:
            raise FileExistsError(f"{out} exists and differs from the pairs --gen-pairs {cfg.gen_pairs} "
                                  f"--seed {cfg.seed} makes; drop --gen-pairs to evaluate on it, or pick another path")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text.encode("utf-8"))
    return ps, out


def results_path(cfg: EvalConfig) -> Path:
    if cfg.json_path is not None:
        return cfg.json_path
    return (cfg.report if cfg.report is not None else Path.cwd()) / "results.json"


def compute_embeddings(paths: Sequence[Path], embedders: Sequence[Embedder], loader: ChipSource,
                       cache_dir: Path | None, batch_size: int = 64, progress: bool = True,
                       save_every_s: float = 60.0) -> tuple[list[np.ndarray], list[str]]:
    """Descriptors of every image for every model (NaN rows where no chip could be made)
    and each image's chip status.  Each image is read and aligned once for all models
    that lack it in their cache, by ``loader``'s workers while the network embeds the batch
    before (the batches are the same with or without workers); caches are saved every
    ``save_every_s`` seconds and on exit, so an interrupted run picks up where it stopped."""
    import time
    from tqdm import tqdm
    keys = [content_key(p) for p in tqdm(paths, desc="hashing images", unit="img", disable=not progress,
                                         leave=False)]
    tag = loader.cache_tag()
    caches = [EmbeddingCache(None if cache_dir is None else Path(cache_dir) / f"{e.cache_name()}-{tag}.npz")
              for e in embedders]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}     # images with the same bytes: the first
    todo = sorted(i for k, i in first.items() if any(k not in c for c in caches))
    last_save = time.monotonic()
    images = loader.load([paths[i] for i in todo], batch_size)
    try:
        with contextlib.closing(images), tqdm(total=len(todo), desc="embedding", unit="img",
                                              disable=not progress or not todo) as bar:
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                loaded = list(itertools.islice(images, len(idx)))
                ok = [j for j, (chip, _) in enumerate(loaded) if chip is not None]
                chips = np.stack([loaded[j][0] for j in ok]) if ok else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
                for emb, cache in zip(embedders, caches):
                    need = [j for j in ok if keys[idx[j]] not in cache]
                    vecs = emb.embed(chips[[ok.index(j) for j in need]]) if need else []
                    for j, v in zip(need, vecs):
                        cache.put(keys[idx[j]], v, loaded[j][1])
                    for j, (chip, status) in enumerate(loaded):
                        if chip is None and keys[idx[j]] not in cache:
                            cache.put(keys[idx[j]], None, status)
                bar.update(len(idx))
                if time.monotonic() - last_save > save_every_s:
                    for c in caches:
                        c.save()
                    last_save = time.monotonic()
    finally:
        for c in caches:
            c.save()
    out = [np.stack([c.emb[k] for k in keys]) if keys else np.zeros((0, EMBED_DIM), np.float32) for c in caches]
    return out, [caches[0].status[k] for k in keys] if caches else []


@dataclass
class ModelOutcome:
    """One model's results.json entry plus the per-pair arrays the report draws from
    (only pairs whose two images produced a descriptor)."""
    spec: ModelSpec
    metrics: dict
    dist: np.ndarray
    same: np.ndarray
    decided_same: np.ndarray
    pair_paths: list[tuple[Path, Path]]


@dataclass
class Evaluation:
    results: dict
    outcomes: list[ModelOutcome]
    loader: ChipSource
    results_file: Path
    image_status: dict[Path, str] = field(default_factory=dict)   # how each image's chip was made


def _model_entry(spec: ModelSpec, emb: np.ndarray, i1, i2, same, folds, pair_paths, ident) -> ModelOutcome:
    valid = np.isfinite(emb[i1]).all(1) & np.isfinite(emb[i2]).all(1)
    if valid.sum() == 0:
        raise ValueError(f"{spec.name}: no pair has descriptors for both images (did alignment fail everywhere?)")
    dist = pair_distances(emb[i1[valid]], emb[i2[valid]])
    s, f = same[valid], folds[valid]
    multi = len(np.unique(f)) >= 2
    m = {"name": spec.name, "path": str(spec.path), "engine": spec.engine, "sha256": sha256_file(spec.path)}
    m.update(verification_metrics(dist, s, f if multi else None))
    m["skipped_pairs"] = int((~valid).sum())
    decided = kfold_decisions(dist, s, f) if multi else dist < m["best_threshold"]
    if ident is not None:
        rows, labels = ident
        ok = np.isfinite(emb[rows]).all(1)
        e, lab = emb[rows[ok]], labels[ok]
        m["identification"] = {**rank1_identification(e, lab), "clustering": clustering_metrics(e, lab)}
    else:
        m["identification"] = None
    paths = [pp for pp, v in zip(pair_paths, valid) if v]
    return ModelOutcome(spec, m, dist, s, decided, paths)


def enrolled_vs_probe(cfg: EvalConfig, embedders: Sequence[Embedder], images: Sequence[Path],
                      embs: Sequence[np.ndarray]) -> list[dict]:
    """``--probes``: per model, the deployment's figures — every enrolled photo (the images of
    the pairs) against every probe of the enrolled people, a pair of one source photo (same
    person folder and file stem in both folders) left out; and each probe identified in a
    gallery of one enrolled photo per person (seeded), the gallery photo's own probe left out."""
    found = scan_identities(cfg.probes)
    people = {p.parent.name for p in images}
    paths = [cfg.probes / n / f for n in sorted(found) if n in people for f in found[n]]
    if not paths:
        raise ValueError(f"--probes {cfg.probes}: none of its people is among the enrolled (--data) pairs' people")
    loader = ChipSource.in_cache(cfg.probes, cfg.cache_dir, detector=cfg.detector, upsample=cfg.upsample,
                                 multi=cfg.multi, fallback=cfg.fallback, workers=cfg.workers)
    probe_embs, _ = compute_embeddings(paths, embedders, loader, cfg.cache_dir and cfg.cache_dir / "embeddings",
                                       cfg.batch_size, cfg.progress)
    e_lab, p_lab = (np.array([p.parent.name for p in ps]) for ps in (images, paths))
    e_src, p_src = (np.array([f"{p.parent.name}/{p.stem}" for p in ps]) for ps in (images, paths))
    out = []
    for enrol, probe in zip(embs, probe_embs):
        e_ok = np.isfinite(enrol).all(1)
        p_ok = np.isfinite(probe).all(1) & np.isin(p_lab, e_lab[e_ok])
        e, el, es = enrol[e_ok], e_lab[e_ok], e_src[e_ok]
        pe, pl, ps = probe[p_ok], p_lab[p_ok], p_src[p_ok]
        gallery = one_per_person(el, cfg.seed)
        searched = ~np.isin(ps, es[gallery])
        out.append({"probes": str(cfg.probes), "n_probe_images": len(paths), "n_probes_embedded": int(p_ok.sum()),
                    "verification": cross_verification(e, el, pe, pl, es, ps),
                    "identification": gallery_identification(e[gallery], el[gallery], pe[searched], pl[searched])})
    return out


def _status_counts(status: Sequence[str]) -> dict:
    out = {"total": len(status), "chip": 0, "detected": 0, "fallback": 0, "failed": 0}
    for st in status:
        kind = st.split(":", 1)[0]
        out[kind if kind in out else "failed"] += 1
    return out


def run(cfg: EvalConfig) -> Evaluation:
    """The whole ``dlibbridge evaluate``: pairs, alignment, descriptors (cached), metrics,
    results.json.  The report is drawn separately from the returned Evaluation."""
    import datetime
    from .. import __version__
    if not cfg.models:
        raise ValueError("no model to evaluate")
    models = label_models(cfg.models)
    identities = scan_identities(cfg.data)
    # every model is opened (and a bad one refused) before anything is written
    embedders = [make_embedder(m, cfg.flip, cfg.jitter, cfg.device, cfg.batch_size) for m in models]
    ps, pairs_file = load_pairs_for(cfg, identities)
    pair_paths = resolve_pairs(ps, cfg.data, identities)
    images = sorted({p for ab in pair_paths for p in ab})   # identification too works on these
    index = {p: i for i, p in enumerate(images)}
    in_folder = sum(len(files) for files in identities.values())
    if in_folder > len(images):
        print(f"note: {in_folder - len(images)} of the {in_folder} images in {cfg.data} are in no pair: "
              "not aligned or embedded", file=sys.stderr)
    loader = ChipSource.in_cache(cfg.data, cfg.cache_dir, detector=cfg.detector, upsample=cfg.upsample,
                                 multi=cfg.multi, fallback=cfg.fallback, workers=cfg.workers)
    embs, status = compute_embeddings(images, embedders, loader, cfg.cache_dir and cfg.cache_dir / "embeddings",
                                      cfg.batch_size, cfg.progress)

    i1 = np.array([index[a] for a, _ in pair_paths], np.int64)
    i2 = np.array([index[b] for _, b in pair_paths], np.int64)
    same = np.array([p.same for p in ps.pairs()], bool)
    folds = ps.fold_ids()
    ident = None
    if cfg.identification:
        ident = (np.arange(len(images), dtype=np.int64), np.array([p.parent.name for p in images]))
    outcomes = [_model_entry(spec, e, i1, i2, same, folds, pair_paths, ident) for spec, e in zip(models, embs)]
    if cfg.probes is not None:
        for o, figures in zip(outcomes, enrolled_vs_probe(cfg, embedders, images, embs)):
            o.metrics["enrolled_vs_probe"] = figures

    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "dlibbridge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": str(cfg.data),
        "pairs": {"file": None if pairs_file is None else str(pairs_file), "n_folds": ps.n_folds,
                  "per_fold": ps.per_fold, "n_pairs": len(pair_paths),
                  "generated": None if cfg.gen_pairs is None else {"n": len(pair_paths), "seed": cfg.seed}},
        "options": {"flip": cfg.flip, "jitter": cfg.jitter, "detector": cfg.detector, "upsample": cfg.upsample,
                    "multi": cfg.multi, "fallback": cfg.fallback, "threshold_fixed": DLIB_THRESHOLD,
                    "far_targets": [far_key(f) for f in FAR_TARGETS]},
        "images": {**_status_counts(status), "not_in_pairs": in_folder - len(images)},
        "models": [o.metrics for o in outcomes],
    }
    out = results_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, _jsonable(results))
    return Evaluation(results, outcomes, loader, out, dict(zip(images, status)))


def _jsonable(x):
    """JSON has no inf/nan: such values become null (TAR@FAR threshold when every
    impostor may be accepted, metrics undefined for a degenerate set)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3f}"


def format_table(results: dict) -> str:
    """The terminal summary: one row per model, percentages."""
    head = ["model", f"acc {results['pairs']['n_folds']}-fold", "acc@0.6", "AUC", "EER", "TAR@1e-3", "TAR@1e-4", "best thr", "rank-1", "purity",
            "clusters/ids"]
    rows = []
    for m in results["models"]:
        acc = "-" if m["accuracy"] is None else f"{_pct(m['accuracy'])} ± {_pct(m['accuracy_std'])}"
        idn = m.get("identification") or {}
        cl = idn.get("clustering") or {}
        rows.append([m["name"], acc, _pct(m["accuracy_at_0.6"]), f"{m['auc']:.5f}", _pct(m["eer"]),
                     _pct(m["tar_at_far"].get("1e-3")), _pct(m["tar_at_far"].get("1e-4")),
                     f"{m['best_threshold']:.4f}", _pct(idn.get("rank1")), _pct(cl.get("purity")),
                     f"{cl['n_clusters']}/{cl['n_identities']}" if cl else "-"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    n = results["pairs"]["n_pairs"]
    notes = [f"{n} pairs in {results['pairs']['n_folds']} fold(s); accuracies, EER and TAR in %"]
    for m in results["models"]:
        if m["skipped_pairs"]:
            notes.append(f"{m['name']}: {m['skipped_pairs']} pair(s) skipped (an image gave no face chip)")
        ep = m.get("enrolled_vs_probe")
        if ep:
            v, i = ep["verification"], ep["identification"]
            notes.append(f"{m['name']}: enrolled (--data) vs probe (--probes): TAR@1e-3 {_pct(v['tar_at_far']['1e-3'])}, "
                         f"acc@0.6 {_pct(v['accuracy_at_0.6'])}, acc@best {_pct(v['accuracy_at_best_threshold'])} "
                         f"(thr {v['best_threshold']:.4f}); rank-1 {_pct(i['rank1'])}, "
                         f"TPIR@FPIR={FPIR_TARGET:g} {_pct(i['tpir'])} ({i['n_probes']} probes, {i['n_gallery']} enrolled)")
        coarse = [k for k, d in m["tar_at_far_details"].items() if d["far_resolution"] > float(k)]
        if coarse:
            notes.append(f"{m['name']}: {m['n_different']} impostor pairs cannot resolve FAR "
                         f"{' or '.join(coarse)}; TAR@{'/'.join(coarse)} is TAR at FAR=0")
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + notes)
