"""``dlibbridge cluster PHOTOS -o OUT``: group every face of a photo collection by person, with
dlib's ``chinese_whispers_clustering`` (its face-clustering example) on the model's descriptors.

``OUT`` gets a folder per cluster, largest first (``cluster_000``, ...), of symbolic links to
the source photos — never copies, and a photo with faces in several clusters is linked from
each — plus ``clusters.csv`` (one row per face, and per photo without one) and
``summary.json``.  OUT is a new folder, or one an earlier ``cluster`` wrote (replaced with
``--overwrite`` only while it holds nothing but what that run made): the result is built
beside it and swapped in, so user files are never deleted and an interrupted run leaves the
old result whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import TMP_PREFIX, csv_bytes, json_bytes, write_atomic
from ..options import option, overwrite_option, quiet_option, workers_option
from .faces import FacesError, ModelOptions, describe, descriptors, image_files
from .metrics import chinese_whispers

SUMMARY = "summary.json"
TABLE = "clusters.csv"
FIELDS = ["file", "face", "left", "top", "right", "bottom", "status", "cluster"]
FORMAT = "dlibbridge.cluster"


@dataclass
class ClusterArgs:
    photos: list[str] = option(help="photos, 150x150 chips or folders of them (recursive)", positional=True,
                               nargs="+", metavar="PHOTOS")
    out: str = option(help="folder to create: a folder of links per cluster, clusters.csv, summary.json",
                      flags=("-o", "--out"), required=True, metavar="OUT")
    workers: int | None = workers_option("processes detecting and aligning faces while the network runs "
                                         "(0: none; default: one per core)")
    overwrite: bool = overwrite_option("replace an OUT that an earlier cluster run wrote")
    progress: bool = quiet_option()


def _own_entries(out: Path) -> set[str] | None:
    """The names an earlier cluster run wrote in ``out`` (None: not such a folder)."""
    try:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        return None
    return {SUMMARY, TABLE} | {c["folder"] for c in summary.get("clusters", [])}


def check_out(out: Path, inputs: list[str], overwrite: bool) -> None:
    """OUT is new or empty, or an earlier result that ``--overwrite`` may replace; never
    inside an input folder (its links would be read as photos next time)."""
    from .._writable import check_output_dir
    for p in map(Path, inputs):
        if p.is_dir() and (out.resolve() == p.resolve() or p.resolve() in out.resolve().parents):
            raise FacesError(f"-o {out} is inside the input folder {p}; choose a folder outside it")
    check_output_dir(out, "-o")
    if out.is_dir() and any(out.iterdir()):
        own = _own_entries(out)
        if own is None:
            raise FacesError(f"-o {out} is a folder with files not written by dlibbridge cluster; choose a new folder")
        if not overwrite:
            raise FacesError(f"-o {out} holds an earlier clustering; give --overwrite to replace it")
        _check_only_links(out, own)


def _check_only_links(out: Path, own: set[str]) -> None:
    """Everything in ``out`` is what the earlier run made: its files and folders of links."""
    for entry in out.iterdir():
        if entry.name not in own or (entry.is_dir() and not entry.is_symlink()
                                     and any(not e.is_symlink() for e in entry.iterdir())):
            raise FacesError(f"-o {out} holds {entry.name}, which dlibbridge cluster did not write; "
                             "move it away or choose a new folder")


def cluster(photos: list[str], opts: ModelOptions, *, workers: int = 0, progress: bool = False) -> dict:
    """Faces of ``photos``, clustered: the summary written to ``summary.json`` (``rows`` are
    clusters.csv's)."""
    threshold = opts.threshold_for()
    files = image_files(photos)
    if not files:
        raise FacesError(f"no images in {' '.join(photos)}")
    faces, failed = describe(files, opts.embedder(), opts.align_settings("all"), workers=workers, progress=progress)
    if not faces:
        raise FacesError(f"no face found in {len(files)} images")
    labels = chinese_whispers(descriptors(faces), threshold.value)
    # Folder numbers by size, largest first (ties: first seen), not dlib's arbitrary label numbers.
    sizes = Counter(labels.tolist())
    first = {lab: i for i, lab in reversed(list(enumerate(labels.tolist())))}
    rank = {lab: n for n, lab in enumerate(sorted(sizes, key=lambda lab: (-sizes[lab], first[lab])))}
    width = max(3, len(str(len(rank) - 1)))
    folder = {lab: f"cluster_{n:0{width}d}" for lab, n in rank.items()}
    rows = [{"file": str(f.file), "face": f.index, **dict(zip(("left", "top", "right", "bottom"), f.box or ())),
             "status": "ok", "cluster": folder[lab]} for f, lab in zip(faces, labels.tolist())]
    rows += [{"file": str(f), "status": why} for f, why in failed]
    clusters = [{"folder": folder[lab], "faces": sizes[lab],
                 "files": sorted({str(f.file) for f, l2 in zip(faces, labels.tolist()) if l2 == lab})}
                for lab in sorted(rank, key=rank.get)]
    return {"format": FORMAT, "model": opts.model, "threshold": threshold.value,
            "threshold_source": threshold.source, "images": len(files), "faces": len(faces),
            "images_without_face": len(failed), "clusters": clusters, "rows": rows}


def _link_names(files: list[str]) -> list[str]:
    """A link name per file: its own name, numbered where two files of a cluster share one."""
    seen: Counter = Counter()
    names = []
    for f in files:
        name = os.path.basename(f)
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{seen[name]}_{name}")
    return names


def write_clusters(result: dict, out: str | os.PathLike) -> Path:
    """Build OUT beside it (a temporary folder), then swap it in; an earlier result in OUT
    (checked again: nothing but its own entries) is removed only after the swap."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    try:
        for c in result["clusters"]:
            d = tmp / c["folder"]
            d.mkdir()
            for f, name in zip(c["files"], _link_names(c["files"])):
                os.symlink(os.path.abspath(f), d / name)
        write_atomic(tmp / TABLE, csv_bytes(result["rows"], FIELDS))
        write_atomic(tmp / SUMMARY, json_bytes({k: v for k, v in result.items() if k != "rows"}))
        old = None
        if out.exists():
            own = _own_entries(out)
            if own is None and any(out.iterdir()):
                raise FacesError(f"-o {out} changed while clustering; the result is in {tmp}")
            if own is not None:
                _check_only_links(out, own)
            old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)       # the earlier result: folders of links and its two files
    return out


def run_cluster(args) -> int:
    """Every face in PHOTOS (photos: every face found, aligned as dlib does; 150x150 files are
    taken as chips) clustered by dlib's chinese_whispers at the threshold (--threshold, else the
    fine-tune run's recommended one, else dlib's 0.6) -> OUT/cluster_000 (the largest), ...:
    folders of symbolic links to the photos (never copies), plus clusters.csv and summary.json."""
    from ..data.prefetch import cores
    from ..options import given_fields
    if args.workers is not None and args.workers < 0:
        raise FacesError("--workers must be 0 or more")
    out = Path(args.out)
    check_out(out, args.photos, args.overwrite)
    result = cluster(args.photos, ModelOptions(**given_fields(ModelOptions, args)),
                     workers=cores() if args.workers is None else args.workers, progress=args.progress)
    write_clusters(result, out)
    sizes = [c["faces"] for c in result["clusters"]]
    print(f"{out}: {result['faces']} faces in {result['images']} images -> {len(sizes)} clusters "
          f"(largest {sizes[0]} faces; {sum(s == 1 for s in sizes)} single faces) at threshold "
          f"{result['threshold']:.4f} ({result['threshold_source']}); "
          f"{result['images_without_face']} images without a face")
    return 0
