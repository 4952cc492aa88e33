"""Seed corpus for the codec fuzzer, made from the real dlib files (never committed).

Small inputs mutate fast, so besides the smaller files whole, each file contributes its
leading bytes (wrapper versions, loss and input records, the first layers) and a few
synthetic files whose tensors were emptied, which keeps every record type while staying
a few kB.
"""
from __future__ import annotations

import bz2
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def real_files() -> dict[str, bytes]:
    from dlibbridge import assets
    files = {p.name: p.read_bytes() for p in (assets.face_model_path(), assets.cnn_face_detector_path())}
    for p in sorted((REPO.parent / "shared" / "models").glob("*.dat.bz2")):
        files[p.name[:-4]] = bz2.open(p).read()
    return files


def shrunk(data: bytes) -> bytes:
    """The same network with every tensor emptied: all record kinds, a few kB."""
    import dlibbridge
    m = dlibbridge.loads(data)
    for t in m.trailers:  # keep one cascade of two trees of any shape_predictor
        t.forests = [f[:2] for f in t.forests[:1]]
        t.anchor_idx, t.deltas = t.anchor_idx[:1], t.deltas[:1]
    for e in m.walk():
        for rec in (getattr(e.node, "details", None), getattr(e.node, "input", None)):
            if rec is None:
                continue
            for name, f in rec.items():
                if f.type == "tensor":
                    f.value = np.zeros((0, 0, 0, 0), np.float32)
    return dlibbridge.dumps(m)


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    seeds = []
    for name, data in real_files().items():
        seeds.append(data[:4096])
        small = shrunk(data)
        seeds.append(small[:8192])
        if len(data) <= 8192:
            seeds.append(data)
    for s in seeds:
        (d / hashlib.sha1(s).hexdigest()).write_bytes(s)
    print(f"{len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main(sys.argv[1])
