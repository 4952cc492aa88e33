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


# ---- align (issue 5: face data pipeline) ------------------------------------------------

def _add_align(sub) -> None:
    p = sub.add_parser(
        "align", help="detect, align and save 150x150 face chips exactly as dlib does",
        description="Photos in RAW_DIR (one sub-folder per identity, or a flat folder) -> PNG chips "
                    "made by dlib.get_face_chip(img, shape, 150, 0.25) in OUT_DIR (mirrored tree), "
                    "plus manifest.csv and summary.json. Resumable: rerun to continue.")
    p.add_argument("raw_dir", metavar="RAW_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog",
                   help="dlib's HOG detector (default) or its CNN mmod_human_face_detector")
    p.add_argument("--upsample", type=int, default=1, metavar="N",
                   help="upsample the image N times before detecting (default 1, as dlib's examples)")
    p.add_argument("--multi", choices=("largest", "center", "all", "skip"),
                   help="several faces in a photo: keep the largest, the most central, all, or skip "
                        "the photo (default: largest with identity folders, all in a flat folder)")
    p.add_argument("--fallback", choices=("center",),
                   help="no face found: take a central box (for pre-cropped sets such as LFW)")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="decompression-bomb guard: refuse images with more pixels (default 40000000)")
    p.add_argument("--decoder", choices=("dlib", "pillow"), default="dlib",
                   help="JPEG decoder (default dlib's, for chips identical to dlib's pipeline)")
    p.add_argument("--redo", action="store_true", help="ignore an earlier run in OUT_DIR and redo everything")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_align)


def _run_align(args) -> int:
    from . import align as al
    from .data import DEFAULT_MAX_PIXELS
    try:
        settings = al.AlignSettings(detector=args.detector, upsample=args.upsample, multi=args.multi,
                                    fallback=args.fallback, decoder=args.decoder,
                                    max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
        if args.jobs is not None and args.jobs < 1:
            raise al.AlignError("--jobs must be at least 1")
        summary = al.align(args.raw_dir, args.out_dir, settings, jobs=args.jobs, redo=args.redo,
                           progress=not args.quiet)
    except al.AlignError as e:
        print(f"dlibbridge align: {e}", file=sys.stderr)
        return 2
    print(al.format_summary(summary))
    return 0


# ---- pack (issue 5: chip store) -------------------------------------------------------------

def _add_pack(sub) -> None:
    p = sub.add_parser(
        "pack", help="pack aligned chips into one memory-mapped array for training",
        description="CHIPS_DIR (output of align, or any folder of 150x150 chips with one sub-folder "
                    "per identity) -> STORE folder: chips.u8 (N x 150 x 150 x 3 uint8), labels.npy, "
                    "index.json. Resumable; the store appears only when complete.")
    p.add_argument("chips_dir", metavar="CHIPS_DIR")
    p.add_argument("-o", "--output", required=True, metavar="STORE", help="store folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_pack)


def _run_pack(args) -> int:
    from .data import StoreError, pack
    try:
        store = pack(args.chips_dir, args.output, overwrite=args.overwrite, progress=not args.quiet)
    except StoreError as e:
        print(f"dlibbridge pack: {e}", file=sys.stderr)
        return 2
    named = sum(1 for lab in store.labels if lab >= 0)
    print(f"{store.path}: {len(store)} chips, {len(store.identities)} identities "
          f"({named} chips with identity), {len(store.skipped)} files skipped"
          + (f" (e.g. {store.skipped[0]['path']}: {store.skipped[0]['reason']})" if store.skipped else ""))
    return 0


# Registration order is the order shown by --help.
_COMMANDS = [
    _add_inspect,
    _add_align,
    _add_pack,
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
    except BrokenPipeError:  # e.g. `dlibbridge inspect | head`
        sys.stderr.close()
        return 0
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"dlibbridge {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
