"""``dlibbridge identify --gallery GALLERY PROBES``: who is each face, against an enrolled gallery.

The gallery is one folder per person (``GALLERY/<person>/<photo or chip>``, one face per
photo: the largest); each probe face gets the ``--top-k`` nearest people, a person's distance
being that of their nearest gallery face, and the identity of the nearest one — or
``unknown`` when even that one is not below the threshold (dlib's rule for "same person").
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import csv_bytes, write_atomic
from ..options import option, overwrite_option, quiet_option, workers_option
from .compare import ONE_FACE
from .faces import FacesError, ModelOptions, Threshold, describe, descriptors, image_files
from .pairs import scan_identities

UNKNOWN = "unknown"
BASE_FIELDS = ["probe", "face", "left", "top", "right", "bottom", "status", "identity", "distance"]


@dataclass
class IdentifyArgs:
    probes: list[str] = option(help="photos, 150x150 chips or folders of them (recursive)", positional=True,
                               nargs="+", metavar="PROBES")
    gallery: str = option(help="enrolled people: GALLERY/<person>/<photos or chips>", required=True,
                          metavar="GALLERY_DIR")
    out: str | None = option(None, "CSV to write (default: standard output)", flags=("-o", "--out"),
                             metavar="OUT.csv")
    top_k: int = option(3, "nearest people listed per face", flags=("--top-k", "-k"), metavar="K")
    multi: str = option("all", "faces of a probe photo: all, or only the largest or most central",
                        choices=("all",) + ONE_FACE)
    workers: int | None = workers_option("processes detecting and aligning faces while the network runs "
                                         "(0: none; default: one per core)")
    overwrite: bool = overwrite_option("replace an existing OUT.csv written by identify")
    progress: bool = quiet_option()


def fields(top_k: int) -> list[str]:
    return BASE_FIELDS + [f"{what}_{i}" for i in range(1, top_k + 1) for what in ("person", "distance")]


def _is_identify_csv(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n").split(",")[:len(BASE_FIELDS)] == BASE_FIELDS


def identify(gallery: str | Path, probes: list[str], opts: ModelOptions, *, top_k: int = 3, multi: str = "all",
             workers: int = 0, progress: bool = False) -> tuple[list[dict], Threshold]:
    """One row per probe face (and per probe file without one, its ``status`` the reason):
    see :data:`BASE_FIELDS` and :func:`fields`."""
    if top_k < 1:
        raise FacesError("--top-k must be at least 1")
    threshold = opts.threshold_for()
    people = scan_identities(gallery)
    files = [Path(gallery) / person / name for person, names in people.items() for name in names]
    probe_files = image_files(probes)
    if not probe_files:
        raise FacesError(f"no images in {' '.join(probes)}")
    embedder = opts.embedder()
    enrolled, failed = describe(files, embedder, opts.align_settings(ONE_FACE[0]), workers=workers,
                                progress=progress, desc="gallery")
    for f, why in failed:
        print(f"gallery: {f} left out: {why}", file=sys.stderr)
    if not enrolled:
        raise FacesError(f"no face found in the gallery {gallery}")
    names = np.array([f.file.parent.name for f in enrolled])
    persons = sorted(set(names))
    gallery_emb = descriptors(enrolled).astype(np.float64)
    found, failed = describe(probe_files, embedder, opts.align_settings(multi), workers=workers, progress=progress,
                             desc="probes")
    rows = [{"probe": str(f), "status": why} for f, why in failed]
    for face in found:
        d = np.sqrt(((gallery_emb - face.descriptor.astype(np.float64)) ** 2).sum(1))
        per_person = np.array([d[names == p].min() for p in persons])
        order = np.argsort(per_person, kind="stable")[:top_k]
        best = float(per_person[order[0]])
        row = {"probe": str(face.file), "face": face.index, "status": "ok", "distance": best,
               "identity": persons[order[0]] if best < threshold.value else UNKNOWN}
        row.update(zip(("left", "top", "right", "bottom"), face.box or (None,) * 4))
        for i, j in enumerate(order, 1):
            row[f"person_{i}"], row[f"distance_{i}"] = persons[j], float(per_person[j])
        rows.append(row)
    order = {str(f): i for i, f in enumerate(probe_files)}
    rows.sort(key=lambda r: (order[r["probe"]], r.get("face") or 0))
    return rows, threshold


def run_identify(args) -> int:
    """Each face in PROBES (photos: every face found, aligned as dlib does; or 150x150 chips)
    against the people of GALLERY_DIR: a CSV row per face with the nearest person and distance
    (identity 'unknown' when not below the threshold: --threshold, else the fine-tune run's
    recommended one, else dlib's 0.6) and the --top-k nearest people."""
    from .._writable import check_output_file
    from ..data.prefetch import cores
    from ..options import given_fields
    if args.out:
        if Path(args.out).exists() and not args.overwrite:
            raise FacesError(f"-o {args.out} exists; give --overwrite to replace it")
        check_output_file(args.out, "-o", kind="a CSV written by identify", is_kind=_is_identify_csv)
    if args.workers is not None and args.workers < 0:
        raise FacesError("--workers must be 0 or more")
    rows, threshold = identify(args.gallery, args.probes, ModelOptions(**given_fields(ModelOptions, args)),
                               top_k=args.top_k, multi=args.multi,
                               workers=cores() if args.workers is None else args.workers, progress=args.progress)
    data = csv_bytes(rows, fields(args.top_k))
    faces = [r for r in rows if r["status"] == "ok"]
    known = sum(r["identity"] != UNKNOWN for r in faces)
    note = (f"{len(faces)} faces: {known} identified, {len(faces) - known} unknown at threshold "
            f"{threshold.value:.4f} ({threshold.source}); {len(rows) - len(faces)} files without a face")
    if args.out:
        write_atomic(args.out, data)
        print(f"{args.out}: {note}")
    else:
        sys.stdout.write(data.decode("utf-8"))
        print(note, file=sys.stderr)
    return 0
