"""``dlibbridge`` command line.  Each subcommand is a thin shell over a library function;
argument parsing lives here, the work in the module that owns the concern.

A command's options are the :func:`~dlibbridge.options.option` fields of dataclasses: the
library's own config where one exists (``FinetuneConfig``, ``AlignSettings``, ``EvalConfig``),
else the small ``_<Command>Args`` classes below; :func:`build_parser` turns them into argparse
options, so each default, choice and help text is written once.  Heavy modules (torch, cv2)
are imported inside the handlers.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Callable

from . import __version__, _writable as w
from ._writable import check_output_dir, check_output_file
from ._paths import resolved
from .codec.tree import DlibFormatError, is_dlib_file
from .assets import resolve_model
from .data.align import AlignSettings
from .data.camera import DetectionSearch
from .errors import DlibbridgeError
from .eval.cluster import ClusterArgs, run_cluster
from .eval.compare import CompareArgs, run_compare
from .eval.evaluate import EvalConfig, PhotoAlignment
from .eval.faces import ModelOptions
from .eval.identify import IdentifyArgs, run_identify
from .options import (add_options, device_option, given_fields, json_option, option, out_option, overwrite_option,
                      quiet_option, workers_option)
from .train.config import FinetuneConfig
from .train.detector_config import DetectorFinetune


class UsageError(DlibbridgeError):
    """Options that contradict each other or are out of range."""


# ---- options shared by several commands -----------------------------------------------
# The ones every command spells the same way (-o/--out, --workers, --device, --overwrite,
# -q/--quiet, --json) are dlibbridge.options' out_option ... json_option; these are cli's own.

def _flag(help: str):
    return option(False, help, action="store_true")


def _count(help: str):
    """An optional whole number (None: the command's own default, said in ``help``)."""
    return option(None, help, type=int, metavar="N")


def _engine(what: str):
    return option("torch", f"run {what} through the torch port (default) or the dlib package itself",
                  choices=("torch", "dlib"))

def _height_by_width(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 480x640") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sizes must be positive")
    return h, w


# ---- the commands' own options ----------------------------------------------------------

@dataclass
class _InspectArgs:
    file: str | None = option(None, "dlib .dat file (default: the installed dlib face model)", positional=True,
                              nargs="?")
    json: bool = json_option("machine-readable output on stdout (schema in docs/inspect-json.md)")
    input_size: tuple[int, int] | None = option(
        None, "image size the output shapes are computed for, for networks that take any size "
              "(default: the network's fixed size, else 150x150)", type=_height_by_width, metavar="HxW")


@dataclass
class _AlignPaths:
    raw_dir: str = option(positional=True, metavar="RAW_DIR")
    # OUT_DIR after RAW_DIR is the older spelling of -o OUT_DIR, accepted unlisted
    out_dir: str | None = option(None, argparse.SUPPRESS, positional=True, nargs="?", metavar="OUT_DIR")
    out: str | None = out_option("OUT_DIR", "folder to write the chips, manifest.csv and summary.json into (required)",
                                 required=False)


@dataclass
class _AlignCamera:
    camera: str | None = option(None, "camera profile (dlibbridge camera): detect with the detector and upsampling "
                                "it chose (--detector/--upsample given here win)", metavar="CAMERA_JSON")


@dataclass
class _AlignRun:
    workers: int | None = workers_option("processes aligning photos (0 or 1: this process only; default: all cores)",
                                         hidden_flags=("--jobs", "-j"))
    overwrite: bool = overwrite_option("ignore an earlier run in OUT_DIR and redo everything", hidden_flags=("--redo",))
    progress: bool = quiet_option()


@dataclass
class _PackArgs:
    chips_dir: str = option(positional=True, metavar="CHIPS_DIR")
    out: str = out_option("STORE", "store folder to create", hidden_flags=("--output",))
    overwrite: bool = overwrite_option("replace an existing STORE")
    progress: bool = quiet_option()


@dataclass
class _CameraArgs:
    photos_dir: str = option(help="photos or 150x150 chips from the camera, any layout", positional=True,
                             metavar="PHOTOS_DIR")
    out: str = out_option("CAMERA_JSON", "profile to write (its plot goes beside it as .png)")
    overwrite: bool = overwrite_option("replace an existing camera profile (only one)")
    max_images: int | None = _count("measure N images spread over the folder (default all)")
    progress: bool = quiet_option()


@dataclass
class _EvaluateArgs:
    engine: str = _engine(".dat models")
    cache: str | None = option(None, "chips and descriptor cache (default ~/.cache/dlibbridge/evaluate)",
                               metavar="DIR")
    no_cache: bool = _flag("keep nothing between runs")
    # A switch, as everywhere; given a value it is the older spelling of -o (the results file).
    json: bool | str = option(False, "print results.json on stdout instead of the table (--json PATH.json, the older "
                              "spelling of -o PATH.json, still names the results file)", nargs="?", const=True,
                              metavar="PATH.json")


@dataclass
class _FinetuneArgs:
    resume: str | None = option(None, "continue this run from its last checkpoint", metavar="RUN_DIR")
    config: str | None = option(None, "start from the options of a run's config.json (reproduce it); the "
                                "options given win; --out is still required", metavar="CONFIG_JSON")


@dataclass
class _ExportArgs:
    model: str = option(positional=True, metavar="MODEL")
    out: str | None = out_option("OUT.dat", "dlib file to write", required=False, hidden_flags=("--output",))
    trainable: bool = _flag("write bn_con2 records instead of affine")
    onnx: str | None = option(None, "also write an ONNX graph (dynamic batch)", metavar="OUT.onnx")
    torchscript: str | None = option(None, "also write a traced TorchScript module", metavar="OUT.pt")
    pt2: str | None = option(None, "also write a torch.export program (load: torch.export.load(OUT.pt2).module())",
                             metavar="OUT.pt2")
    checkpoint: str | None = option(None, "also write a dlibbridge torch checkpoint (plain torch loads it "
                                    "with weights_only=True)", metavar="OUT.pt")
    atol: float = option(1e-5, "largest accepted max |diff| of the checks")


@dataclass
class _EmbedArgs:
    model: str = option(help="dlib .dat, dlibbridge checkpoint, TorchScript or ONNX file; 'default' = dlib's model",
                        positional=True, metavar="MODEL")
    images_dir: str = option(positional=True, metavar="IMAGES_DIR")
    out: str = out_option("OUT.npz", "descriptors file to write", hidden_flags=("--output",))
    batch_size: int = option(64, "chips per forward pass", metavar="N")
    device: str = device_option()
    engine: str = _engine("a .dat")
    workers: int | None = workers_option("processes decoding (and aligning) images while the network runs (0: none; "
                                         "default: one per core beyond the first, none for small folders)")
    progress: bool = quiet_option()


@dataclass
class _UnfreezeArgs:
    model: str | None = option(None, "dlib .dat file (default: the installed dlib face model)", positional=True,
                               nargs="?", metavar="MODEL")
    out: str | None = out_option("OUT", "output file (default: <name>_trainable.dat in the current folder)",
                                 required=False)
    calibrate: str | None = option(
        None, "aligned 150x150 chips (a folder, e.g. `dlibbridge align` output, or a `dlibbridge pack` store) to "
        "estimate each batch-norm's input statistics on; without FACES_DIR, the 25 sample chips shipped in the "
        "package (5 people)", metavar="FACES_DIR", nargs="?", const="sample")
    max_chips: int = option(1000, "calibrate on at most N chips, a seeded random subset", metavar="N")
    batch_size: int = option(25, "training batch size the training-mode deviation is reported for (default 25, "
                             "dlib's 5x5)", metavar="B")
    progress: bool = quiet_option()


@dataclass
class _FreezeArgs:
    net: str = option(help="trainable dlib file (e.g. saved by dnn_trainer or unfreeze)", positional=True,
                      metavar="NET.dat")
    out: str = out_option("OUT.dat", "output file (never the input)")


@dataclass(frozen=True)
class _Command:
    """One subcommand: its ``--help`` line, the option classes (in the order ``--help`` lists
    them) and its handler, whose docstring is the command's description.  Options of the ``given_only`` classes are
    absent from the parsed arguments unless given on the command line."""
    name: str
    help: str
    options: tuple[type, ...]
    run: Callable
    given_only: tuple[type, ...] = ()


# ---- handlers ----------------------------------------------------------------------



def _run_inspect(args) -> int:
    from .assets import is_torch_file
    from .codec import inspect as describe
    data = None
    if args.file not in (None, "-") and is_torch_file(resolve_model(args.file)):
        # a model.pt: described as the dlib file it exports to (torch only on this path)
        from .port.checkpoint import dlib_bytes
        data = dlib_bytes(resolve_model(args.file))
    return describe.main(args.file, as_json=args.json, input_size=args.input_size, data=data)


def _run_align(args) -> int:
    """Photos in RAW_DIR (one sub-folder per identity, or a flat folder) -> PNG chips made by
    dlib.get_face_chip(img, shape, 150, 0.25) in OUT_DIR (mirrored tree), plus manifest.csv and
    summary.json. Resumable: rerun to continue."""
    from .data import align as al
    given = given_fields(al.AlignSettings, args)
    if args.camera:
        from .data.camera import align_settings
        settings = align_settings(args.camera, **given)
    else:
        settings = al.AlignSettings(**given)
    if args.out and args.out_dir:
        raise UsageError(f"two output folders: {args.out_dir} and -o {args.out}; give -o OUT_DIR only")
    out_dir = args.out or args.out_dir
    if not out_dir:
        raise UsageError("give the output folder: dlibbridge align RAW_DIR -o OUT_DIR")
    cnn_factory = None
    if settings.detector == "cnn":
        from .port.mmod import cnn_face_detector
        cnn_factory = functools.partial(cnn_face_detector, settings.detector_model, precision=settings.cnn_precision)
    summary = al.align(args.raw_dir, out_dir, settings, jobs=None if args.workers is None else max(1, args.workers),
                       redo=args.overwrite, progress=args.progress, cnn_factory=cnn_factory)
    if summary["files"] == 0:
        raise al.AlignError(f"nothing to do: {args.raw_dir} holds no files")
    print(al.format_summary(summary))
    if summary["chips"] == 0:
        print(f"dlibbridge align: no face could be aligned in {summary['files']} files (see the status line)",
              file=sys.stderr)
        return 2
    return 0


def _run_pack(args) -> int:
    """CHIPS_DIR (output of align, or any folder of 150x150 chips with one sub-folder per identity)
    -> STORE folder: chips.u8 (N x 150 x 150 x 3 uint8), labels.npy, index.json. Resumable; the
    store appears only when complete."""
    from .data.store import pack
    store = pack(args.chips_dir, args.out, overwrite=args.overwrite, progress=args.progress)
    named = sum(1 for lab in store.labels if lab >= 0)
    print(f"{store.path}: {len(store)} chips, {len(store.identities)} identities "
          f"({named} chips with identity), {len(store.skipped)} files skipped"
          + (f" (e.g. {store.skipped[0]['path']}: {store.skipped[0]['reason']})" if store.skipped else ""))
    return 0


def _run_camera(args) -> int:
    """PHOTOS_DIR (any layout, no identities; 150x150 images are taken as aligned chips) ->
    camera.json (per-face records and their distributions; schema in docs/finetune.md) and
    camera.png beside it; a summary is printed."""
    from .data import camera
    if args.max_images is not None and args.max_images < 1:
        raise UsageError("--max-images must be at least 1")
    camera.check_output(args.out, args.photos_dir, args.overwrite)
    from .port.mmod import cnn_face_detector
    search = camera.DetectionSearch(**given_fields(camera.DetectionSearch, args))
    profile = camera.measure_folder(args.photos_dir, progress=args.progress, max_images=args.max_images,
                                    search=search, cnn_factory=cnn_face_detector)
    out, png = camera.write_camera(profile, args.out)
    print(profile.summary())
    print(f"wrote {out} and {png}")
    return 0


def _run_evaluate(args) -> int:
    """Evaluate one or more face models on LFW-style pairs (pairs.txt, --gen-pairs N, or without
    either pairs generated from the person folders of DIR): 10-fold accuracy, accuracy at 0.6,
    ROC AUC, EER, TAR@FAR 1e-3/1e-4, rank-1 and clustering. Prints a table (--json: the results
    instead), writes results.json (schema: docs/evaluation.md) and, with --report, an
    HTML/Markdown report with plots."""
    from pathlib import Path
    from .eval import evaluate as ev
    from .eval.embedders import ModelSpec, default_cache_dir
    fields = given_fields(ev.EvalConfig, args)
    if isinstance(args.json, str):          # --json PATH: the older spelling of -o PATH
        if not args.json.endswith(".json"):
            raise UsageError(f"--json is a switch (the results on stdout) and {args.json!r} is no .json file "
                             "to write them to; name the results file with -o PATH.json")
        if args.out:
            raise UsageError("--json PATH and -o both name the results file; give -o PATH only")
        fields["out"] = Path(args.json)
    if args.report:
        from .eval.report import check_report_dir
        check_output_dir(args.report, "--report")
        check_report_dir(args.report)
    if fields["out"]:
        check_output_file(fields["out"], "-o", kind="a dlibbridge results.json", is_kind=w.is_results_json)
    for name, v in (("--folds", args.n_folds), ("--batch-size", args.batch_size)):
        if v < 1:
            raise UsageError(f"{name} must be at least 1")
    if args.jitter < 0:
        raise UsageError("--jitter must be >= 0")
    cfg = ev.EvalConfig(**{
        **fields, "models": [ModelSpec.parse(m, args.engine) for m in args.models],
        "cache_dir": None if args.no_cache else (Path(args.cache) if args.cache else default_cache_dir())})
    evaluation = ev.run(cfg)
    if evaluation is None:  # under torchrun, a rank other than 0: its share is in rank 0's results
        return 0
    said = sys.stderr if args.json is True else sys.stdout
    if args.json is True:
        print(evaluation.results_file.read_text(encoding="utf-8"), end="")
    else:
        print(ev.format_table(evaluation.results))
    print(f"results: {evaluation.results_file}", file=said)
    if cfg.report is not None:
        from .eval.report import write_report
        print(f"report: {write_report(evaluation, cfg.report)}", file=said)
    return 0


def _run_finetune(args) -> int:
    """Fine-tune dlib's face ResNet on DATA (a chip store, a folder of aligned 150x150 chips
    DATA/<person>/<chip>, or raw photos DATA/<person>/<photo>, aligned first) and write
    RUN_DIR/model.dat (dlib.face_recognition_model_v1), model_trainable.dat, model.pt, with
    config.json, log.csv/val.csv/log.json, curves.png, checkpoint.pt, summary.json, threshold.json
    and README.md (the model card). Continue a killed run with --resume RUN_DIR; reproduce one with
    --config RUN_DIR/config.json. Multi-GPU/multi-node: launch with torchrun."""
    from .train.loop import finetune, load_resume_config, load_run_config
    given = {k: v for k, v in given_fields(FinetuneConfig, args).items() if k != "data"}
    origin = None
    if args.resume:
        if args.data or "out" in given or args.config:
            raise UsageError("--resume RUN_DIR takes DATA, --out and the options from the run's config.json")
        cfg, resume = load_resume_config(args.resume, given), True
    else:
        start, start_origin = load_run_config(args.config) if args.config else (None, None)
        if not (args.data or start) or "out" not in given:
            raise UsageError("give DATA and --out RUN_DIR (or --resume RUN_DIR, or --config CONFIG_JSON and --out)")
        if args.data:
            given["data"] = args.data
        cfg, origin = FinetuneConfig.compose(given, start, start_origin)
        resume = False
    summary = finetune(cfg, resume=resume, origin=origin)
    if summary:
        if summary.get("exports_base_model"):
            print("note: the exported model is the base model (step 0): no training step beat it on the held-out "
                  "identities, so model.dat is dlib's model unchanged; comparing it with the base compares dlib "
                  "with itself (more held-out identities, --export last, or other settings)")
        best = summary.get("best") or {}
        print(f"{cfg.out}: exported step {summary['exported_step']} of {summary['final_step']}"
              + (f" ({best.get('metric')} {best.get('score'):.4f})" if best else "")
              + f"; dlib check max |diff| {summary['export_check']['max_abs_diff']:.2e}")
        thr = summary.get("recommended_threshold")
        if thr:
            print(f"recommended distance threshold ({thr['domain']} validation): {thr['threshold']:.3f} (accuracy "
                  f"{thr['accuracy_at_threshold']:.4f}; at dlib's 0.6: {thr['accuracy_at_0.6']:.4f}); "
                  f"written to {cfg.out}/threshold.json")
    return 0


def _run_export(args) -> int:
    """MODEL (a dlib .dat in affine or bn_con form, a dlibbridge torch checkpoint, or 'default' for
    the installed dlib model) -> the deployed dlib file that dlib.face_recognition_model_v1 loads
    (-o), checked by loading it in dlib; with --trainable the bn_con form for dlib's trainer.
    Unchanged weights give a byte-identical file. --onnx/--torchscript/--pt2 take uint8 RGB chips
    N x 150 x 150 x 3 (dynamic N), as the torch module does, record that in the file, and are
    checked against the torch module."""
    import os
    from pathlib import Path
    from .port import convert
    from .port.checkpoint import load_model, save_torch
    from .port.export import check_onnx_installed, export_onnx, export_pt2, export_torchscript
    outputs = [o for o in (args.out, args.onnx, args.torchscript, args.pt2, args.checkpoint) if o]
    if not outputs:
        raise UsageError("nothing to do; give -o OUT.dat and/or --onnx/--torchscript/--pt2/--checkpoint")
    args.model = str(resolve_model(args.model))
    src = resolved(args.model, "MODEL")
    for o in outputs:
        if resolved(o, "output") == src:
            raise UsageError(f"refusing to overwrite the input {args.model}")
    if len({os.path.abspath(o) for o in outputs}) != len(outputs):
        raise UsageError("two outputs name the same file")
    if args.onnx:
        check_onnx_installed()
    for option, o, kind, is_kind in (("-o", args.out, "a dlib DNN file", is_dlib_file),
                                     ("--onnx", args.onnx, "an ONNX file", w.is_onnx),
                                     ("--torchscript", args.torchscript, "a TorchScript file", w.is_zip),
                                     ("--pt2", args.pt2, "a torch.export program", w.is_zip),
                                     ("--checkpoint", args.checkpoint, "a torch checkpoint", w.is_zip)):
        if o:
            check_output_file(o, option, src.stat().st_size if src.is_file() else 0, kind=kind, is_kind=is_kind)
    module = load_model(args.model)
    if args.out:
        diff = convert.to_dlib(module, args.out, trainable=args.trainable, check=True, atol=args.atol)
        form = "bn_con2" if args.trainable else "affine"
        print(f"{args.out}: dlib file ({form} form); dlib.face_recognition_model_v1 vs torch max |diff| {diff:.2e}")
    if args.onnx:
        diff = export_onnx(module, args.onnx, atol=args.atol)
        print(f"{args.onnx}: ONNX; onnxruntime vs torch max |diff| {diff:.2e}")
    if args.torchscript:
        diff = export_torchscript(module, args.torchscript, atol=args.atol)
        print(f"{args.torchscript}: TorchScript; vs torch max |diff| {diff:.2e}")
    if args.pt2:
        diff = export_pt2(module, args.pt2, atol=args.atol)
        print(f"{args.pt2}: torch.export program; vs torch max |diff| {diff:.2e}")
    if args.checkpoint:
        save_torch(module, args.checkpoint)
        print(f"{args.checkpoint}: dlibbridge torch checkpoint")
    return 0


def _run_embed(args) -> int:
    """Every image below IMAGES_DIR (recursive): a 150x150 image is taken as an aligned chip, any
    other is a photo, aligned as evaluate aligns (--detector, --multi, --no-fallback); images that
    give no chip are reported and left out. OUT.npz holds paths (the images, relative, sorted),
    embeddings (float32 N x 128), identities (each image's person: its first sub-folder, as in
    align's manifest), statuses (chip, detected or fallback), skipped_paths and skipped_reasons.
    Resumable: rerun the same command after an interruption."""
    from .eval.embed import embed_folder
    check_output_file(args.out, "-o", kind="an embeddings file", is_kind=w.is_embeddings)
    res = embed_folder(args.model, args.images_dir, args.out, batch_size=args.batch_size,
                       device=args.device, engine=args.engine, progress=args.progress,
                       workers=args.workers, alignment=PhotoAlignment(**given_fields(PhotoAlignment, args)))
    if res.rank:            # under torchrun: rank 0 reports the whole
        return 0
    for path, reason in res.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{res.out}: {len(res.paths)} embeddings" + (f", {len(res.skipped)} images skipped" if res.skipped else "")
          + (f" (resumed at image {res.resumed_from})" if res.resumed_from else ""))
    return 0


def _run_unfreeze(args) -> int:
    """Rewrite every affine_ record as a trainable bn_con2 (bn_fc2 in FC mode), every other record
    byte-identical, so dlib's training net_type (bn_con) loads the file.  Exact in inference.
    dlib's batch-norm uses batch statistics for any batch of more than one sample, so without
    --calibrate the training-mode output differs a lot from the deployed one; --calibrate re-seeds
    the statistics from your aligned chips."""
    from pathlib import Path
    from . import assets
    from .port.calibrate import unfreeze_file
    faces = args.calibrate
    if faces and Path(faces).is_file() and (faces.endswith(".dat") or is_dlib_file(faces)):
        # --calibrate's folder is optional, so `unfreeze --calibrate model.dat` hands it the model
        raise UsageError(f"--calibrate took {faces} as its FACES_DIR, but it is a model file; put the model "
                         f"first: dlibbridge unfreeze {faces} --calibrate [FACES_DIR]")
    src = assets.resolve_model(args.model)
    out = args.out or assets.default_output_path(src, "_trainable")
    if faces == "sample" and not Path(faces).exists():      # a folder really called "sample" wins
        faces = assets.sample_chips_dir()
    lines = unfreeze_file(src, out, faces, max_chips=args.max_chips, batch_size=args.batch_size,
                          progress=args.progress)
    print("\n".join(lines))
    if faces is None:
        print("note: uncalibrated. Inference is exact, but dlib's batch-norm trains on batch statistics, which "
              "are far from the stored ones: the first training steps start from a much worse network. "
              "Add --calibrate FACES_DIR (your aligned chips), or --calibrate alone for the shipped sample.")
    print(f"next: train {out} with dlib's C++ dnn_trainer (its bn_con net_type loads it; docs/unfreeze.md), "
          "or fine-tune in PyTorch with `dlibbridge finetune DATA --base "
          f"{out} -o RUN_DIR`")
    return 0


def _run_freeze(args) -> int:
    """Rewrite every bn_con2/bn_fc2 record as affine_ exactly as dlib's own bn->affine conversion
    computes it, so a network trained with dlib's dnn_trainer loads in
    dlib.face_recognition_model_v1 and in the torch port."""
    from .codec.rewrite import freeze_file
    lines = freeze_file(args.net, args.out)
    print("\n".join(lines))
    return 0


def _run_finetune_detector(args) -> int:
    """Fine-tune dlib's CNN face detector for a camera: PHOTOS_DIR holds clean photos (no labels:
    the base detector's boxes on them are the labels), seen through the camera of CAMERA_JSON
    (its degradation, at the upsampling its detection setting chose). Writes DET.dat, which
    dlib.cnn_face_detection_model_v1 loads (checked in dlib: the same boxes as the torch model),
    and DET.json: faces found and false detections on held-out photos, base vs fine-tuned. Use
    it with: dlibbridge align --detector cnn --detector-model DET.dat --upsample N."""
    from .train import detector as dt
    cfg = dt.DetectorFinetune(**given_fields(dt.DetectorFinetune, args))
    check_output_file(cfg.out, "-o", kind="a dlib DNN file", is_kind=is_dlib_file)
    report = dt.run(cfg)
    for name in ("base", "finetuned"):
        r = report[name]
        print(f"{name:>9}: {r['found']}/{r['faces']} faces found, {r['false_detections']} false detections "
              f"on {r['photos']} unseen camera photos (upsample {report['upsample']})")
    print(f"wrote {cfg.out} (same boxes in dlib on {report['export_boxes_checked_in_dlib']} detections) and its report")
    return 0


# The order shown by --help: the workflow's order.
_COMMANDS = (
    _Command("inspect", "list the layers of a dlib DNN file", (_InspectArgs,), _run_inspect),
    _Command("unfreeze", "deployed model -> trainable dlib file (affine_ -> bn_con2) for dlib's net_type",
             (_UnfreezeArgs,), _run_unfreeze),
    _Command("freeze", "trainable dlib file (bn_con2) -> deployable model (affine_), as dlib converts it",
             (_FreezeArgs,), _run_freeze),
    _Command("align", "detect, align and save 150x150 face chips exactly as dlib does",
             (_AlignPaths, AlignSettings, _AlignCamera, _AlignRun), _run_align, given_only=(AlignSettings,)),
    _Command("pack", "pack aligned chips into one memory-mapped array for training", (_PackArgs,), _run_pack),
    # Only options given on the command line reach the config: the dataclass's defaults, or
    # --camera's recipe, or a resumed run's config fill the rest.
    _Command("finetune", "fine-tune the face model on your faces; export model.dat for dlib",
             (FinetuneConfig, _FinetuneArgs), _run_finetune, given_only=(FinetuneConfig,)),
    _Command("export", "write a face model as a dlib .dat, ONNX, TorchScript or torch checkpoint",
             (_ExportArgs,), _run_export),
    _Command("embed", "descriptors of a folder of photos or aligned 150x150 chips -> OUT.npz",
             (_EmbedArgs, PhotoAlignment), _run_embed),
    _Command("evaluate", "LFW-protocol verification, TAR@FAR, identification; models side by side",
             (EvalConfig, _EvaluateArgs), _run_evaluate),
    _Command("finetune-detector", "fine-tune dlib's CNN face detector for a camera; export DET.dat for dlib",
             (DetectorFinetune,), _run_finetune_detector),
    _Command("compare", "are two photos the same person? distance and decision at the model's threshold",
             (CompareArgs, ModelOptions), run_compare),
    _Command("identify", "who is each face: nearest people of an enrolled gallery -> CSV",
             (IdentifyArgs, ModelOptions), run_identify),
    _Command("cluster", "group the faces of a photo folder by person (dlib's chinese whispers) into folders of links",
             (ClusterArgs, ModelOptions), run_cluster),
    _Command("camera", "measure a camera from its unlabeled photos (face size, colour, JPEG, blur, noise, exposure)",
             (_CameraArgs, DetectionSearch), _run_camera),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlibbridge",
        description="Bridge dlib's face ResNet and PyTorch: inspect and rewrite dlib DNN files losslessly, "
                    "unfreeze/freeze for dlib's trainer, align faces as dlib does, fine-tune, export back "
                    "to dlib, evaluate.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in _COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.run.__doc__)
        for cls in cmd.options:
            add_options(p, cls, suppress_defaults=cls in cmd.given_only)
        p.set_defaults(func=cmd.run)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# What an interrupted command leaves behind and how to go on (exit code 130).
_ON_INTERRUPT = {
    "align": lambda args: "finished photos are kept, run the same command again to continue",
    "pack": lambda args: "run the same command again to continue",
    "finetune": lambda args: f"continue with: dlibbridge finetune --resume {getattr(args, 'out', None) or args.resume}",
    "camera": lambda args: "nothing written",
    "embed": lambda args: "finished batches are kept, run the same command again to continue",
    "cluster": lambda args: "nothing written",
    "identify": lambda args: "nothing written",
    "evaluate": lambda args: ("nothing kept (--no-cache)" if args.no_cache else
                              "finished descriptors and chips are cached, run the same command again to continue"),
}
# evaluate, embed and the face jobs also report the library's plain ValueErrors (bad pairs,
# model or chip files found deep in their pipelines) as bad input, as they always have.
_ALSO_BAD_INPUT = {name: (ValueError,) for name in ("evaluate", "embed", "compare", "identify", "cluster")}


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Every error about the input or the request — a
    :class:`~dlibbridge.errors.DlibbridgeError` or an ``OSError`` — becomes one line
    ``dlibbridge COMMAND: message`` on stderr and exit code 2; nothing else is caught, so a
    bug still shows its traceback.  The command owns its process, so it first applies the CPU
    settings a library call leaves alone (:func:`~dlibbridge.port.runtime.tune_cpu`), before
    any handler imports torch."""
    from .port.runtime import tune_cpu
    tune_cpu()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:     # said with the command's usage, not the list of commands
        _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    bad_input = (DlibbridgeError, OSError) + _ALSO_BAD_INPUT.get(args.command, ())
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `dlibbridge inspect | head`
        sys.stderr.close()
        return 0
    except DlibFormatError as e:
        print(f"dlibbridge {args.command}: invalid dlib file: {e}", file=sys.stderr)
        return 2
    except IsADirectoryError as e:
        print(f"dlibbridge {args.command}: {e.filename} is a directory, not a file", file=sys.stderr)
        return 2
    except bad_input as e:
        print(f"dlibbridge {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command not in _ON_INTERRUPT:
            raise
        print(f"dlibbridge {args.command}: interrupted; {_ON_INTERRUPT[args.command](args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
