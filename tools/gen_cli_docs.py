"""Write docs/cli.md from the command line's own parsers, so the reference cannot drift from
``--help``: ``python tools/gen_cli_docs.py`` (tests/test_cli.py fails when the file is stale)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cli.md"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option(a: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
    if a.option_strings and a.nargs != 0:
        names += f" {a.metavar or a.dest.upper()}"
    return names


def render() -> str:
    sys.path.insert(0, str(REPO))
    from dlibbridge.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# Command-line reference", "",
           "Generated from the parsers by `python tools/gen_cli_docs.py`; `dlibbridge CMD --help` says the same.",
           "Every command reports bad input as one line `dlibbridge CMD: message` and exit code 2.", ""]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        out += [f"## `dlibbridge {name}`", "", _cell(helps.get(name, "")), ""]
        if p.description:
            out += [_cell(p.description), ""]
        out += ["| argument | meaning | default |", "| --- | --- | --- |"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            default = "" if a.default in (None, False, argparse.SUPPRESS) or a.nargs == 0 else f"`{a.default}`"
            choices = f" (one of {', '.join(f'`{c}`' for c in a.choices)})" if a.choices else ""
            out.append(f"| {_option(a)} | {_cell((a.help or '') % {'default': a.default} if a.help and '%(' in a.help else (a.help or '').replace('%%', '%'))}{choices} | {default} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC.relative_to(REPO)}")
