"""A run directory's logs (dlibbridge.train.rundir): TensorBoard event files beside log.csv.

The event files are read back with TensorBoard's own EventAccumulator and compared with the
CSV files written from the same rows, field by field."""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from dlibbridge.train import rundir


def _steps(n: int) -> list[dict]:
    return [{"step": s, "epoch": s // 4, "loss": 1.0 / s, "task_loss": 0.9 / s, "distill_loss": None,
             "lr": 1e-4 * 0.9 ** s, "images_per_s": 100.0 + s, "elapsed_s": 0.5 * s} for s in range(1, n + 1)]


def _vals(steps: list[int]) -> list[dict]:
    return [{"step": s, "epoch": s // 4, "tar@far": 0.5 + s / 100, "far": 1e-3, "accuracy": 0.9} for s in steps]


def _csv_scalars(path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k != "step" and v != "":
                    out.setdefault(f"{prefix}/{k}", []).append((int(row["step"]), float(v)))
    return out


def _event_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / rundir.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        [s for s, _ in a[k]] == [s for s, _ in b[k]]
        and all(math.isclose(x, y, rel_tol=1e-6) for (_, x), (_, y) in zip(a[k], b[k])) for k in a)


def test_event_files_carry_the_scalars_of_log_csv_and_val_csv(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    rundir.write_logs(tmp_path, _steps(5), _vals([4]))
    rundir.write_logs(tmp_path, _steps(9), _vals([4, 8]))     # a later log: the whole file again
    events = _event_scalars(tmp_path)
    want = {**_csv_scalars(tmp_path / "log.csv", "log"), **_csv_scalars(tmp_path / "val.csv", "val")}
    assert "log/loss" in events and "val/tar@far" in events and "log/distill_loss" not in events
    assert [s for s, _ in events["log/loss"]] == list(range(1, 10))     # no point twice
    assert _same(events, want)


def test_without_tensorboard_a_run_writes_every_other_log(tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from pathlib import Path\nfrom dlibbridge.train import rundir\n"
            f"rundir.write_logs(Path({str(tmp_path)!r}), [{{'step': 1, 'loss': 1.0, 'lr': 1e-4}}], [])\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "log.csv").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / rundir.TENSORBOARD_DIR).exists()
