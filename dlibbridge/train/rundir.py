"""A run directory's records: per-step and per-validation logs (CSV, JSON and, with the
``tensorboard`` extra installed, TensorBoard event files), curves, atomic torch saves."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .._io import write_atomic, write_csv, write_json


STEP_FIELDS = ["step", "epoch", "loss", "task_loss", "distill_loss", "lr", "images_per_s", "elapsed_s"]


def write_run_json(path: Path, obj) -> None:
    """A run's JSON records (numpy scalars and paths as plain values)."""
    write_json(path, obj, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_logs(run_dir: Path, steps: list[dict], vals: list[dict], step_fields: list[str] = STEP_FIELDS) -> None:
    """log.csv, val.csv, log.json, curves.png and (when ``tensorboard`` is importable) the
    TensorBoard event files, each replaced atomically."""
    write_csv(run_dir / "log.csv", steps, step_fields)
    val_fields = ["step", "epoch"] + sorted({k for v in vals for k in v} - {"step", "epoch"})
    write_csv(run_dir / "val.csv", vals, val_fields)
    write_run_json(run_dir / "log.json", {"steps": steps, "validation": vals})
    plot_curves(run_dir / "curves.png", steps, vals)
    if tensorboard_available():
        clock = {r["step"]: float(r["elapsed_s"]) for r in steps if r.get("elapsed_s") is not None}
        write_events(run_dir / TENSORBOARD_DIR / "events.out.tfevents.log", "log", steps, step_fields, clock)
        write_events(run_dir / TENSORBOARD_DIR / "events.out.tfevents.val", "val", vals, val_fields, clock)


#: Where a run's TensorBoard event files live: ``tensorboard --logdir RUN_DIR/tensorboard``.
TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package (``pip install 'dlibbridge[tensorboard]'``)
    is importable; without it a run writes every other log and no event files."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def write_events(path: Path, prefix: str, rows: list[dict], fields: list[str], clock: dict[int, float]) -> None:
    """``rows`` as one TensorBoard event file: each numeric field but ``step`` a scalar
    ``PREFIX/FIELD`` at the row's step — the columns of the CSV written from the same rows.

    The file is rewritten whole, atomically, at every log like the CSV beside it (a resumed
    run rewrites it from the full log: no duplicated points), so its name is fixed rather than
    TensorBoard's usual per-writer timestamp.  Wall times come from ``clock`` (step → the step
    row's ``elapsed_s``, time since the run started; a step without one keeps the previous
    row's), so the bytes depend on the log only and TensorBoard's "relative" axis is the run's
    own clock."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter
    buf = io.BytesIO()
    records = RecordWriter(buf)
    records.write(Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
    wall = 0.0
    for row in rows:
        wall = clock.get(row["step"], wall)
        values = [Summary.Value(tag=f"{prefix}/{f}", simple_value=float(row[f])) for f in fields
                  if f != "step" and isinstance(row.get(f), (int, float, np.integer, np.floating))
                  and not isinstance(row.get(f), bool)]
        records.write(Event(wall_time=wall, step=int(row["step"]),
                            summary=Summary(value=values)).SerializeToString())
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, buf.getvalue())


def plot_curves(path: Path, steps: list[dict], vals: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if steps:
        s = np.array([r["step"] for r in steps])
        loss = np.array([r["loss"] for r in steps], float)
        axes[0].plot(s, loss, lw=0.6, alpha=0.4, label="loss")
        win = max(1, len(loss) // 50)
        if win > 1:
            sm = np.convolve(loss, np.ones(win) / win, mode="valid")
            axes[0].plot(s[win - 1:], sm, lw=1.5, label=f"mean of {win}")
        axes[0].set_title("training loss")
        axes[0].legend()
        axes[1].plot(s, [r["lr"] for r in steps])
        axes[1].set_title("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if vals:
        vs = [v["step"] for v in vals]
        # A camera run validates in several domains: keys "DOMAIN.tar@far" etc.
        for key in sorted(k for k in vals[0] if k.rpartition(".")[2] in ("tar@far", "accuracy", "auc")):
            domain, _, name = key.rpartition(".")
            far = vals[0].get(f"{domain}.far" if domain else "far")
            label = f"TAR@FAR={far:g}" if name == "tar@far" else name
            axes[2].plot(vs, [v[key] for v in vals], marker="o", label=f"{domain}: {label}" if domain else label)
        axes[2].set_title("held-out identities")
        axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
