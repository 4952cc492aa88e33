"""cli: the reference in docs/cli.md is the parsers' own, the one error mapping, the option aliases."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from dlibbridge.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_cli_reference_is_generated_from_the_parsers():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "tools" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "cli.md").read_text() == gen.render(), "run: python tools/gen_cli_docs.py"


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.dat")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlibbridge inspect: ") and err.count("\n") == 1
    assert main(["export", "default"]) == 2
    assert capsys.readouterr().err.startswith("dlibbridge export: nothing to do")


def test_output_keeps_its_older_spelling(tmp_path, capsys):
    assert main(["pack", str(tmp_path / "none"), "--output", str(tmp_path / "s.store"), "-q"]) == 2
    assert "dlibbridge pack: " in capsys.readouterr().err


# ---- one convention for every command ------------------------------------------------------

import argparse
import dataclasses

import pytest

from dlibbridge import __version__, cli

# command -> the shared options it must have (every command that writes has -o/--out).
_HAS = {
    "out": {"unfreeze", "freeze", "align", "pack", "finetune", "export", "embed", "evaluate", "camera",
            "finetune-detector", "identify", "cluster"},
    "workers": {"align", "finetune", "embed", "evaluate", "identify", "cluster"},
    "device": {"finetune", "embed", "evaluate", "compare", "identify", "cluster"},
    "overwrite": {"align", "pack", "camera", "identify", "cluster"},
    "progress": {"unfreeze", "align", "pack", "finetune", "embed", "evaluate", "camera", "identify", "cluster"},
    "json": {"inspect", "evaluate", "compare"},
}
# dest -> (spellings, default)
_SHARED = {
    "out": (("-o", "--out"), None),
    "workers": (("--workers",), None),
    "device": (("--device",), "auto"),
    "overwrite": (("--overwrite",), False),
    "progress": (("--quiet", "-q"), True),
    "json": (("--json",), False),
}
# (command, dest) -> the older spellings still accepted, unlisted, for one release
_OLDER = {("pack", "out"): ("--output",), ("export", "out"): ("--output",), ("embed", "out"): ("--output",),
          ("align", "workers"): ("--jobs", "-j"), ("evaluate", "workers"): ("--jobs", "-j"),
          ("align", "overwrite"): ("--redo",)}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _field_defaults(name: str) -> dict:
    """dest -> the default of the option field (a command whose options are given-only has its
    parser defaults suppressed: the field's own default applies)."""
    (cmd,) = [c for c in cli._COMMANDS if c.name == name]
    return {f.name: f.default for cls in cmd.options for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", [c.name for c in cli._COMMANDS])
def test_every_command_spells_the_shared_options_the_same(name):
    parser = _subparsers()[name]
    by_dest: dict[str, list[argparse.Action]] = {}
    for a in parser._actions:
        by_dest.setdefault(a.dest, []).append(a)
    defaults = _field_defaults(name)
    for dest, (listed, default) in _SHARED.items():
        assert (dest in by_dest) == (name in _HAS[dest]), f"{name}: {dest} present: {dest in by_dest}"
        if name not in _HAS[dest]:
            continue
        shown = [a for a in by_dest[dest] if a.help != argparse.SUPPRESS and a.option_strings]
        assert len(shown) == 1 and shown[0].option_strings == list(listed), (name, dest, shown)
        assert sorted(s for a in by_dest[dest] if a.help == argparse.SUPPRESS for s in a.option_strings) \
            == sorted(_OLDER.get((name, dest), ())), (name, dest)
        if dest != "out":               # what a command writes has no shared default
            assert defaults[dest] == default, (name, dest, defaults[dest])
            assert shown[0].default in (default, argparse.SUPPRESS)
    if name in _HAS["json"]:      # a switch everywhere: --json alone means True
        (switch,) = by_dest["json"]
        assert switch.const is True and switch.nargs in (0, "?")


def test_older_spellings_parse_as_the_new_ones():
    parser = cli.build_parser()
    same = [
        (["align", "raw", "-o", "out", "--workers", "2", "--overwrite"], ["align", "raw", "out", "-j", "2", "--redo"]),
        (["align", "raw", "-o", "out", "--workers", "2"], ["align", "raw", "-o", "out", "--jobs", "2"]),
        (["embed", "m", "d", "-o", "e.npz"], ["embed", "m", "d", "--output", "e.npz"]),
        (["evaluate", "m", "--data", "d", "--workers", "3"], ["evaluate", "m", "--data", "d", "-j", "3"]),
    ]
    for new, old in same:
        n, o = vars(parser.parse_args(new)), vars(parser.parse_args(old))
        if new[0] == "align":           # the older positional OUT_DIR and -o land in two fields
            n["out"], o["out"], o["out_dir"] = n["out"] or n["out_dir"], o["out"] or o["out_dir"], None
        assert n == o, (new, old)


def test_align_takes_its_output_folder_as_o_or_as_before_positionally(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    assert main(["align", str(raw), "-q"]) == 2
    assert "give the output folder: dlibbridge align RAW_DIR -o OUT_DIR" in capsys.readouterr().err
    assert main(["align", str(raw), str(tmp_path / "a"), "-o", str(tmp_path / "b"), "-q"]) == 2
    assert "two output folders" in capsys.readouterr().err
    for argv in (["-o", str(tmp_path / "a")], [str(tmp_path / "b")]):
        assert main(["align", str(raw), *argv, "-q", "--workers", "0"]) == 2     # an empty folder: nothing to do
        assert "holds no files" in capsys.readouterr().err


def test_version_and_a_bad_argument_says_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dlibbridge {__version__}"
    for argv in (["embed", "m", "d", "-o", "e.npz", "--no-such-option"], ["embed", "m", "d", "-o", "e.npz",
                                                                          "--workers", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("usage: dlibbridge embed "), err
        assert "dlibbridge embed: error: " in err and "{inspect," not in err


def test_an_absent_device_is_one_line_before_any_work(tmp_path, johns_dir, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    argvs = {
        "embed": ["embed", "default", str(johns_dir), "-o", str(tmp_path / "e.npz"), "-q"],
        "evaluate": ["evaluate", "default", "--data", str(johns_dir), "--no-cache", "-q", "-o", str(tmp_path / "r.json")],
        "finetune": ["finetune", str(johns_dir), "-o", str(tmp_path / "run"), "-q"],
    }
    for name, argv in argvs.items():
        assert main(argv + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"dlibbridge {name}: --device cuda: ") and "use --device cpu or auto" in err, err
        assert not (tmp_path / "e.npz").exists() and not (tmp_path / "r.json").exists()


def test_progress_is_a_line_every_few_seconds_where_stderr_is_no_terminal(capsys, monkeypatch):
    from dlibbridge import _progress
    monkeypatch.setattr(_progress, "LINE_EVERY_S", 0.0)
    bar = _progress.progress_bar(total=3, desc="work", unit="img")
    for _ in range(3):
        bar.update(1)
    bar.close()
    for _ in _progress.progress_bar(range(2), desc="hashing", leave=False):
        pass
    for _ in _progress.progress_bar(range(2), desc="silent", enabled=False):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and "silent" not in err
    lines = err.splitlines()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("hashing: 100%"), lines
    assert all(line.strip() for line in lines) and any(line.startswith("work: 100%") for line in lines)
