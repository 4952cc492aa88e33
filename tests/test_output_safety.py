"""Every command that writes: on an output it cannot write (read-only folder, an existing
directory where a file is expected) it fails before the work, in one line naming the user's
path (never an internal temporary name), exit 2, and touches nothing that is not its own."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from dlibbridge import cli


def _can_create_in(d: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=d).close()
        return True
    except OSError:
        return False


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write in: chmod 555 (ineffective as root, where os.access lies
    too), else /sys, which refuses new files even to root."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not _can_create_in(d):
        yield d
    elif not _can_create_in(Path("/sys")):
        yield Path("/sys")
    else:
        pytest.skip("no read-only folder available (root, and /sys is writable)")
    d.chmod(0o755)


@pytest.fixture(scope="module")
def few_chips(tmp_path_factory, johns_dir):
    root = tmp_path_factory.mktemp("few")
    for person in sorted(p for p in johns_dir.iterdir() if p.is_dir())[:2]:
        (root / person.name).mkdir()
        for f in sorted(person.glob("*.jpg"))[:2]:
            shutil.copy(f, root / person.name / f.name)
    return root


def _commands(out_dir: Path, few_chips: Path) -> dict[str, tuple[list[str], Path]]:
    """command -> (argv, the output path the message must name)."""
    o = out_dir
    return {
        "unfreeze": (["unfreeze", "-o", str(o / "t.dat"), "--quiet"], o / "t.dat"),
        "unfreeze-calibrate": (["unfreeze", "--calibrate", str(few_chips), "-o", str(o / "t.dat"), "--quiet"], o / "t.dat"),
        "export": (["export", "default", "-o", str(o / "m.dat")], o / "m.dat"),
        "export-onnx": (["export", "default", "--torchscript", str(o / "m.ts")], o / "m.ts"),
        "embed": (["embed", "default", str(few_chips), "-o", str(o / "e.npz"), "--quiet"], o / "e.npz"),
        "pack": (["pack", str(few_chips), "-o", str(o / "s.store"), "--quiet"], o / "s.store"),
        "align": (["align", str(few_chips), str(o / "chips"), "--quiet"], o / "chips"),
        "finetune": (["finetune", str(few_chips), "--out", str(o / "run"), "--quiet"], o / "run"),
        "evaluate": (["evaluate", "default", "--data", str(few_chips), "--gen-pairs", "4", "--folds", "2",
                      "--no-cache", "--quiet", "--report", str(o / "rep")], o / "rep"),
    }


def _one_line_naming(err: str, path: Path) -> None:
    assert "Traceback" not in err and ".tmp-" not in err, err
    assert err.count("\n") == 1, err
    assert str(path) in err, err


COMMANDS = ["unfreeze", "unfreeze-calibrate", "export", "export-onnx", "embed", "pack", "align",
            "finetune", "evaluate"]


@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_output_fails_up_front_in_one_line(name, readonly_dir, few_chips, capsys, monkeypatch):
    from dlibbridge.port import calibrate
    monkeypatch.setattr(calibrate, "load_chips", lambda *a, **k: pytest.fail("calibrated before checking the output"))
    argv, path = _commands(readonly_dir, few_chips)[name]
    assert cli.main(argv) == 2
    _one_line_naming(capsys.readouterr().err, path)


@pytest.mark.parametrize("name", ["unfreeze", "unfreeze-calibrate", "export", "export-onnx", "embed"])
def test_a_directory_as_file_output_fails_before_the_work(name, tmp_path, few_chips, capsys, monkeypatch):
    from dlibbridge.port import calibrate
    monkeypatch.setattr(calibrate, "load_chips", lambda *a, **k: pytest.fail("calibrated before checking the output"))
    argv, path = _commands(tmp_path, few_chips)[name]
    path.mkdir()
    (path / "photo.jpg").write_bytes(b"mine")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    _one_line_naming(err, path)
    assert "is a directory" in err
    assert (path / "photo.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize("name", ["unfreeze", "export", "export-onnx", "embed"])
def test_a_foreign_file_as_output_is_never_replaced(name, tmp_path, few_chips, capsys):
    argv, path = _commands(tmp_path, few_chips)[name]
    path.write_bytes(b"\xff\xd8\xff my holiday photo")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    _one_line_naming(err, path)
    assert "refusing to replace" in err
    assert path.read_bytes() == b"\xff\xd8\xff my holiday photo"


def test_a_rerun_replaces_its_own_output(tmp_path, capsys):
    out = tmp_path / "t.dat"
    assert cli.main(["unfreeze", "-o", str(out), "--quiet"]) == 0
    assert cli.main(["unfreeze", "-o", str(out), "--quiet"]) == 0


# ---- a write that fails part-way (full disk, read-only file system, no permission) ----------

@pytest.mark.parametrize("err", [28, 30, 13])           # ENOSPC, EROFS, EACCES
def test_a_write_failing_part_way_names_the_users_path_and_leaves_nothing(err, tmp_path, monkeypatch):
    from dlibbridge import _io
    real = os.fsync

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(_io.WriteError) as e:
        _io.write_atomic(tmp_path / "out.dat", b"x" * 1000)
    assert str(e.value) == f"cannot write {tmp_path / 'out.dat'}: {os.strerror(err)}"
    assert e.value.errno == err
    with pytest.raises(_io.WriteError, match=f"cannot write {tmp_path / 'v.dat'}: "):
        _io.replace_verified(tmp_path / "v.dat", b"x", lambda p: None)
    monkeypatch.setattr(os, "fsync", real)
    assert list(tmp_path.iterdir()) == []


def test_writing_into_a_read_only_folder_names_the_users_path(readonly_dir):
    from dlibbridge import _io
    with pytest.raises(_io.WriteError) as e:
        _io.write_atomic(readonly_dir / "out.dat", b"x")
    assert str(e.value).startswith(f"cannot write {readonly_dir / 'out.dat'}: ") and ".tmp-" not in str(e.value)


def test_a_command_whose_write_fails_part_way_says_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """The up-front checks passed, then the disk filled while unfreeze wrote its output."""
    def failing_fsync(fd):
        raise OSError(28, os.strerror(28))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    out = tmp_path / "t.dat"
    assert cli.main(["unfreeze", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_line_naming(err, out)
    assert err == f"dlibbridge unfreeze: cannot write {out}: No space left on device\n"
    assert list(tmp_path.iterdir()) == []
