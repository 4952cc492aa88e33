"""``dlibbridge compare A B``: are two photos (or aligned chips) the same person, by a model at
its threshold?  One line for people, ``--json`` for programs."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..options import option
from .faces import FacesError, ModelOptions, describe
from .metrics import pair_distances

#: One face per photo: the largest, as ``dlibbridge align`` keeps by default.
ONE_FACE = ("largest", "center")


@dataclass
class CompareArgs:
    a: str = option(help="photo or 150x150 aligned chip", positional=True, metavar="A")
    b: str = option(help="photo or 150x150 aligned chip", positional=True, metavar="B")
    multi: str = option("largest", "several faces in a photo: compare the largest or the most central",
                        choices=ONE_FACE)
    json: bool = option(False, "one JSON object instead of the sentence", action="store_true")


def compare(a: str, b: str, opts: ModelOptions, multi: str = "largest") -> dict:
    """Distance between the faces of ``a`` and ``b`` and the decision at the model's threshold
    (dlib's rule: the same person when the distance is below it)."""
    threshold = opts.threshold_for()
    faces, failed = describe([a, b], opts.embedder(batch_size=2), opts.align_settings(multi))
    if failed:
        raise FacesError("; ".join(f"{f}: no face ({why})" for f, why in failed))
    d = float(pair_distances(faces[0].descriptor[None], faces[1].descriptor[None])[0])
    return {"a": str(a), "b": str(b), "distance": d, "same": d < threshold.value, "threshold": threshold.value,
            "threshold_source": threshold.source, "model": opts.model}


def run_compare(args) -> int:
    """A and B (photos: the face is found and aligned as dlib does; or 150x150 chips) -> their
    descriptor distance and the decision at the threshold (--threshold, else the fine-tune
    run's recommended one for its model.dat/model.pt, else dlib's 0.6)."""
    from ..options import given_fields
    r = compare(args.a, args.b, ModelOptions(**given_fields(ModelOptions, args)), args.multi)
    if args.json:
        json.dump(r, sys.stdout)
        print()
    else:
        verdict = "same person" if r["same"] else "different people"
        print(f"{verdict}: distance {r['distance']:.4f} {'<' if r['same'] else '>='} threshold "
              f"{r['threshold']:.4f} ({r['threshold_source']})")
    return 0
