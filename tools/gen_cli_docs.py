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


def _listed(parser: argparse.ArgumentParser, hidden: argparse.Action) -> argparse.Action:
    """The listed option that a hidden older spelling stands for: the same field, or (an older
    positional) the option of the same metavar."""
    listed = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    return next((a for a in listed if a.dest == hidden.dest), None) or next(
        a for a in listed if a.metavar == hidden.metavar)


def render() -> str:
    sys.path.insert(0, str(REPO))
    from dlibbridge.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["# Command-line reference", "",
           "Generated from the parsers by `python tools/gen_cli_docs.py`; `dlibbridge CMD --help` says the same.",
           "Every command reports bad input as one line `dlibbridge CMD: message` and exit code 2, and a bad",
           "argument with the command's own usage; `dlibbridge --version` prints the version.", "",
           "Every command spells the options it shares with others the same way (tests/test_cli.py checks it):",
           "`-o/--out` what it writes, `--workers N` helper processes, `--device` (default `auto`: cuda when",
           "torch sees a GPU, else cpu; a device this torch lacks is one line and exit code 2), `--overwrite`,",
           "`-q/--quiet`, and `--json`, a switch printing the result as JSON on stdout. Progress is a bar on a",
           "terminal and a plain line every few seconds anywhere else (a log, a pipe). Older spellings listed",
           "under a command are still accepted, unlisted in `--help`, for one release.", ""]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        out += [f"## `dlibbridge {name}`", "", _cell(helps.get(name, "")), ""]
        if p.description:
            out += [_cell(p.description), ""]
        older = [a for a in p._actions if a.help == argparse.SUPPRESS]
        if older:
            out += ["Older spellings, still accepted: " + "; ".join(
                f"{_option(a)} (now {_option(_listed(p, a))})" for a in older) + ".", ""]
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
