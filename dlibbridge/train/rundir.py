"""A run folder's records: per-step and per-validation logs (CSV, JSON and, with the
``tensorboard`` extra installed, TensorBoard event files), curves and the model card."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .._io import write_atomic, write_csv, write_json


#: log.csv's columns, the same for every run: the total loss, then each term
#: (:data:`.objective.TERMS`; empty where a recipe has no such term).
STEP_FIELDS = ["step", "epoch", "lr", "loss", "identity", "distill", "xq", "relational", "images_per_s", "elapsed_s"]


def write_run_json(path: Path, obj) -> None:
    """A run's JSON records (numpy scalars and paths as plain values)."""
    write_json(path, obj, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_logs(run_dir: Path, steps: list[dict], vals: list[dict]) -> None:
    """log.csv, val.csv, log.json, curves.png and (when ``tensorboard`` is importable) the
    TensorBoard event files, each replaced atomically."""
    step_fields = STEP_FIELDS
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


_CURVE_TERMS = ("identity", "distill", "xq", "relational")
_VAL_METRICS = (("tar@far", "TAR at FAR {far:g}"), ("accuracy_at_0.6", "accuracy at dlib's 0.6"),
                ("accuracy", "accuracy at the best threshold"), ("best_threshold", "best threshold (distance)"))


def plot_curves(path: Path, steps: list[dict], vals: list[dict]) -> None:
    """One panel per quantity — the loss and each of its terms, the learning rate, and each
    validation metric with one line per domain — every axis labelled, integer steps."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    panels = []
    if steps:
        s = np.array([r["step"] for r in steps])
        for key in ("loss",) + _CURVE_TERMS:
            y = np.array([np.nan if r.get(key) is None else r[key] for r in steps], float)
            if np.isfinite(y).any():
                panels.append(("training loss" if key == "loss" else f"loss term: {key}", "loss", [(s, y, key)]))
        panels.append(("learning rate", "learning rate", [(s, np.array([r["lr"] for r in steps], float), "lr")]))
    if vals:
        vs = np.array([v["step"] for v in vals])
        domains = sorted({k.split(".", 1)[0] for k in vals[0] if "." in k})
        for metric, label in _VAL_METRICS:
            lines = [(vs, np.array([v[f"{d}.{metric}"] for v in vals], float), d) for d in domains
                     if f"{d}.{metric}" in vals[0]]
            if lines:
                far = vals[0].get(f"{domains[0]}.far", 0)
                panels.append((f"held-out people: {label.format(far=far)}", label.format(far=far), lines))
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        for i, (x, y, name) in enumerate(lines):
            validation = len(lines) > 1 or title.startswith("held-out")
            # equal values (every domain at 1.0) must not hide each other: own style and size each
            ax.plot(x, y, marker="osD^"[i % 4] if validation else None, ms=9 - 2 * i, lw=1.2,
                    ls=("-", "--", ":", "-.")[i % 4], label=name)
            if not validation and len(y) >= 100:       # a noisy per-step curve: its running mean too
                win = len(y) // 50
                ax.plot(x[win - 1:], np.convolve(y, np.ones(win) / win, mode="valid"), lw=2,
                        label=f"mean of {win} steps")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(lines) > 1 or any(len(y) >= 100 for _, y, _ in lines):
            ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_model_card(run_dir: Path, summary: dict, cfg, origin: dict, base: dict, config: dict) -> None:
    """README.md of a finished run: what was trained from what, on what, with which recipe,
    every validation figure against the base per domain (with how finely the pairs resolve it),
    the threshold to use, and how to load the files in dlib, face_recognition and PyTorch."""
    data = config.get("data", {})
    lines = ["# Fine-tuned dlib face model", ""]
    if summary.get("exports_base_model"):
        lines += ["**The exported model is the base model (step 0), unchanged**: no validated training step "
                  "beat it on the held-out people. See *Selection* below for what to change.", ""]
    lines += ["## What", "",
              f"* base model: `{base['path']}` (sha256 `{base['sha256']}`)",
              f"* exported: step {summary['exported_step']} of {summary['final_step']} "
              f"(`--export {cfg.export}`), files: {', '.join(f'`{f}`' for f in summary['files'])}",
              f"* dlib check: `model.dat` loaded in {summary['export_check']['loaded_by']} gives the torch model's "
              f"descriptors to {summary['export_check']['max_abs_diff']:.1e}",
              "", "## Data", "",
              f"* {data.get('identities')} people, {data.get('images')} chips; trained on "
              f"{data.get('train_identities')} people ({data.get('train_images')} chips), validated on "
              f"{len(data.get('val_identities') or [])} held-out people ({data.get('val_images')} chips)",
              "", "## Recipe", "",
              f"* recipe: `{cfg.recipe or 'none'}`" + (f", camera profile `{cfg.camera}`" if cfg.camera else ""),
              "* options not at their default (origin in brackets): " + ", ".join(
                  f"`{k}={v}` ({origin.get(k, 'default')})" for k, v in sorted(cfg.to_json().items())
                  if origin.get(k, "default") != "default" and k not in ("data", "out")),
              "", "## Figures against the base (held-out people)", ""]
    domains = summary.get("domains") or {}
    if not domains:
        lines += ["No held-out people: nothing was measured. Hold people out (`--val-identities`) to know "
                  "whether the model is better than the base.", ""]
    else:
        lines += ["| domain | pairs same / different | finest FAR | metric | base | exported |", "|---|---|---|---|---|---|"]
        for d, fig in domains.items():
            b, e = fig["base"], fig["exported"] or {}
            res = f"{1 / b['pairs_different']:.1e}" if b.get("pairs_different") else "-"
            for key, name in (("tar@far", f"TAR at FAR {b.get('far', 0):g}"), ("accuracy_at_0.6", "accuracy at 0.6"),
                              ("accuracy", "accuracy at the best threshold"), ("auc", "AUC"),
                              ("best_threshold", "best threshold")):
                lines.append(f"| {d} | {b['pairs_same']} / {b['pairs_different']} | {res} | {name} | "
                             f"{b[key]:.4f} | {e.get(key, float('nan')):.4f} |")
        lines.append("")
    sel = summary.get("selection") or {}
    lines += ["## Selection", "", f"* metric: `{sel.get('metric')}`" + (f" at FAR {sel['far']:g}" if sel.get("far") else "")
              + f"; asked: `{(sel.get('asked') or {}).get('metric')}` at FAR {(sel.get('asked') or {}).get('far')}", ""]
    thr = summary.get("recommended_threshold")
    lines += ["## Threshold to use", "",
              (f"Distance **{thr['threshold']:.3f}** (best accuracy on the held-out {thr['domain']} pairs, "
               f"{thr['accuracy_at_threshold']:.4f}; at dlib's 0.6: {thr['accuracy_at_0.6']:.4f}); "
               "`threshold.json` holds it." if thr else "No validation: dlib's 0.6."), ""]
    lines += ["## Load it", "",
              "dlib (C++): the same `anet_type` as dlib's `dnn_face_recognition_ex.cpp`:", "",
              "```cpp", "anet_type net;", 'dlib::deserialize("model.dat") >> net;', "```", "",
              "dlib (Python):", "", "```python", "import dlib",
              'facerec = dlib.face_recognition_model_v1("model.dat")',
              "descriptor = facerec.compute_face_descriptor(image, shape)", "```", "",
              "face_recognition: point it at this model instead of dlib's:", "", "```python",
              "import dlib, face_recognition.api as fr",
              'fr.face_encoder = dlib.face_recognition_model_v1("model.dat")', "```", "",
              "PyTorch:", "", "```python", "import dlibbridge",
              'net = dlibbridge.to_torch("model.pt")     # or "model.dat"; chips: N x 150 x 150 x 3 uint8 RGB',
              "```", "",
              "Continue training from it: `dlibbridge finetune DATA --base model.pt --out NEW_RUN`; reproduce this "
              "run: `dlibbridge finetune --config config.json --out NEW_RUN`.", ""]
    write_atomic(run_dir / "README.md", "\n".join(lines).encode())
