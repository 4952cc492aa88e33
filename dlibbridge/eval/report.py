"""The evaluation report: what a person looks at to decide whether a model is better.

``write_report(evaluation, out_dir)`` writes, next to results.json:

* ``roc.png`` — ROC curves of all models on one plot (log FAR axis, where deployments
  operate), FAR 1e-3/1e-4 marked;
* ``distances.png`` — per model, histograms of same-person and different-person pair
  distances with dlib's 0.6 and the model's best threshold;
* ``errors/<model>/false_accept_NN.png`` / ``false_reject_NN.png`` — the worst mistakes
  under the k-fold protocol as side-by-side aligned chips (what the network saw);
* ``report.md`` and ``report.html`` — the table and all of the above;
* ``.dlibbridge-report.json`` — every file above with its sha256: a rerun into the same folder
  deletes or replaces only files listed there with unchanged content (a previous run's mistakes
  would otherwise be mistaken for this one's), and refuses to touch anything else.

Plots use matplotlib's Agg backend (no display needed); every file is written atomically.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from .evaluate import Evaluation, ModelOutcome, format_table
from .._io import json_bytes, png_bytes, write_atomic
from .._lock import folder_lock
from .._paths import confined, is_recorded, remove_recorded
from ..errors import DlibbridgeError
from .metrics import DLIB_THRESHOLD, FAR_TARGETS, far_key, roc_curve

WORST_ERRORS = 6
MANIFEST = ".dlibbridge-report.json"
_PAGES = ("roc.png", "distances.png", "report.md", "report.html")
_ERROR_GLOBS = ("errors/*/false_accept_*.png", "errors/*/false_reject_*.png")


class ReportError(DlibbridgeError, ValueError):
    """A report folder holding files this report would replace that it did not write."""


class _Owned:
    """The report's own files in ``out`` (relative path -> sha256, from its manifest), kept
    current after every file written, so an interrupted report still knows what it made."""

    def __init__(self, out: Path):
        self.out = out
        self.files: dict[str, str] = {}
        try:
            files = dict(json.loads((out / MANIFEST).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            files = {}                        # no manifest (or not ours): nothing here is ours
        for rel in files:                     # a path in it leading out is refused, not followed
            confined(out, rel, source=out / MANIFEST)
        self.files = files

    def owns(self, rel: str) -> bool:
        return is_recorded(self.out, rel, self.files.get(rel), source=self.out / MANIFEST)

    def foreign(self) -> list[str]:
        """Existing files at the names a report writes that are not verifiably ours."""
        names = [n for n in _PAGES if (self.out / n).exists()]
        names += sorted(p.relative_to(self.out).as_posix() for g in _ERROR_GLOBS for p in self.out.glob(g))
        return [n for n in names if not self.owns(n)]

    def write(self, rel: str, data: bytes) -> None:
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / rel, data)
        self.files[rel] = hashlib.sha256(data).hexdigest()
        self._save()

    def remove_old_errors(self) -> None:
        for rel in [r for r in self.files if r.startswith("errors/")]:
            remove_recorded(self.out, rel, self.files.pop(rel), source=self.out / MANIFEST)
        self._save()

    def _save(self) -> None:
        write_atomic(self.out / MANIFEST, json_bytes({"written_by": "dlibbridge evaluate --report",
                                                      "files": self.files}))


def check_report_dir(out_dir: str | Path) -> None:
    """Refuse, before any work, a report folder where this report would replace or delete
    files it cannot verify it wrote (a photo called roc.png, an older report's files edited
    since, or a report without its manifest)."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    foreign = _Owned(out).foreign()
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ReportError(f"--report {out}: {out / foreign[0]}{more} exists and was not written by this report "
                          "(or has changed since); refusing to replace it: move it or choose another --report")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def plot_roc(outcomes: list[ModelOutcome]) -> bytes:
    """All models' ROC on one log-FAR axis.  FAR = 0 cannot sit on a log axis: those
    points are drawn at the left edge, which lies below the finest FAR the pairs resolve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    finest = min([1.0 / max(1, int((~o.same).sum())) for o in outcomes] + list(FAR_TARGETS))
    left = finest / 2
    for o in outcomes:
        far, tar, _ = roc_curve(o.dist, o.same)
        ax.step(np.maximum(far, left), tar, where="post", label=f"{o.spec.name} (AUC {o.metrics['auc']:.4f})")
    for f in FAR_TARGETS:
        ax.axvline(f, color="grey", lw=0.8, ls=":")
        ax.text(f, 0.99, f" FAR {far_key(f)}", color="grey", fontsize=8, rotation=90, va="top")
    ax.set_xscale("log")
    ax.set_xlim(left, 1.0)
    ax.set_ylim(0, 1.005)
    ax.set_xlabel("false accept rate (impostor pairs accepted; left edge = 0)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    ax.set_title("ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _fig_png(fig)


def plot_distances(outcomes: list[ModelOutcome]) -> bytes:
    """Same/different distance histograms per model: how far apart the two populations
    are, and where the thresholds cut."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(outcomes), 1, figsize=(6.4, 2.6 * len(outcomes)), squeeze=False,
                             layout="constrained")
    hi = max(float(o.dist.max()) for o in outcomes) if outcomes else 1.0
    bins = np.linspace(0, max(hi, DLIB_THRESHOLD) * 1.02, 61)
    for ax, o in zip(axes[:, 0], outcomes):
        ax.hist(o.dist[o.same], bins=bins, alpha=0.6, label=f"same person ({int(o.same.sum())})", color="tab:green")
        ax.hist(o.dist[~o.same], bins=bins, alpha=0.6, label=f"different ({int((~o.same).sum())})", color="tab:red")
        ax.axvline(DLIB_THRESHOLD, color="k", ls="--", lw=1, label="dlib 0.6")
        ax.axvline(o.metrics["best_threshold"], color="tab:blue", ls=":", lw=1.2,
                   label=f"best {o.metrics['best_threshold']:.3f}")
        ax.set_title(o.spec.name, fontsize=9)
        ax.set_ylabel("pairs")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("Euclidean distance between descriptors")
    return _fig_png(fig)


def worst_errors(o: ModelOutcome, k: int = WORST_ERRORS) -> tuple[list[int], list[int]]:
    """Indices of the k most confident mistakes: different people closest together,
    and the same person farthest apart, among pairs the k-fold protocol (or, with one fold, the best threshold) got wrong."""
    fa = np.flatnonzero(o.decided_same & ~o.same)
    fr = np.flatnonzero(~o.decided_same & o.same)
    fa = fa[np.argsort(o.dist[fa], kind="stable")][:k]
    fr = fr[np.argsort(-o.dist[fr], kind="stable")][:k]
    return fa.tolist(), fr.tolist()


def pair_image(chip1: np.ndarray, chip2: np.ndarray) -> bytes:
    """Two chips side by side with a white gutter, as PNG bytes."""
    h = max(chip1.shape[0], chip2.shape[0])
    gutter = np.full((h, 6, 3), 255, np.uint8)
    img = np.concatenate([chip1, gutter, chip2], axis=1)
    return png_bytes(img)


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return str(p)


def _describe(p: Path, ev: Evaluation, root: Path) -> str:
    """Image path, and its chip's origin when it was not a clean detection: a central-box
    fallback chip is often not a face at all, which explains many 'mistakes'."""
    st = ev.image_status.get(p, "")
    return _rel(p, root) + (f" ({st})" if st not in ("", "chip", "detected") else "")


def write_report(ev: Evaluation, out_dir: str | Path, k: int = WORST_ERRORS) -> Path:
    """Write the report files into ``out_dir`` and return the path of report.html."""
    out = Path(out_dir)
    check_report_dir(out)
    with folder_lock(out, "dlibbridge evaluate --report"):
        return _write_report(ev, out, k)


def _write_report(ev: Evaluation, out: Path, k: int) -> Path:
    owned = _Owned(out)
    owned.remove_old_errors()          # a previous run's mistakes would be mistaken for this one's
    owned.write("roc.png", plot_roc(ev.outcomes))
    owned.write("distances.png", plot_distances(ev.outcomes))
    data_root = Path(ev.results["data"])
    worst = [worst_errors(o, k) for o in ev.outcomes]
    # chips of the shown pairs, in one run (aligned now if their descriptors came from the cache)
    shown = sorted({p for o, (fa, fr) in zip(ev.outcomes, worst) for i in fa + fr for p in o.pair_paths[i]})
    chips = dict(zip(shown, (c for c, _ in ev.loader.load(shown))))
    sections = []   # (model name, [(kind, png rel path, caption)])
    for o, (fa, fr) in zip(ev.outcomes, worst):
        d = f"errors/{slug(o.spec.name)}"
        items = []
        for kind, idx in (("false_accept", fa), ("false_reject", fr)):
            for n, i in enumerate(idx, 1):
                a, b = o.pair_paths[i]
                ca, cb = chips[a], chips[b]
                if ca is None or cb is None:
                    continue
                f = f"{d}/{kind}_{n:02d}.png"
                owned.write(f, pair_image(ca, cb))
                items.append((kind, f,
                              f"d = {o.dist[i]:.4f} — {_describe(a, ev, data_root)} vs {_describe(b, ev, data_root)}"))
        sections.append((o.spec.name, items))

    table = format_table(ev.results)
    owned.write("report.md", _markdown(ev, table, sections).encode("utf-8"))
    owned.write("report.html", _html(ev, table, sections).encode("utf-8"))
    return out / "report.html"


def _summary_lines(ev: Evaluation) -> list[str]:
    r = ev.results
    p = r["pairs"]
    img = r["images"]
    gen = f", generated (seed {p['generated']['seed']})" if p["generated"] else ""
    return [f"Data: `{r['data']}`",
            f"Pairs: `{p['file']}` — {p['n_pairs']} pairs, {p['n_folds']} fold(s) of {p['per_fold']} matched + "
            f"{p['per_fold']} mismatched{gen}",
            f"Images: {img['total']} ({img['chip']} already chips, {img['detected']} detected and aligned, "
            f"{img['fallback']} central-box fallback, {img['failed']} failed)"
            + (f"; {img['not_in_pairs']} images of the folder in no pair, not processed" if img.get("not_in_pairs") else ""),
            f"Options: flip={r['options']['flip']}, jitter={r['options']['jitter']}, "
            f"detector={r['options']['detector']}, upsample={r['options']['upsample']}",
            f"Created {r['created']} by dlibbridge {r['dlibbridge_version']}; numbers in `{ev.results_file.name}`."]


def _protocol_note(ev: Evaluation) -> str:
    k = ev.results["pairs"]["n_folds"]
    acc = (f"Accuracy: {k}-fold, each fold's threshold chosen on the other {k - 1} (mean ± std); the mistakes "
           "below are that protocol's." if k > 1 else
           "One fold only: no k-fold accuracy; the mistakes below are at the best threshold.")
    return acc + " TAR@FAR: share of genuine pairs accepted when at most that share of impostor pairs is."


def _markdown(ev: Evaluation, table: str, sections) -> str:
    lines = ["# Face recognition evaluation", ""]
    lines += [f"- {s}" for s in _summary_lines(ev)]
    lines += ["", "```", table, "```", "", _protocol_note(ev), "",
              "## ROC", "", "![ROC](roc.png)", "", "## Distance distributions", "", "![distances](distances.png)", ""]
    for name, items in sections:
        lines += [f"## Worst mistakes: {name}", ""]
        if not items:
            lines += ["No mistakes.", ""]
        for kind, png, cap in items:
            label = "false accept" if kind == "false_accept" else "false reject"
            lines += [f"**{label}**, {cap}", "", f"![{label}]({png})", ""]
    return "\n".join(lines)


def _html(ev: Evaluation, table: str, sections) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Face recognition evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}pre{background:#f4f4f4;padding:8px;"
             "overflow-x:auto}figure{display:inline-block;margin:6px}figcaption{font-size:12px;max-width:320px}</style>"
             "</head><body><h1>Face recognition evaluation</h1><ul>"]
    parts += [f"<li>{e(s).replace('`', '')}</li>" for s in _summary_lines(ev)]
    parts += ["</ul><pre>", e(table), "</pre>",
              f"<p>{e(_protocol_note(ev))}</p>",
              "<h2>ROC</h2><img src='roc.png' alt='ROC'>",
              "<h2>Distance distributions</h2><img src='distances.png' alt='distances'>"]
    for name, items in sections:
        parts.append(f"<h2>Worst mistakes: {e(name)}</h2>")
        if not items:
            parts.append("<p>No mistakes.</p>")
        for kind, png, cap in items:
            label = "false accept" if kind == "false_accept" else "false reject"
            parts.append(f"<figure><img src='{e(png)}' alt='{label}'><figcaption><b>{label}</b>, {e(cap)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
