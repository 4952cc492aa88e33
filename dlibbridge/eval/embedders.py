"""Aligned chips → descriptors: dlib itself, the torch port, ONNX and TorchScript files behind one interface.

``ModelSpec`` names a model as the command line does (``dlib``, ``default``, a .dat, .pt, .onnx
or TorchScript file, optionally ``name=path``); :func:`make_embedder` opens it, and
:class:`EmbeddingCache` keeps each model's descriptors of each chip across runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import sha256_file, write_npz
from .._load import DamagedFileError, read_npz
from ..assets import resolve_model
from ..data.images import CHIP_SIZE
from ..port.infer import EMBED_DIM, in_batches, torch_forward



class Embedder:
    """Aligned 150x150 RGB chips (N,150,150,3 uint8) → descriptors (N,128 float32).

    One subclass per engine.  ``flip`` averages each chip's descriptor with its mirror
    image's; ``jitter`` > 1 averages that many of dlib's random jitters (``dlib.jitter_image``,
    the routine behind ``compute_face_descriptor(num_jitters=...)`` and dlib's 99.38% LFW
    figure) — both average raw descriptors without renormalising, as dlib does."""

    engine = ""

    def __init__(self, path: Path, flip: bool = False, jitter: int = 0):
        self.path = Path(path)
        self.flip = bool(flip)
        self.jitter = int(jitter)
        if self.jitter < 0:
            raise ValueError("jitter must be >= 0")

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected uint8 chips of shape (N,{CHIP_SIZE},{CHIP_SIZE},3), got {chips.dtype} {chips.shape}")
        if len(chips) == 0:
            return np.zeros((0, EMBED_DIM), np.float32)
        e = self._embed(chips)
        if self.flip:
            e = (e + self._embed(np.ascontiguousarray(chips[:, :, ::-1]))) / np.float32(2)
        return np.asarray(e, np.float32)

    def cache_name(self) -> str:
        """Everything that changes the numbers: model bytes, engine, augmentation."""
        stem = self.path.name.rsplit(".", 1)[0]
        opts = ("-flip" if self.flip else "") + (f"-jitter{self.jitter}" if self.jitter > 1 else "")
        return f"{stem}-{sha256_file(self.path)[:16]}-{self.engine}{opts}"


class DlibEmbedder(Embedder):
    """The reference: the ``dlib`` Python package's own batched descriptor call."""

    engine = "dlib"

    def __init__(self, path, flip=False, jitter=0):
        super().__init__(path, flip, jitter)
        import dlib
        try:
            self._net = dlib.face_recognition_model_v1(str(self.path))
        except RuntimeError as e:
            raise ValueError(f"dlib cannot load {self.path} as a face recognition model: {e}") from None

    def _embed(self, chips):
        out = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], self.jitter)
        return np.array([np.asarray(v) for v in out], np.float32)


class _NetEmbedder(Embedder):
    """Engines that take uint8 RGB chips (N,150,150,3) as they are (the port, TorchScript,
    ONNX: what the module and its exports take).  Jitter uses dlib's own ``jitter_image`` so
    these engines draw from the same distribution of crops as dlib's ``num_jitters``."""

    def __init__(self, path, flip=False, jitter=0, batch_size: int = 64):
        super().__init__(path, flip, jitter)
        self.batch_size = int(batch_size)

    def _forward_batch(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _forward(self, chips: np.ndarray) -> np.ndarray:
        return in_batches(self._forward_batch, chips, self.batch_size)

    def _embed(self, chips):
        if self.jitter <= 1:               # dlib: num_jitters 0 and 1 both mean "no jitter"
            return self._forward(chips)
        import dlib
        return np.stack([self._forward(np.stack(dlib.jitter_image(np.ascontiguousarray(c), self.jitter))).mean(0)
                         for c in chips])


class TorchEmbedder(_NetEmbedder):
    """The torch port of a dlib file, a dlibbridge checkpoint (e.g. fine-tuned) or a
    TorchScript export."""

    engine = "torch"

    def __init__(self, path, module, flip=False, jitter=0, device: str = "cpu", batch_size: int = 64):
        super().__init__(path, flip, jitter, batch_size)
        import torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self._run = torch_forward(self.module, self.device)

    def _forward_batch(self, x):
        return self._run(x)


class OnnxEmbedder(_NetEmbedder):
    """An ONNX export (``dlibbridge export --onnx``) through onnxruntime."""

    engine = "onnx"

    def __init__(self, path, flip=False, jitter=0, batch_size: int = 64):
        super().__init__(path, flip, jitter, batch_size)
        import onnxruntime as ort
        try:
            self._sess = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as e:             # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {self.path}: {e}") from None
        first = self._sess.get_inputs()[0]
        if first.type != "tensor(uint8)":
            raise ValueError(f"{self.path} takes {first.type} input, not the uint8 chips (N,H,W,3) that "
                             "`dlibbridge export --onnx` writes today: export the model again")
        self._input = first.name

    def _forward_batch(self, x):
        return self._sess.run(None, {self._input: x})[0]


@dataclass
class ModelSpec:
    """One MODEL argument: a file and the engine that runs it.  ``dlib:PATH`` /
    ``torch:PATH`` override ``--engine`` per model, so one run can put both engines side
    by side; ``default`` names the installed dlib face model; ``.onnx`` files always run
    in onnxruntime."""
    path: Path
    engine: str
    name: str = ""

    @staticmethod
    def parse(arg: str, engine: str = "torch") -> "ModelSpec":
        for prefix in ("dlib", "torch"):
            if arg.startswith(prefix + ":"):
                engine, arg = prefix, arg[len(prefix) + 1:]
                break
        if engine not in ("dlib", "torch"):
            raise ValueError(f"unknown engine {engine!r} (torch or dlib)")
        path = resolve_model(arg)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found")
        if path.suffix.lower() == ".onnx":
            if engine == "dlib":
                raise ValueError(f"the dlib engine runs dlib .dat files, not {path.name}")
            engine = "onnx"
        elif engine == "dlib" and (path.suffix.lower() != ".dat" or _sniff(path) == "torchscript"):
            raise ValueError(f"the dlib engine runs dlib .dat files, not {path.name}")
        stem = path.name.rsplit(".", 1)[0]
        return ModelSpec(path, engine, f"{stem} [{engine}]")


def label_models(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Labels that tell the models apart in tables, plots and report folders: a label that
    two models share (``run/model.dat`` and ``cam/model.dat`` are both "model [torch]") becomes
    the shortest end of their paths that differs (``run/model.dat [torch]``).  The same file
    twice on the same engine cannot be told apart and is refused."""
    out = list(specs)
    for name in {s.name for s in specs}:
        group = [i for i, s in enumerate(specs) if s.name == name]
        if len(group) < 2:
            continue
        parts = [specs[i].path.resolve().parts for i in group]
        for k in range(1, max(map(len, parts)) + 1):
            tails = ["/".join(p[-k:]) for p in parts]
            if len(set(tails)) == len(tails):
                break
        else:
            raise ValueError(f"{specs[group[0]].path} is given twice for the {specs[group[0]].engine} engine")
        for i, tail in zip(group, tails):
            out[i] = dataclasses.replace(specs[i], name=f"{tail} [{specs[i].engine}]")
    return out


def make_embedder(spec: ModelSpec, flip: bool = False, jitter: int = 0, device: str = "cpu",
                  batch_size: int = 64) -> Embedder:
    if spec.engine == "dlib":
        return DlibEmbedder(spec.path, flip, jitter)
    if spec.engine == "onnx":
        return OnnxEmbedder(spec.path, flip, jitter, batch_size)
    from ..port.checkpoint import open_model
    if _sniff(spec.path) == "torchscript":
        _check_exported_input(spec.path)
    try:
        module = open_model(spec.path)
    except RuntimeError as e:              # a damaged TorchScript archive
        raise ValueError(f"cannot load model {spec.path}: {e}") from None
    except ValueError as e:                # DlibFormatError, ConversionError: say which file
        raise ValueError(f"cannot load {spec.path} as a face model: {e}") from None
    return TorchEmbedder(spec.path, module, flip, jitter, device, batch_size)


def _check_exported_input(path: Path) -> None:
    """A TorchScript archive runs here only if it records that it takes uint8 chips
    (N,H,W,3): an archive without the record (an older export took float NCHW, as may one
    from elsewhere) would give wrong descriptors, not an error."""
    import zipfile

    from ..port.export import INPUT_SPEC_FILE
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith(f"/extra/{INPUT_SPEC_FILE}") for n in z.namelist()):
            raise ValueError(f"{path} does not record its input ({INPUT_SPEC_FILE}); only TorchScript archives "
                             "written by `dlibbridge export --torchscript` (uint8 chips N,H,W,3) run here: "
                             "export the model again")


def _sniff(path: Path) -> str:
    from ..port.checkpoint import sniff     # torch is imported only when a file must be told apart
    return sniff(path)


class EmbeddingCache:
    """Descriptors of one model configuration, keyed by image *content* (so renaming or
    copying a dataset keeps its cache).  Failed images are cached too, with their reason,
    so a rerun does not retry detection.  Saved atomically; an interrupted run resumes
    from the last save."""

    def __init__(self, path: Path | None):
        self.path = path
        self.emb: dict[str, np.ndarray] = {}
        self.status: dict[str, str] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                z = read_npz(path, what="embedding cache")
                for k, e, s in zip(z["keys"].tolist(), z["embeddings"], z["status"].tolist()):
                    self.emb[k], self.status[k] = e, s
            except (DamagedFileError, KeyError) as e:
                print(f"warning: ignoring unreadable embedding cache {path} ({e})", file=sys.stderr)
                self.emb.clear()
                self.status.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.emb

    def put(self, key: str, emb: np.ndarray | None, status: str) -> None:
        self.emb[key] = np.full(EMBED_DIM, np.nan, np.float32) if emb is None else np.asarray(emb, np.float32)
        self.status[key] = status
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        keys = list(self.emb)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(self.path, keys=np.array(keys, dtype=str),
                  embeddings=np.stack([self.emb[k] for k in keys]).astype(np.float32),
                  status=np.array([self.status[k] for k in keys], dtype=str))
        self.dirty = False


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dlibbridge/evaluate`` (``~/.cache/...``): chips/ and embeddings/."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlibbridge" / "evaluate"


def content_key(path: Path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
