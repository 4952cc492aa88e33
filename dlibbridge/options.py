"""Command-line options declared on the fields of the dataclasses they configure.

A field made with :func:`option` carries its help, choices, flags and metavar; its default is
the field's own.  :func:`add_options` turns such fields into argparse options, so a default or a
choice is written once, where the code that uses it reads it, and ``--help`` and docs/cli.md
(generated from the parsers) cannot drift from it.  Fields made without :func:`option` are not
on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_KEY = "cli"
_ARGPARSE_KEYS = ("choices", "metavar", "nargs", "const", "action", "type", "required")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] | None = None,
           positional: bool = False, group: str | None = None, hidden_flags: tuple[str, ...] = (),
           show_default: bool = True, default_factory: Any = dataclasses.MISSING, **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line option.

    ``flags`` default to ``--field-name``; ``positional`` makes it an argument instead.
    ``hidden_flags`` are older spellings still accepted but not listed (the option and they
    form a mutually exclusive group).  ``help`` gets `` (default X)`` appended unless it
    mentions the default itself, the default is None/False/True/empty, or ``show_default`` is
    off.  ``type`` defaults to the default's type for int and float.  Other keywords
    (``choices``, ``metavar``, ``nargs``, ``const``, ``action``, ``required``) go to argparse."""
    unknown = set(argparse_kwargs) - set(_ARGPARSE_KEYS)
    if unknown:
        raise TypeError(f"option() got unknown argparse keywords {sorted(unknown)}")
    meta = {_KEY: {"help": help, "flags": flags, "positional": positional, "group": group,
                   "hidden_flags": tuple(hidden_flags), "show_default": show_default, **argparse_kwargs}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _help_text(spec: dict, default: Any) -> str:
    text = spec["help"]
    if (not spec["show_default"] or default is None or isinstance(default, bool) or default == ""
            or default is dataclasses.MISSING or "default" in text):
        return text
    shown = (format(default, "g") if isinstance(default, float) else str(default)).replace("%", "%%")
    return f"{text} (default {shown})" if text else f"default {shown}"


def add_options(parser: argparse.ArgumentParser, cls: type, suppress_defaults: bool = False) -> None:
    """Add the :func:`option` fields of ``cls`` (in field order) to ``parser``; fields with a
    ``group`` go into an argument group of that title (created at its first field).  With
    ``suppress_defaults`` an option not given on the command line is absent from the parsed
    namespace, so the dataclass's own default (or a recipe's) applies."""
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is None:
            continue
        if spec["group"] not in groups:
            groups[spec["group"]] = parser.add_argument_group(spec["group"])
        target = groups[spec["group"]]
        default = f.default       # MISSING for required fields and default factories
        kwargs = {k: spec[k] for k in _ARGPARSE_KEYS if k in spec}
        if "type" not in kwargs and kwargs.get("action") is None and type(default) in (int, float):
            kwargs["type"] = type(default)
        kwargs["help"] = _help_text(spec, default)
        if spec["positional"]:
            if default is not dataclasses.MISSING:
                kwargs["default"] = argparse.SUPPRESS if suppress_defaults else default
            target.add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        elif default is not dataclasses.MISSING:
            kwargs["default"] = default
        flags = spec["flags"] or ("--" + f.name.replace("_", "-"),)
        if spec["hidden_flags"]:
            exclusive = target.add_mutually_exclusive_group(required=kwargs.pop("required", False))
            exclusive.add_argument(*flags, **kwargs)
            exclusive.add_argument(*spec["hidden_flags"], **{**kwargs, "help": argparse.SUPPRESS})
        else:
            target.add_argument(*flags, **kwargs)


def given_fields(cls: type, namespace: argparse.Namespace | dict) -> dict:
    """The values in ``namespace`` of ``cls``'s fields (the options parsed for it)."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


# ---- the options every command spells the same way ----------------------------------------
# tests/test_cli.py walks every command's parser and checks these spellings and defaults.  A
# command that spelled one differently before passes its older spellings as ``hidden_flags``:
# accepted, unlisted, for one release.

def non_negative_int(text: str) -> int:
    """argparse type of counts where 0 means "none" (``--workers 0``: work in this process)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return value


def out_option(metavar: str, help: str, *, required: bool = True, default: Any = None, **extra) -> Any:
    """``-o/--out``: what the command writes.  ``extra``: more :func:`option` keywords (``group``,
    ``type``, ``hidden_flags``)."""
    return option(default, help, flags=("-o", "--out"), metavar=metavar, required=required, **extra)


def workers_option(help: str, **extra) -> Any:
    """``--workers N``: helper processes; None leaves the choice to the command (said in ``help``)."""
    return option(None, help, flags=("--workers",), type=non_negative_int, metavar="N", **extra)


#: ``--device``'s default everywhere: the GPU when torch sees one.
DEVICE_AUTO = "auto"


def device_option(**extra) -> Any:
    """``--device``: where the network runs (resolved, with a one-line error for a device this
    torch lacks, by :func:`dlibbridge.port.device.resolve_device`)."""
    return option(DEVICE_AUTO, "torch device: cpu, cuda, cuda:N, mps, or auto (default: cuda when torch sees a GPU, "
                  "else cpu)", metavar="DEVICE", **extra)


def overwrite_option(help: str, **extra) -> Any:
    """``--overwrite``: replace what an earlier run left."""
    return option(False, help, flags=("--overwrite",), action="store_true", **extra)


def quiet_option(**extra) -> Any:
    """``-q/--quiet``, stored as ``progress`` (False when given), the name the library's
    functions take."""
    return option(True, "no progress output", flags=("--quiet", "-q"), action="store_false", **extra)


def json_option(help: str = "print the result as JSON on stdout instead of the table") -> Any:
    """``--json``: a switch, machine-readable output on stdout; files are named with ``-o``."""
    return option(False, help, action="store_true")
