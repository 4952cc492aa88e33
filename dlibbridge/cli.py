"""``dlibbridge`` command line.  Each subcommand is a thin shell over a library function;
argument parsing lives here, the work in the module that owns the concern.

Sections are kept one per subcommand (``_add_<name>`` registers it) so that parsers stay
independent; heavy modules (torch, cv2) are imported inside the handlers.
"""
from __future__ import annotations

import argparse
import sys

from .format import DlibFormatError


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the layers of a dlib DNN file")
    p.add_argument("file", nargs="?", help="dlib .dat file (default: the installed dlib face model)")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/inspect-json.md)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from . import describe
    return describe.main(args.file, as_json=args.json)


# Registration order is the order shown by --help.
_COMMANDS = [
    _add_inspect,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlibbridge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DlibFormatError as e:
        print(f"dlibbridge {args.command}: invalid dlib file: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"dlibbridge {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
