"""A hostile-but-fair user: crafted records, two processes on one folder, crafted pickles, a full
disk, symlink loops, kill -9 with workers.  Every case answers in one line (exit 2), deletes or
replaces nothing the tool does not own, and runs no foreign code (docs/security.md)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlibbridge import cli
from dlibbridge._lock import LOCK_NAME, LockedError, folder_lock
from dlibbridge._load import DamagedFileError, read_npz, read_torch

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "dlibbridge"


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("note:", "warning:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _copy_people(johns_dir: Path, dst: Path, people: int = 3, per: int = 3) -> Path:
    for d in sorted(p for p in johns_dir.iterdir() if p.is_dir())[:people]:
        (dst / d.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(d.glob("*.jpg"))[:per]:
            shutil.copy(f, dst / d.name / f.name)
    return dst


# ---- 1. deletion only of what the tool recorded as its own, inside its folder ----------------

def test_report_index_naming_a_file_outside_is_refused_and_the_file_kept(tmp_path, johns_dir, capsys):
    victim = tmp_path / "somefile"
    victim.write_bytes(b"the user's work")
    report = tmp_path / "deep" / "report"
    report.mkdir(parents=True)
    sha = hashlib.sha256(victim.read_bytes()).hexdigest()
    (report / ".dlibbridge-report.json").write_text(json.dumps(
        {"written_by": "dlibbridge evaluate --report", "files": {"errors/../../../somefile": sha}}))
    data = _copy_people(johns_dir, tmp_path / "data")
    code, err = _cli(["evaluate", "default", "--data", data, "--gen-pairs", "4", "--folds", "2",
                      "--report", report, "--quiet"], capsys)
    assert code == 2 and "climbs out" in _one_line(err) and ".dlibbridge-report.json" in err
    assert victim.read_bytes() == b"the user's work"


def test_report_deletes_only_unchanged_files_it_recorded(tmp_path):
    from dlibbridge._paths import remove_recorded
    (tmp_path / "errors").mkdir()
    mine, edited = tmp_path / "errors" / "a.png", tmp_path / "errors" / "b.png"
    mine.write_bytes(b"ours")
    edited.write_bytes(b"ours, then edited by the user")
    sha = hashlib.sha256(b"ours").hexdigest()
    assert remove_recorded(tmp_path, "errors/a.png", sha, source="index") and not mine.exists()
    assert not remove_recorded(tmp_path, "errors/b.png", sha, source="index") and edited.exists()
    (tmp_path / "errors" / "c.png").symlink_to(edited)   # a link is never "ours", even to a matching file
    assert not remove_recorded(tmp_path, "errors/c.png", hashlib.sha256(edited.read_bytes()).hexdigest(),
                               source="index")


@pytest.fixture()
def one_photo(tmp_path, shared_dir) -> Path:
    """RAW/p1/<one photo with a face>."""
    (tmp_path / "raw" / "p1").mkdir(parents=True)
    shutil.copy(shared_dir / "data" / "faces" / "2008_002470.jpg", tmp_path / "raw" / "p1")
    return tmp_path / "raw"


def test_align_never_deletes_user_files_named_like_its_temporaries(one_photo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "p1").mkdir(parents=True)
    (out / "p1" / ".tmp-notes.png").write_bytes(b"mine")
    (out / ".tmp-draft.png").write_bytes(b"mine too")
    assert _cli(["align", one_photo, out, "--workers", "1", "--quiet"], capsys)[0] == 0
    assert _cli(["align", one_photo, out, "--workers", "1", "--quiet"], capsys)[0] == 0
    assert (out / "p1" / ".tmp-notes.png").read_bytes() == b"mine"
    assert (out / ".tmp-draft.png").read_bytes() == b"mine too"


# ---- 2. paths read back from the tool's own files stay inside their folder -------------------

@pytest.fixture()
def chips_with_manifest(tmp_path, johns_dir):
    chips = _copy_people(johns_dir, tmp_path / "chips", people=2, per=2)
    rows = [{"source": f"{p.parent.name}/{p.name}", "identity": p.parent.name, "status": "ok",
             "chip": f"{p.parent.name}/{p.name}"} for p in sorted(chips.glob("*/*.jpg"))]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(next(chips.glob("*/*.jpg")), elsewhere / "x.jpg")
    return chips, rows, elsewhere


def _write_manifest(chips: Path, rows: list[dict]) -> None:
    with open(chips / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["source", "identity", "status", "chip"])
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("bad", ["../elsewhere/x.jpg", "ABS", "LINK"])
def test_pack_refuses_a_manifest_row_leading_outside(chips_with_manifest, tmp_path, capsys, bad):
    chips, rows, elsewhere = chips_with_manifest
    if bad == "ABS":
        bad = str(elsewhere / "x.jpg")
    elif bad == "LINK":
        (chips / "p-link").symlink_to(elsewhere)
        bad = "p-link/x.jpg"
    _write_manifest(chips, rows + [{"source": "x.jpg", "identity": "zz", "status": "ok", "chip": bad}])
    code, err = _cli(["pack", chips, "-o", tmp_path / "s.store", "--quiet"], capsys)
    line = _one_line(err)
    assert code == 2 and "manifest.csv line 6" in line, line
    assert not (tmp_path / "s.store").exists()


def test_align_refuses_a_journal_row_leading_outside(one_photo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".align").mkdir(parents=True)
    row = {"source": "p1/2008_002470.jpg", "identity": "p1", "status": "ok", "chip": "../../elsewhere/x.png"}
    (out / ".align" / "journal.jsonl").write_text(json.dumps(
        {"source": "p1/2008_002470.jpg", "sha256": "0", "rows": [row]}) + "\n")
    code, err = _cli(["align", one_photo, out, "--workers", "1", "--quiet"], capsys)
    assert code == 2 and "journal.jsonl line 1" in _one_line(err)
    assert not (out / "manifest.csv").exists()


def test_pairs_file_references_stay_inside_the_data_folder(tmp_path):
    from dlibbridge._paths import UnsafePathError
    from dlibbridge.eval.pairs import image_path
    with pytest.raises(UnsafePathError):
        image_path(tmp_path, {}, "..", "etc/passwd")
    with pytest.raises(UnsafePathError):
        image_path(tmp_path, {}, "p1", "/etc/passwd")


# ---- 3. one process per folder ---------------------------------------------------------------

def _hold_lock(folder: Path, ready: Path) -> subprocess.Popen:
    code = ("import sys, time, pathlib; from dlibbridge._lock import folder_lock\n"
            "with folder_lock(sys.argv[1], 'dlibbridge finetune'):\n"
            "    pathlib.Path(sys.argv[2]).write_text('x'); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ready)], env=_env(), cwd=REPO)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "the lock holder did not start"
    return proc


def test_a_lock_names_its_holder_and_is_taken_over_after_kill_9(tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock(folder, tmp_path / "ready")
    try:
        with pytest.raises(LockedError, match=rf"in use by dlibbridge finetune \(pid {holder.pid} "):
            with folder_lock(folder, "dlibbridge finetune"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).exists()                  # left behind by the killed holder...
    with folder_lock(folder, "dlibbridge finetune"):      # ...and taken over: the kernel dropped the lock
        pass
    assert not (folder / LOCK_NAME).exists()


def test_lock_cost(tmp_path):
    """Not a speed assertion: the figure docs/security.md quotes, printed with -s."""
    t = time.perf_counter()
    for _ in range(200):
        with folder_lock(tmp_path, "x"):
            pass
    print(f"lock acquire+release: {(time.perf_counter() - t) / 200 * 1e6:.0f} us")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, johns_dir):
    from dlibbridge.data.store import pack
    root = tmp_path_factory.mktemp("hostile-store")
    chips = _copy_people(johns_dir, root / "chips", people=4, per=3)
    return pack(chips, root / "s.store", progress=False).path


FINETUNE = ["-P", "2", "-K", "2", "--workers", "0", "--quiet", "--seed", "3", "--max-steps", "2",
            "--checkpoint-every", "1", "--val-identities", "0", "--export", "last"]


@pytest.mark.slow   # two tiny fine-tunes started together (~1 min on 2 busy cores)
def test_two_finetunes_on_one_folder_one_is_refused_and_resume_of_a_running_one_too(small_store, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlibbridge", "finetune", str(small_store), "--out", str(run), *FINETUNE]
    a = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    b = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # while one trains, a --resume is refused too
    deadline = time.time() + 120
    while not ((run / LOCK_NAME).exists() and (run / "config.json").exists()) and time.time() < deadline:
        time.sleep(0.05)
    code, err = _cli(["finetune", "--resume", run], capsys)
    if a.poll() is None or b.poll() is None:
        assert code == 2 and "in use by dlibbridge finetune" in _one_line(err)
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in (a, b)]
    codes = sorted(c for c, _ in outs)
    assert codes == [0, 2], outs
    loser = next(e for c, e in outs if c == 2)
    assert "in use by dlibbridge finetune" in _one_line(loser)
    assert (run / "model.dat").is_file() and not (run / LOCK_NAME).exists()

    # 4 + 5: a crafted pickle or a damaged file as the checkpoint: one line, no code run
    marker = tmp_path / "pwned"
    good = (run / "checkpoint.pt").read_bytes()
    _crafted_torch_file(run / "checkpoint.pt", marker)
    code, err = _cli(["finetune", "--resume", run, "--quiet"], capsys)
    assert code == 2 and "checkpoint" in _one_line(err) and not marker.exists()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])       # truncated by a full disk
    code, err = _cli(["finetune", "--resume", run, "--quiet"], capsys)
    assert code == 2 and "not a readable checkpoint" in _one_line(err) and "start the run again" in err


# ---- 4. nothing the tool reads can run code ----------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_torch_file(path: Path, marker: Path) -> None:
    import torch
    torch.save({"format": "dlibbridge.FaceResNet", "state_dict": _Payload(marker)}, path)


def _crafted_npz(path: Path, marker: Path) -> None:
    np.savez(path, embeddings=np.array([_Payload(marker)], dtype=object), keys=np.array([_Payload(marker)], dtype=object))


def test_no_loader_in_the_package_can_unpickle_code():
    """Every read-back goes through _load (weights_only=True, allow_pickle=False): no other
    torch.load / np.load / pickle.load(s) of a file in the package."""
    offenders = []
    for f in PKG.rglob("*.py"):
        if f.name == "_load.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(|\bnp\.load\(|\bnumpy\.load\(|pickle\.load\(|\bjoblib\.load\(", code):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
            if "allow_pickle=True" in code or "weights_only=False" in code:
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", ["model.pt", "best.pt", "best_state.pt", "checkpoint.pt", "features.pt"])
def test_crafted_torch_files_do_not_run(tmp_path, name):
    marker = tmp_path / "pwned"
    _crafted_torch_file(tmp_path / name, marker)
    with pytest.raises(DamagedFileError, match=f"{name}: not a readable"):
        read_torch(tmp_path / name, what="checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("command", [["export", "MODEL", "-o", "OUT/x.dat"], ["inspect", "MODEL"],
                                     ["embed", "MODEL", "CHIPS", "-o", "OUT/e.npz"]])
def test_a_crafted_model_pt_is_refused_in_one_line(tmp_path, capsys, command):
    from dlibbridge.assets import sample_chips_dir
    marker = tmp_path / "pwned"
    model = tmp_path / "model.pt"
    _crafted_torch_file(model, marker)
    (tmp_path / "o").mkdir()
    argv = [{"MODEL": model, "CHIPS": sample_chips_dir()}.get(a, a) for a in command]
    argv = [str(a).replace("OUT", str(tmp_path / "o")) for a in argv]
    code, err = _cli(argv, capsys)
    assert code == 2 and _one_line(err) and not marker.exists()
    import dlibbridge
    with pytest.raises(Exception) as e:
        dlibbridge.to_torch(str(model))
    assert not marker.exists() and "Traceback" not in str(e.value)


def test_crafted_npz_and_npy_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _crafted_npz(tmp_path / "cache.npz", marker)
    np.save(tmp_path / "labels.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    for f in ("cache.npz", "labels.npy"):
        with pytest.raises(DamagedFileError):
            read_npz(tmp_path / f, what="cache")
    assert not marker.exists()


def test_a_crafted_embedding_cache_is_ignored_not_run(tmp_path, capsys):
    from dlibbridge.eval.embedders import EmbeddingCache
    marker = tmp_path / "pwned"
    _crafted_npz(tmp_path / "c.npz", marker)
    cache = EmbeddingCache(tmp_path / "c.npz")
    assert not cache.emb and not marker.exists()
    assert "ignoring unreadable embedding cache" in capsys.readouterr().err


def test_a_crafted_store_labels_file_is_refused(small_store, tmp_path):
    from dlibbridge.data.store import ChipStore
    store = tmp_path / "s.store"
    shutil.copytree(small_store, store)
    marker = tmp_path / "pwned"
    np.save(store / "labels.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        ChipStore(store)
    assert not marker.exists()


def test_pickle_payloads_are_real(tmp_path):
    """The payload the tests above feed really runs when loaded unsafely (the tests mean something)."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# ---- 5. faults: a full disk, symlink loops, damaged files -------------------------------------

@pytest.fixture()
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_pack_onto_a_full_disk_is_one_line_not_sigbus(tiny_disk, johns_dir, tmp_path):
    chips = _copy_people(johns_dir, tmp_path / "chips", people=2, per=5)   # 10 chips = 675 KB of store...
    (tiny_disk / "filler").write_bytes(b"\0" * 600_000)                     # ...on a disk with ~450 KB free
    r = subprocess.run([sys.executable, "-m", "dlibbridge", "pack", str(chips), "-o", str(tiny_disk / "s.store"),
                        "--quiet"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "no space" in _one_line(r.stderr)


@pytest.fixture()
def loop(tmp_path) -> Path:
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    return tmp_path / "l1"


@pytest.mark.parametrize("argv", [["export", "LOOP", "-o", "x.dat"], ["export", "default", "-o", "LOOP"],
                                  ["unfreeze", "LOOP"], ["unfreeze", "default", "-o", "LOOP"],
                                  ["freeze", "LOOP", "-o", "x.dat"], ["inspect", "LOOP"],
                                  ["embed", "LOOP", "CHIPS", "-o", "e.npz"], ["embed", "default", "CHIPS", "-o", "LOOP"],
                                  ["align", "LOOP", "out"], ["pack", "LOOP", "-o", "s.store"]])
def test_symlink_loops_are_one_line(loop, tmp_path, capsys, monkeypatch, argv):
    from dlibbridge.assets import sample_chips_dir
    monkeypatch.chdir(tmp_path)
    code, err = _cli([{"LOOP": loop, "CHIPS": sample_chips_dir()}.get(a, a) for a in argv], capsys)
    assert code == 2 and "symlink loop" in _one_line(err), err


# ---- 6. orphans and leftovers ------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads children from /proc (Linux)")
def test_kill_9_of_align_with_workers_takes_its_workers_along(tmp_path, shared_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    photos = sorted((shared_dir / "data" / "faces").glob("*.jpg"))
    for i in range(40):                                   # enough work to still be running when killed
        shutil.copy(photos[i % len(photos)], raw / f"{i:03d}.jpg")
    proc = subprocess.Popen([sys.executable, "-m", "dlibbridge", "align", str(raw), str(tmp_path / "out"),
                             "--workers", "2", "--quiet"], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: set[int] = set()
        while time.time() < deadline and proc.poll() is None:
            workers = {c for c in _children(proc.pid) if "multiprocessing" in Path(f"/proc/{c}/cmdline").read_text()
                       .replace("\0", " ")} if Path(f"/proc/{proc.pid}").exists() else set()
            if len(workers) >= 2 and (tmp_path / "out" / ".align" / "journal.jsonl").exists():
                break
            time.sleep(0.1)
        assert len(workers) >= 2, "the workers did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
    # and the killed align's folder is not packed as if it were complete
    r = subprocess.run([sys.executable, "-m", "dlibbridge", "pack", str(tmp_path / "out"), "-o",
                        str(tmp_path / "s.store"), "--quiet"], env=_env(), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "unfinished align" in _one_line(r.stderr)


def test_pack_refuses_the_folder_of_a_killed_align(tmp_path, johns_dir, capsys):
    chips = _copy_people(johns_dir, tmp_path / "chips", people=2, per=2)
    (chips / ".align").mkdir()
    (chips / ".align" / "journal.jsonl").write_text("")
    code, err = _cli(["pack", chips, "-o", tmp_path / "s.store", "--quiet"], capsys)
    assert code == 2 and "unfinished align" in _one_line(err)


def test_names_with_newlines_tabs_and_commas_round_trip_or_are_left_out(tmp_path):
    from dlibbridge._io import csv_bytes
    from dlibbridge.eval.pairs import format_pairs, generate_pairs, parse_pairs, writable_identities
    rows = [{"source": "a\nb,c\td.jpg", "chip": 'x"y.png'}]
    back = list(csv.DictReader(csv_bytes(rows, ["source", "chip"]).decode().splitlines(keepends=True)))
    assert back == rows
    identities = {f"p{i}": [f"{j}.jpg" for j in range(3)] for i in range(6)}
    identities["p0"].append("bad\nname.jpg")
    identities["p1"].append("tab\tname.jpg")
    kept, left = writable_identities(identities)
    assert left == ["p0/bad\nname.jpg", "p1/tab\tname.jpg"]
    ps = generate_pairs(kept, 12, 2, seed=0)
    assert parse_pairs(format_pairs(ps), "x").pairs() == ps.pairs()


def test_embed_into_a_missing_folder_makes_it(tmp_path, capsys):
    from dlibbridge.assets import sample_chips_dir
    out = tmp_path / "missing" / "dir" / "e.npz"
    code, err = _cli(["embed", "default", sample_chips_dir(), "-o", out, "--quiet"], capsys)
    assert code == 0, err
    assert len(np.load(out)["embeddings"]) == 25


def test_evaluate_refuses_a_bad_model_before_writing_pairs(tmp_path, johns_dir, capsys):
    data = _copy_people(johns_dir, tmp_path / "data", people=4)
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"not a model")
    code, err = _cli(["evaluate", bad, "--data", data, "--gen-pairs", "4", "--folds", "2",
                      "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert code == 2 and _one_line(err)
    assert not list(tmp_path.glob("pairs-*.txt")) and not (tmp_path / "r.json").exists()
