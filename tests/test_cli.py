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
