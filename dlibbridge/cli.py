"""``dlibbridge`` command line.  Each subcommand is a thin shell over a library function;
argument parsing lives here, the work in the module that owns the concern.

Sections are kept one per subcommand (``_add_<name>`` registers it) so that parsers stay
independent; heavy modules (torch, cv2) are imported inside the handlers.
"""
from __future__ import annotations

import argparse
import sys

from . import _writable as w
from ._writable import check_output_dir, check_output_file
from .codec.tree import DlibFormatError, is_dlib_file
from .assets import resolve_model
from .errors import DlibbridgeError


class UsageError(DlibbridgeError):
    """Options that contradict each other or are out of range."""


def _out_option(p, **kwargs) -> None:
    """Every command names what it writes ``-o/--out``; ``--output`` (the older spelling of
    pack, export and embed) stays accepted, unlisted."""
    g = p.add_mutually_exclusive_group(required=kwargs.pop("required", False))
    g.add_argument("-o", "--out", dest="out", **kwargs)
    g.add_argument("--output", dest="out", metavar=kwargs.get("metavar"), help=argparse.SUPPRESS)


# ---- inspect -------------------------------------------------------------

def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the layers of a dlib DNN file")
    p.add_argument("file", nargs="?", help="dlib .dat file (default: the installed dlib face model)")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/inspect-json.md)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from .codec import inspect as describe
    return describe.main(args.file, as_json=args.json)


# ---- align ------------------------------------------------

def _add_align(sub) -> None:
    p = sub.add_parser(
        "align", help="detect, align and save 150x150 face chips exactly as dlib does",
        description="Photos in RAW_DIR (one sub-folder per identity, or a flat folder) -> PNG chips "
                    "made by dlib.get_face_chip(img, shape, 150, 0.25) in OUT_DIR (mirrored tree), "
                    "plus manifest.csv and summary.json. Resumable: rerun to continue.")
    p.add_argument("raw_dir", metavar="RAW_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog",
                   help="dlib's HOG detector (default) or its CNN mmod_human_face_detector, run by "
                        "dlibbridge's torch port (the same rectangles as dlib's, batched, faster)")
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
    from .data import align as al
    from .data.images import DEFAULT_MAX_PIXELS
    settings = al.AlignSettings(detector=args.detector, upsample=args.upsample, multi=args.multi,
                                fallback=args.fallback, decoder=args.decoder,
                                max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    cnn_factory = None
    if args.detector == "cnn":
        from .port.mmod import cnn_face_detector
        cnn_factory = cnn_face_detector
    summary = al.align(args.raw_dir, args.out_dir, settings, jobs=args.jobs, redo=args.redo,
                       progress=not args.quiet, cnn_factory=cnn_factory)
    if summary["files"] == 0:
        raise al.AlignError(f"nothing to do: {args.raw_dir} holds no files")
    print(al.format_summary(summary))
    if summary["chips"] == 0:
        print(f"dlibbridge align: no face could be aligned in {summary['files']} files (see the status line)",
              file=sys.stderr)
        return 2
    return 0


# ---- pack -------------------------------------------------------------

def _add_pack(sub) -> None:
    p = sub.add_parser(
        "pack", help="pack aligned chips into one memory-mapped array for training",
        description="CHIPS_DIR (output of align, or any folder of 150x150 chips with one sub-folder "
                    "per identity) -> STORE folder: chips.u8 (N x 150 x 150 x 3 uint8), labels.npy, "
                    "index.json. Resumable; the store appears only when complete.")
    p.add_argument("chips_dir", metavar="CHIPS_DIR")
    _out_option(p, required=True, metavar="STORE", help="store folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_pack)


def _run_pack(args) -> int:
    from .data.store import pack
    store = pack(args.chips_dir, args.out, overwrite=args.overwrite, progress=not args.quiet)
    named = sum(1 for lab in store.labels if lab >= 0)
    print(f"{store.path}: {len(store)} chips, {len(store.identities)} identities "
          f"({named} chips with identity), {len(store.skipped)} files skipped"
          + (f" (e.g. {store.skipped[0]['path']}: {store.skipped[0]['reason']})" if store.skipped else ""))
    return 0


# ---- camera ------------------------------------------------------------

def _add_camera(sub) -> None:
    p = sub.add_parser(
        "camera", help="measure a camera from its unlabeled photos (face size, colour, JPEG, blur, noise, exposure)",
        description="PHOTOS_DIR (any layout, no identities; 150x150 images are taken as aligned chips) -> "
                    "camera.json (per-face records and their distributions; schema in docs/finetune.md) "
                    "and camera.png beside it; a summary is printed.")
    p.add_argument("photos_dir", metavar="PHOTOS_DIR", help="photos or 150x150 chips from the camera, any layout")
    _out_option(p, required=True, metavar="CAMERA_JSON", help="profile to write (its plot goes beside it as .png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing camera profile (only one)")
    p.add_argument("--max-images", type=int, metavar="N", help="measure N images spread over the folder (default all)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_camera)


def _run_camera(args) -> int:
    from .data import camera
    if args.max_images is not None and args.max_images < 1:
        raise UsageError("--max-images must be at least 1")
    camera.check_output(args.out, args.photos_dir, args.overwrite)
    profile = camera.measure_folder(args.photos_dir, progress=not args.quiet, max_images=args.max_images)
    out, png = camera.write_camera(profile, args.out)
    print(profile.summary())
    print(f"wrote {out} and {png}")
    return 0


# ---- evaluate --------------------------------------------

def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="LFW-protocol verification, TAR@FAR, identification; models side by side",
        description="Evaluate one or more face models on LFW-style pairs (pairs.txt, or --gen-pairs from "
                    "identity folders): 10-fold accuracy, accuracy at 0.6, ROC AUC, EER, TAR@FAR 1e-3/1e-4, "
                    "rank-1 and clustering. Prints a table, writes results.json (schema: docs/evaluation.md) "
                    "and, with --report, an HTML/Markdown report with plots.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="dlib .dat, dlibbridge torch checkpoint, TorchScript or ONNX file; 'default' = the "
                        "installed dlib model; prefix dlib: or torch: to pick the engine for one model")
    p.add_argument("--data", required=True, metavar="DIR", help="identity folders: DIR/<person>/<image>")
    p.add_argument("--pairs", metavar="PAIRS",
                   help="LFW pairs.txt to evaluate on (with --gen-pairs: where to save the generated pairs)")
    p.add_argument("--gen-pairs", type=int, metavar="N",
                   help="generate N balanced pairs in identity-disjoint folds from DIR (seeded, saved for reuse)")
    p.add_argument("--folds", type=int, default=10, metavar="K", help="folds for --gen-pairs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for --gen-pairs and the gallery split (default 0)")
    p.add_argument("--report", metavar="OUT_DIR", help="write report.html/report.md, plots and worst errors here")
    p.add_argument("--json", metavar="PATH", help="results.json path (default: OUT_DIR/results.json or ./results.json)")
    p.add_argument("--engine", choices=("torch", "dlib"), default="torch",
                   help="run .dat models through the torch port (default) or the dlib package itself")
    p.add_argument("--flip", action="store_true", help="average each descriptor with its mirror image's")
    p.add_argument("--jitter", type=int, default=0, metavar="N",
                   help="average N of dlib's random jitters per face (dlib's 99.38%% LFW figure used 100)")
    p.add_argument("--no-identification", action="store_true", help="skip rank-1 and clustering (fewer images)")
    p.add_argument("--cache", metavar="DIR", help="chips and descriptor cache (default ~/.cache/dlibbridge/evaluate)")
    p.add_argument("--no-cache", action="store_true", help="keep nothing between runs")
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog", help="face detector for non-chip images")
    p.add_argument("--upsample", type=int, default=1, metavar="N", help="detector upsampling (default 1)")
    p.add_argument("--multi", choices=("center", "largest"), default="center",
                   help="several faces in a photo: the most central (default; LFW's subject is centred) or largest")
    p.add_argument("--no-fallback", action="store_true",
                   help="photos without a detected face get no chip (default: a central box, as for LFW crops)")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="alignment processes (default: all cores)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="faces per forward pass (default 64)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from pathlib import Path
    from .eval import evaluate as ev
    from .eval.embedders import ModelSpec, default_cache_dir
    if args.report:
        check_output_dir(args.report, "--report")
    if args.json:
        check_output_file(args.json, "--json", kind="a dlibbridge results.json", is_kind=w.is_results_json)
    for name, v in (("--folds", args.folds), ("--batch-size", args.batch_size)):
        if v < 1:
            raise UsageError(f"{name} must be at least 1")
    if args.jitter < 0 or (args.jobs is not None and args.jobs < 1):
        raise UsageError("--jitter must be >= 0 and --jobs >= 1")
    cfg = ev.EvalConfig(
        models=[ModelSpec.parse(m, args.engine) for m in args.models], data=Path(args.data),
        pairs=args.pairs and Path(args.pairs), gen_pairs=args.gen_pairs, n_folds=args.folds, seed=args.seed,
        report=args.report and Path(args.report), json_path=args.json and Path(args.json), flip=args.flip,
        jitter=args.jitter, identification=not args.no_identification,
        cache_dir=None if args.no_cache else (Path(args.cache) if args.cache else default_cache_dir()),
        detector=args.detector, upsample=args.upsample, multi=args.multi,
        fallback=None if args.no_fallback else "center", jobs=args.jobs, device=args.device,
        batch_size=args.batch_size, progress=not args.quiet)
    evaluation = ev.run(cfg)
    print(ev.format_table(evaluation.results))
    print(f"results: {evaluation.results_file}")
    if cfg.report is not None:
        from .eval.report import write_report
        print(f"report: {write_report(evaluation, cfg.report)}")
    return 0


# ---- finetune ---------------------------------------------------------

def _add_finetune(sub) -> None:
    S = argparse.SUPPRESS      # only options given on the command line reach the config
    p = sub.add_parser(
        "finetune", help="fine-tune the face model on your faces; export model.dat for dlib",
        description="Fine-tune dlib's face ResNet on DATA (a chip store, a folder of aligned 150x150 chips "
                    "DATA/<person>/<chip>, or raw photos DATA/<person>/<photo>, aligned first) and write "
                    "RUN_DIR/model.dat (dlib.face_recognition_model_v1), model_trainable.dat, model.pt, with "
                    "config.json, log.csv/val.csv/log.json, curves.png, checkpoint.pt, summary.json. "
                    "Continue a killed run with --resume RUN_DIR. Multi-GPU/multi-node: launch with torchrun.")
    p.add_argument("data", nargs="?", metavar="DATA")
    p.add_argument("--base", default=S, metavar="MODEL",
                   help="dlib .dat (deployed or trainable) or a dlibbridge model.pt (default: dlib's model)")
    p.add_argument("--out", default=S, metavar="RUN_DIR", help="run folder to create (required unless --resume)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    g = p.add_argument_group("loss and batches")
    g.add_argument("--loss", default=S, choices=("metric", "arcface", "cosface", "triplet"),
                   help="metric = dlib's loss_metric (default); arcface/cosface: normalised head, s=64; "
                        "triplet: semi-hard mining")
    g.add_argument("--margin", type=float, default=S,
                   help="loss margin (default: metric 0.04, arcface 0.5, cosface 0.35, triplet 0.2)")
    g.add_argument("--scale", type=float, default=S, help="arcface/cosface scale s (default 64)")
    g.add_argument("--identities-per-batch", "-P", type=int, default=S, metavar="P", help="default 5")
    g.add_argument("--images-per-identity", "-K", type=int, default=S, metavar="K", help="default 5")
    g.add_argument("--batches-per-epoch", type=int, default=S, metavar="N",
                   help="default: about every training image once per epoch")
    g.add_argument("--accumulate", type=int, default=S, metavar="N",
                   help="split each batch into N micro-batches of whole identities (less memory)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="default 10")
    g.add_argument("--max-steps", type=int, default=S, metavar="N", help="stop after N optimiser steps")
    g.add_argument("--optimizer", default=S, choices=("sgd", "adamw"), help="default sgd")
    g.add_argument("--lr", type=float, default=S, help="default: sgd 1e-4; adamw 1e-6 (1e-5 with arcface/cosface)")
    g.add_argument("--momentum", type=float, default=S, help="sgd momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=S, help="default: sgd 1e-4, adamw 1e-2")
    g.add_argument("--schedule", default=S, choices=("cosine", "step", "constant"), help="default cosine")
    g.add_argument("--warmup-steps", type=int, default=S, help="default 5%% of the steps (at most 500)")
    g.add_argument("--step-every", type=int, default=S, metavar="N", help="step schedule period (default total/3)")
    g.add_argument("--step-gamma", type=float, default=S, help="step schedule factor (default 0.1)")
    g.add_argument("--amp", default=S, choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (default: bf16 on CUDA, off on CPU)")
    g = p.add_argument_group("guards against forgetting")
    g.add_argument("--freeze-until", default=S, choices=("none", "stem", "level4", "level3", "level2", "level1", "level0"),
                   help="freeze the stem and the levels up to LEVEL (input side first)")
    g.add_argument("--pretrained-lr-scale", type=float, default=S,
                   help="lr factor for the pretrained network (default 0.1 with a new head, else 1)")
    g.add_argument("--same-input-distill", "--distill", dest="distill", type=float, default=S, metavar="W",
                   help="add W * mean ||e - e_base||^2 pulling embeddings to the base model's embedding of the "
                        "same (augmented) input (default 0; 1 with --camera)")
    g.add_argument("--bn", default=S, choices=("frozen", "train"),
                   help="batch-norm statistics: frozen (default; step 0 = the deployed model) or trained "
                        "(calibrated on training data first)")
    g = p.add_argument_group("target camera (docs/finetune.md: cross-quality fine-tuning)")
    g.add_argument("--camera", default=S, metavar="CAMERA_JSON",
                   help="fine-tune for this camera (`dlibbridge camera` profile): cross-quality distillation "
                        "with the measured recipe as the defaults; validation in the clean and camera domains")
    g.add_argument("--target-photos", default=S, metavar="DIR",
                   help="unlabeled aligned chips from the target camera: adapt batch-norm to them first")
    g.add_argument("--xq-weight", type=float, default=S, metavar="W",
                   help="cross-quality term: student(degraded) to teacher(clean) (default 1)")
    g.add_argument("--xq-distance", default=S, choices=("squared", "cosine"),
                   help="cross-quality distance: cosine (1 - cos; the --camera default) or squared")
    g.add_argument("--relational-weight", type=float, default=S, metavar="W",
                   help="relational guard: the teacher's pairwise distances of the clean batch (default 1)")
    g.add_argument("--train-until", default=S, choices=("level4", "level3", "level2", "level1", "level0"),
                   help="last trained level of a camera run; the levels above it and the fc stay the base's "
                        "(default: the recipe's, docs/finetune.md)")
    g.add_argument("--camera-versions", type=int, default=S, metavar="N",
                   help="degraded versions cached per training chip (default 4)")
    g.add_argument("--clean-limit", type=float, default=S, metavar="F",
                   help="a selected step loses at most F of the base's clean TAR@FAR (default 0.01 = 1 point)")
    g = p.add_argument_group("data")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S,
                   help="no jitter (dlib-example crop/rotation/flip/colour)")
    g.add_argument("--degrade", default=S, metavar="SPEC",
                   help="random degradations, e.g. gray=0.3,blur=0.2,lowres=0.3,jpeg=0.3")
    g.add_argument("--val-identities", type=float, default=S, metavar="F",
                   help="held-out identities: fraction (<1) or count (default 0.1; 0 = no validation)")
    g.add_argument("--val-every", type=int, default=S, metavar="E", help="validate every E epochs (default 1)")
    g.add_argument("--select-metric", default=S, metavar="[DOMAIN:]METRIC",
                   help="best-checkpoint metric: tar@far (default, FAR=1e-3), auc or accuracy; with --camera "
                        "prefixed by the domain, camera: (default) or clean:, within --clean-limit")
    g.add_argument("--patience", type=int, default=S, metavar="N",
                   help="stop after N validations without improvement")
    g.add_argument("--export", default=S, choices=("best", "last"), help="which weights to export (default best)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-every", type=int, default=S, metavar="N", help="default 200 steps")
    g.add_argument("--device", default=S, help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--workers", type=int, default=S, help="data loading processes (default: 8 on CUDA, 0 on CPU)")
    g.add_argument("--seed", type=int, default=S, help="default 0")
    g.add_argument("--onnx", action="store_true", default=S, help="also write model.onnx")
    g.add_argument("--quiet", "-q", dest="progress", action="store_false", default=S, help="no progress bar")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    from .train.config import FinetuneConfig
    from .train.loop import finetune, load_resume_config
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "data", "resume")}
    if args.resume:
        if args.data or "out" in given:
            raise UsageError("--resume RUN_DIR takes DATA and --out from the run's config.json")
        cfg, resume = load_resume_config(args.resume, given), True
    else:
        if not args.data or "out" not in given:
            raise UsageError("give DATA and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = (FinetuneConfig.for_camera(args.data, **given) if "camera" in given
               else FinetuneConfig(data=args.data, **given))
        resume = False
    summary = finetune(cfg, resume=resume)
    if summary:
        best = summary.get("best") or {}
        print(f"{cfg.out}: exported step {summary['exported_step']} of {summary['final_step']}"
              + (f" ({best.get('metric')} {best.get('score'):.4f})" if best else "")
              + f"; dlib check max |diff| {summary['export_check']['max_abs_diff']:.2e}")
        thr = summary.get("recommended_threshold")
        if thr:
            print(f"recommended distance threshold on this camera: {thr['threshold']:.3f} (accuracy "
                  f"{thr['accuracy_at_threshold']:.4f}; at dlib's 0.6: {thr['accuracy_at_0.6']:.4f}); "
                  f"written to {cfg.out}/threshold.json")
        if summary["exported_step"] == 0:
            print("note: the exported model is the base model (step 0): no training step beat it on the held-out "
                  "identities, so model.dat is dlib's model unchanged; comparing it with the base compares dlib "
                  "with itself (more held-out identities, --export last, or other settings)")
    return 0


# ---- export / embed -----------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a face model as a dlib .dat, ONNX, TorchScript or torch checkpoint",
        description="MODEL (a dlib .dat in affine or bn_con form, a dlibbridge torch checkpoint, or "
                    "'default' for the installed dlib model) -> the deployed dlib file that "
                    "dlib.face_recognition_model_v1 loads (-o), checked by loading it in dlib; with "
                    "--trainable the bn_con form for dlib's trainer. Unchanged weights give a "
                    "byte-identical file. --onnx/--torchscript/--pt2 take float32 N x 3 x 150 x 150 RGB 0-255 "
                    "(dynamic N) and are checked against the torch module.")
    p.add_argument("model", metavar="MODEL")
    _out_option(p, metavar="OUT.dat", help="dlib file to write")
    p.add_argument("--trainable", action="store_true", help="write bn_con2 records instead of affine")
    p.add_argument("--onnx", metavar="OUT.onnx", help="also write an ONNX graph (dynamic batch)")
    p.add_argument("--torchscript", metavar="OUT.pt", help="also write a traced TorchScript module")
    p.add_argument("--pt2", metavar="OUT.pt2",
                   help="also write a torch.export program (load: torch.export.load(OUT.pt2).module())")
    p.add_argument("--checkpoint", metavar="OUT.pt",
                   help="also write a dlibbridge torch checkpoint (loads with torch.load(weights_only=True))")
    p.add_argument("--atol", type=float, default=1e-5, help="largest accepted max |diff| of the checks (default 1e-5)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import os
    from pathlib import Path
    from .port import convert
    from .port.checkpoint import load_model, save_torch
    from .port.export import check_onnx_installed, export_onnx, export_pt2, export_torchscript
    outputs = [o for o in (args.out, args.onnx, args.torchscript, args.pt2, args.checkpoint) if o]
    if not outputs:
        raise UsageError("nothing to do; give -o OUT.dat and/or --onnx/--torchscript/--pt2/--checkpoint")
    args.model = str(resolve_model(args.model))
    src = Path(args.model).resolve()
    for o in outputs:
        if Path(o).resolve() == src:
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


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="descriptors of a folder of aligned 150x150 chips -> OUT.npz",
        description="Every image below IMAGES_DIR (recursive) must be an aligned 150x150 chip; others "
                    "are reported and left out, never resized. OUT.npz holds paths (relative, sorted), "
                    "embeddings (float32 N x 128), skipped_paths and skipped_reasons. Resumable: "
                    "rerun the same command after an interruption.")
    p.add_argument("model", metavar="MODEL",
                   help="dlib .dat, dlibbridge checkpoint, TorchScript or ONNX file; 'default' = dlib's model")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    _out_option(p, required=True, metavar="OUT.npz", help="descriptors file to write")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="chips per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--engine", choices=("torch", "dlib"), default="torch",
                   help="run a .dat through the torch port (default) or the dlib package itself")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes decoding chips while the network runs (0: none; default: one per "
                        "core beyond the first, none for small folders)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_embed)


def _run_embed(args) -> int:
    from .eval.embed import embed_folder
    check_output_file(args.out, "-o", kind="an embeddings file", is_kind=w.is_embeddings)
    res = embed_folder(args.model, args.images_dir, args.out, batch_size=args.batch_size,
                       device=args.device, engine=args.engine, progress=not args.quiet,
                       workers=args.workers)
    for path, reason in res.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{res.out}: {len(res.paths)} embeddings" + (f", {len(res.skipped)} images skipped" if res.skipped else "")
          + (f" (resumed at image {res.resumed_from})" if res.resumed_from else ""))
    return 0


# ---- unfreeze / freeze -----------------------------------

def _add_unfreeze(sub) -> None:
    p = sub.add_parser(
        "unfreeze", help="deployed model -> trainable dlib file (affine_ -> bn_con2) for dlib's net_type",
        description="Rewrite every affine_ record as a trainable bn_con2 (bn_fc2 in FC mode), every other "
                    "record byte-identical, so dlib's training net_type (bn_con) loads the file.  Exact in "
                    "inference.  dlib's batch-norm uses batch statistics for any batch of more than one "
                    "sample, so without --calibrate the training-mode output differs a lot from the deployed "
                    "one; --calibrate re-seeds the statistics from your aligned chips.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="dlib .dat file (default: the installed dlib face model)")
    p.add_argument("-o", "--out", metavar="OUT", help="output file (default: <name>_trainable.dat in the current folder)")
    p.add_argument("--calibrate", metavar="FACES_DIR", nargs="?", const="sample",
                   help="aligned 150x150 chips (a folder, e.g. `dlibbridge align` output, or a `dlibbridge pack` "
                        "store) to estimate each batch-norm's input statistics on; without FACES_DIR, the "
                        "25 sample chips shipped in the package (5 people)")
    p.add_argument("--max-chips", type=int, default=1000, metavar="N",
                   help="calibrate on at most N chips, a seeded random subset (default 1000)")
    p.add_argument("--batch-size", type=int, default=25, metavar="B",
                   help="training batch size the training-mode deviation is reported for (default 25, dlib's 5x5)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_unfreeze)


def _run_unfreeze(args) -> int:
    from pathlib import Path
    from . import assets
    from .port.calibrate import unfreeze_file
    src = assets.resolve_model(args.model)
    out = args.out or assets.default_output_path(src, "_trainable")
    faces = args.calibrate
    if faces == "sample" and not Path(faces).exists():      # a folder really called "sample" wins
        faces = assets.sample_chips_dir()
    lines = unfreeze_file(src, out, faces, max_chips=args.max_chips, batch_size=args.batch_size,
                          progress=not args.quiet)
    print("\n".join(lines))
    if faces is None:
        print("note: uncalibrated. Inference is exact, but dlib's batch-norm trains on batch statistics, which "
              "are far from the stored ones: the first training steps start from a much worse network. "
              "Add --calibrate FACES_DIR (your aligned chips), or --calibrate alone for the shipped sample.")
    print(f"next: train {out} with dlib's C++ dnn_trainer (its bn_con net_type loads it; docs/unfreeze.md), "
          "or fine-tune in PyTorch with `dlibbridge finetune DATA --base "
          f"{out} --out RUN_DIR`")
    return 0


def _add_freeze(sub) -> None:
    p = sub.add_parser(
        "freeze", help="trainable dlib file (bn_con2) -> deployable model (affine_), as dlib converts it",
        description="Rewrite every bn_con2/bn_fc2 record as affine_ exactly as dlib's own bn->affine conversion "
                    "computes it, so a network trained with dlib's dnn_trainer loads in "
                    "dlib.face_recognition_model_v1 and in the torch port.")
    p.add_argument("net", metavar="NET.dat", help="trainable dlib file (e.g. saved by dnn_trainer or unfreeze)")
    p.add_argument("-o", "--out", metavar="OUT.dat", required=True, help="output file (never the input)")
    p.set_defaults(func=_run_freeze)


def _run_freeze(args) -> int:
    from .codec.rewrite import freeze_file
    lines = freeze_file(args.net, args.out)
    print("\n".join(lines))
    return 0


# Registration order is the order shown by --help: the workflow's order.
_COMMANDS = [
    _add_inspect,
    _add_unfreeze,
    _add_freeze,
    _add_align,
    _add_pack,
    _add_finetune,
    _add_export,
    _add_embed,
    _add_evaluate,
    _add_camera,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlibbridge",
        description="Bridge dlib's face ResNet and PyTorch: inspect and rewrite dlib DNN files losslessly, "
                    "unfreeze/freeze for dlib's trainer, align faces as dlib does, fine-tune, export back "
                    "to dlib, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


# What an interrupted command leaves behind and how to go on (exit code 130).
_ON_INTERRUPT = {
    "align": lambda args: "finished photos are kept, run the same command again to continue",
    "pack": lambda args: "run the same command again to continue",
    "finetune": lambda args: f"continue with: dlibbridge finetune --resume {getattr(args, 'out', None) or args.resume}",
    "camera": lambda args: "nothing written",
}
# evaluate and embed also report the library's plain ValueErrors (bad pairs, model or chip
# files found deep in their pipelines) as bad input, as they always have.
_ALSO_BAD_INPUT = {"evaluate": (ValueError,), "embed": (ValueError,)}


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Every error about the input or the request — a
    :class:`~dlibbridge.errors.DlibbridgeError` or an ``OSError`` — becomes one line
    ``dlibbridge COMMAND: message`` on stderr and exit code 2; nothing else is caught, so a
    bug still shows its traceback."""
    args = build_parser().parse_args(argv)
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
