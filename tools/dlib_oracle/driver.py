"""Python side of ``dlib_oracle``: build it once (cached, see build.py) and run its
subcommands with numpy arrays in and out.

Used by the tests (session fixture ``dlib_oracle`` in tests/conftest.py) and by
``make_loss_metric_golden.py``.  Chips travel as raw uint8 N×150×150×3 RGB files, results as
raw float32, so no image codec sits between Python and dlib.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as _build  # noqa: E402  (sibling module, not a package)

EMBED_MODES = ("anet", "anet-file", "batch", "single")


class OracleError(RuntimeError):
    """dlib_oracle exited with an error; ``text`` is what it printed (dlib's exception text)."""

    def __init__(self, cmd: list[str], text: str):
        self.text = text
        super().__init__(f"dlib_oracle {' '.join(cmd[1:2])} failed: {text.strip()}")


@dataclass
class TrainResult:
    losses: list[float]
    output: Path
    log: str


class DlibOracle:
    def __init__(self, binary: str | Path | None = None, workdir: str | Path | None = None):
        self.binary = Path(binary) if binary is not None else _build.build()
        self._tmp = tempfile.TemporaryDirectory(prefix="dlib_oracle-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)
        self._n = 0

    def _file(self, suffix: str) -> Path:
        self._n += 1
        return self.workdir / f"{self._n:04d}{suffix}"

    def run(self, *args, timeout: float | None = 1800) -> str:
        cmd = [str(self.binary), *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = r.stdout + r.stderr
        if r.returncode != 0:
            raise OracleError(cmd, text)
        return text

    def _chips(self, chips: np.ndarray) -> Path:
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        if chips.ndim != 4 or chips.shape[1:] != (150, 150, 3):
            raise ValueError(f"chips must be N×150×150×3 uint8, got {chips.shape}")
        path = self._file(".u8")
        chips.tofile(path)
        return path

    def _labels(self, labels) -> Path:
        path = self._file(".txt")
        path.write_text(" ".join(str(int(v)) for v in labels) + "\n")
        return path

    def load(self, net_file: str | Path, net_type: str = "net") -> str:
        """Deserialize into dlib's ``net_type`` ("net", bn_con) or ``anet_type`` ("anet",
        affine); returns the oracle's message, raises :class:`OracleError` with dlib's
        exception text when dlib refuses the file."""
        return self.run("load", net_file, net_type)

    def embed(self, net_file: str | Path, chips: np.ndarray, mode: str) -> np.ndarray:
        """N×128 float32 descriptors; ``mode`` as in oracle.cpp (anet, anet-file, batch, single)."""
        if mode not in EMBED_MODES:
            raise ValueError(f"mode must be one of {EMBED_MODES}")
        out = self._file(".f32")
        self.run("embed", net_file, self._chips(chips), mode, out)
        return np.fromfile(out, np.float32).reshape(len(chips), -1)

    def train(self, net_file: str | Path, chips: np.ndarray, labels, steps: int, lr: float,
              out: str | Path, batch: int = 0) -> TrainResult:
        """``steps`` dnn_trainer steps (sgd(0.0005, 0.9), learning rate ``lr``) on batches of
        ``batch`` consecutive chips (0 = all), cycling; returns each step's loss."""
        text = self.run("train", net_file, self._chips(chips), self._labels(labels), int(steps), repr(float(lr)),
                        out, int(batch))
        losses = [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", text, re.M)]
        return TrainResult(losses, Path(out), text)

    def loss_metric(self, embeddings: np.ndarray, labels, margin: float = 0.04,
                    dist_thresh: float = 0.6) -> tuple[float, np.ndarray]:
        """dlib's ``loss_metric_::compute_loss_value_and_gradient`` on an N×K embedding."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        emb, grad = self._file(".f32"), self._file(".f32")
        x.tofile(emb)
        text = self.run("loss-metric", emb, self._labels(labels), x.shape[1], repr(float(margin)),
                        repr(float(dist_thresh)), grad)
        loss = float(re.search(r"^loss (\S+)$", text, re.M).group(1))
        return loss, np.fromfile(grad, np.float32).reshape(x.shape)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
