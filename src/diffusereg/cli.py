"""The ``diffusereg`` command line: ``register``, ``apply``, ``cardiac``, ``demo``, ``evaluate``, ``watch`` and ``train``.

Handlers import the heavy modules (torch, the pipeline) when they run, so ``diffusereg --help``
builds its parser without them. Exit codes: 0 success, 2 bad input (one-line message on stderr,
``diffusereg COMMAND: error: ...``), 130 interrupted (Ctrl+C); anything else is a bug and shows
its traceback. Warnings about implausible inputs are printed as one line each,
``diffusereg COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from diffusereg import DEFAULT_STEPS, __version__

if TYPE_CHECKING:
    from diffusereg.pipelines import DiffuseRegPipeline
    from diffusereg.registration import RegistrationSettings

DEFAULT_MODEL = "diffusereg/acdc-2d"  # the shipped model (a Hugging Face Hub id)
DEMO_PATIENT = 100
TRAINING_DOCS = ("docs/training.md (the two stages, every config key) and docs/train_own_data.md (training on your "
                 "own image pairs from a CSV/JSON list) of the diffusereg documentation")


def _sampling_options() -> argparse.ArgumentParser:
    """Options shared by ``register`` and ``demo``: the model and how to sample."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model and sampling")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"pipeline folder (save_pretrained output) or Hugging Face Hub id (default: {DEFAULT_MODEL})")
    group.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="K",
                       help=f"sampling steps (default: {DEFAULT_STEPS})")
    group.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim",
                       help="ddim: deterministic (default); ddpm: ancestral sampling")
    group.add_argument("--guidance", nargs="+", action="extend", default=[], metavar="SPEC",
                       help="similarity[=SCALE] (image similarity), folds (no Jacobian determinant <= 0), "
                            "smoothness=SCALE (less bending), organ=LABEL[:SCALE] (needs both label maps); several "
                            "allowed, e.g. 'similarity folds'")
    group.add_argument("--samples", type=int, default=1, metavar="N",
                       help="samples per pair: the field is their mean, sample_spread.nii.gz their spread (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    group.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="the networks' arithmetic; fields, warps and outputs stay float32. bfloat16 is faster on "
                            "CPUs with bfloat16 instructions (AVX-512 BF16, AMX) and slower on others (default: float32)")
    group.add_argument("--trust-pickle-weights", action="store_true",
                       help="also load pickle weights (.bin), which can run code when loaded: only for a model from a "
                            "source you trust (default: refused; safetensors only)")
    return options


def _start_option() -> argparse.ArgumentParser:
    """``--start-from-teacher``, for the commands that register with the model's teacher at hand."""
    option = argparse.ArgumentParser(add_help=False)
    option.add_argument("--start-from-teacher", type=float, metavar="STRENGTH",
                        help="start sampling from the field of the model's one-shot teacher component and run "
                             "the last STRENGTH fraction (0 < STRENGTH <= 1) of the steps")
    return option


def _pair_arguments() -> argparse.ArgumentParser:
    """Arguments shared by ``register`` and ``watch``: FIXED, MOVING and their label maps."""
    arguments = argparse.ArgumentParser(add_help=False)
    arguments.add_argument("fixed", nargs="?", type=Path, metavar="FIXED", help="fixed image (defines the output grid)")
    arguments.add_argument("moving", nargs="?", type=Path, metavar="MOVING", help="moving image")
    arguments.add_argument("--fixed-labels", type=Path, metavar="SEG",
                           help="label map of the fixed image (with --moving-labels: Dice before and after)")
    arguments.add_argument("--moving-labels", type=Path, metavar="SEG",
                           help="label map of the moving image, warped onto the fixed image (warped_labels.nii.gz)")
    return arguments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffusereg`` with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="diffusereg",
        description="Deformable image registration by denoising diffusion of the deformation field.",
    )
    parser.add_argument("--version", action="version", version=f"diffusereg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sampling, pair, start = _sampling_options(), _pair_arguments(), _start_option()

    register = commands.add_parser(
        "register", parents=[pair, sampling, start],
        help="register a pair of images (or a list of pairs) and write the results",
        description="Register MOVING to FIXED (NIfTI, MHA/MHD, NRRD, a 2D PNG/JPEG/TIFF/BMP picture, or a folder "
                    "of one DICOM series; any size, spacing, orientation). Writes into "
                    "OUTDIR the warped image and labels, the field (field.h5 ITK transform, field.nii.gz), "
                    "jacobian.nii.gz, sample_spread.nii.gz (--samples > 1) and metrics.json, all on the fixed image's "
                    "grid. With --pairs, one sub-folder per pair; finished pairs are skipped.")
    register.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="output folder")
    register.add_argument("--save-trajectory", action="store_true",
                          help="also write trajectory.png and trajectory.gif (the sampling steps)")
    register.add_argument("--pairs", type=Path, metavar="LIST",
                          help="CSV/JSON list of pairs (columns fixed, moving[, fixed_labels, moving_labels, name]) "
                               "instead of FIXED MOVING; split over processes under `accelerate launch`")
    register.set_defaults(handler=_run_register)

    apply = commands.add_parser(
        "apply", help="warp another image or label map with a saved field",
        description="Warp IMAGE (any image or label map in the moving image's space, on its own grid) with FIELD (the "
                    "field.h5 or field.nii.gz that `diffusereg register` wrote) and write it on the fixed image's grid, "
                    "exactly as register warped its own outputs. OUT is an image file, or a folder that receives "
                    "warped.nii.gz (warped_labels.nii.gz with --labels).")
    apply.add_argument("field", type=Path, metavar="FIELD", help="field.h5 or field.nii.gz of a registration")
    apply.add_argument("image", type=Path, metavar="IMAGE", help="image or label map to warp")
    apply.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output image file or folder")
    apply.add_argument("--labels", action="store_true",
                       help="IMAGE is a label map: nearest neighbour, integer values kept (default: linear)")
    apply.set_defaults(handler=_run_apply)

    cardiac = commands.add_parser(
        "cardiac", parents=[sampling, start],
        help="carry one cine frame's labels to the other; report volumes, ejection fractions, LV mass and strain",
        description="Register the end-diastole (ED) and end-systole (ES) short-axis stacks in the direction that "
                    "carries the given labels to the other frame (labels of ED: ES fixed, ED moving; labels of ES: "
                    "ED fixed, ES moving), then report LV and RV end-diastolic and end-systolic volumes (ml), "
                    "ejection fractions (%), LV myocardial mass (g) and the radial and circumferential strain of "
                    "the LV myocardium (%, global and per slice). Writes OUTDIR/report.csv, report.png and "
                    "report.json. Research use only, not for clinical decisions.")
    cardiac.add_argument("ed", type=Path, metavar="ED", help="end-diastole image (3D short-axis stack)")
    cardiac.add_argument("es", type=Path, metavar="ES", help="end-systole image (3D short-axis stack)")
    cardiac.add_argument("--labels", type=Path, required=True, metavar="SEG",
                         help="label map of one frame (ACDC values: 1 RV cavity, 2 LV myocardium, 3 LV cavity)")
    cardiac.add_argument("--labels-frame", choices=("ed", "es"), default="ed",
                         help="the frame SEG belongs to (default: ed)")
    cardiac.add_argument("--label-map", metavar="LV=V,Myo=V,RV=V",
                         help="the values of LV cavity, LV myocardium and RV cavity in SEG (default: LV=3,Myo=2,RV=1)")
    cardiac.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="output folder")
    cardiac.set_defaults(handler=_run_cardiac)

    demo = commands.add_parser(
        "demo", parents=[sampling, start], help="register a built-in cardiac phantom (or an ACDC patient) and print Dice",
        description="Register end-systole to end-diastole of a cardiac cine-MR phantom generated in code (or, with "
                    "--acdc, of a real ACDC patient), write every output and the trajectory, and print Dice.")
    demo.add_argument("-o", "--output", type=Path, default=Path("diffusereg-demo"), metavar="OUTDIR",
                      help="output folder (default: ./diffusereg-demo)")
    demo.add_argument("--acdc", type=Path, metavar="ACDC_TRAINING_DIR", help="folder of ACDC patientNNN folders")
    demo.add_argument("--patient", type=int, default=DEMO_PATIENT, help=f"ACDC patient number (default: {DEMO_PATIENT})")
    demo.set_defaults(handler=_run_demo, save_trajectory=True)

    evaluate = commands.add_parser(
        "evaluate", parents=[sampling, start], help="score a model on ACDC-like data (Dice, NJD %%, JSD, HD95, time)",
        description="Register ES (moving) to ED (fixed) for every patient of an ACDC-like folder (patientNNN/Info.cfg, "
                    "frames and _gt labels) on the paper's model grid, and write OUTDIR/cases.csv (one row per case), "
                    "OUTDIR/summary.json and OUTDIR/summary.md.")
    evaluate.add_argument("--data", type=Path, required=True, metavar="ACDC_DIR", help="folder of patientNNN folders")
    evaluate.add_argument("--split", choices=("val", "train", "all"), default="val",
                          help="val: patients 010, 020, ..., 100; train: the others; all (default: val)")
    evaluate.add_argument("--patients", type=int, nargs="+", metavar="N", help="only these patient numbers")
    evaluate.add_argument("--early-stopping", type=float, metavar="TOL",
                          help="stop sampling once the field estimate changes less than TOL voxels for 2 steps")
    evaluate.add_argument("-o", "--output", type=Path, default=Path("diffusereg-evaluation"), metavar="OUTDIR",
                          help="output folder (default: ./diffusereg-evaluation)")
    evaluate.set_defaults(handler=_run_evaluate)

    watch = commands.add_parser(
        "watch", parents=[pair, sampling], help="watch and steer registrations live in a local web page",
        description="Serve a web page on this computer where you load a fixed and a moving image (FIXED MOVING, "
                    "uploads, or the cardiac phantom of `diffusereg demo` by default), press Register and watch every "
                    "sampling step: the warped image with the deformed grid, its difference to the fixed image, the "
                    "Jacobian determinant, Dice and NJD. Stop keeps the current result, guidance can be changed while "
                    "sampling runs, and the files `diffusereg register` writes can be downloaded. The sampling options "
                    "give the page's starting values.")
    watch.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this computer only); any other address lets "
                            "everyone who can reach it use the page, without a password")
    watch.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860; 0: any free port)")
    watch.set_defaults(handler=_run_watch)

    _add_train_command(commands)
    return parser


def _shipped_configs() -> dict[str, Any]:
    """The training configs shipped inside the package: name (file stem) -> resource."""
    from importlib import resources

    folder = resources.files("diffusereg").joinpath("configs")
    return {item.name.removesuffix(".yaml"): item for item in folder.iterdir() if item.name.endswith(".yaml")}


class _PrintConfig(argparse.Action):
    """``--print-config NAME``: print a shipped config (YAML) and exit, like ``--version``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(_shipped_configs()[values].read_text(), end="")
        parser.exit(0)


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    """``train teacher`` and ``train diffusion`` (handlers in :mod:`diffusereg.training.cli`)."""
    names = sorted(_shipped_configs())
    start = (f"Start from a config shipped with the package: `diffusereg train --print-config NAME > my.yaml` "
             f"(NAME: {', '.join(names)}), then edit data paths and steps. Guides: {TRAINING_DOCS}.")
    train = commands.add_parser("train", help="train the teacher (stage 1) or the diffusion model (stage 2)",
                                description=f"Train DiffuseReg's two stages on Accelerate: `train teacher`, then "
                                            f"`train diffusion`, which writes a pipeline for `diffusereg register "
                                            f"--model`. {start}")
    train.add_argument("--print-config", action=_PrintConfig, choices=names, metavar="NAME",
                       help=f"print the shipped config NAME (YAML) and exit; NAME: {', '.join(names)}")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    teacher = stages.add_parser("teacher", help="stage 1: one-shot registration network, phi0 cache, field statistics",
                                description=f"Stage 1: train the one-shot teacher network; writes OUTPUT/teacher, "
                                            f"the phi0 cache and field_stats.json for stage 2. {start}")
    diffusion = stages.add_parser("diffusion", help="stage 2: the denoiser, saved as a DiffuseRegPipeline",
                                  description=f"Stage 2: train the denoiser on the teacher's fields; writes "
                                              f"OUTPUT/pipeline, the model for `diffusereg register --model`. {start}")
    for parser in (teacher, diffusion):
        parser.add_argument("--config", required=True, type=Path,
                            help="YAML config file (`diffusereg train --print-config NAME` prints a shipped one)")
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest checkpoint in the output directory")
        parser.add_argument("--output", type=Path, help="output directory (overrides train.output_dir)")
        parser.add_argument("--data", type=Path,
                            help="ACDC training folder (overrides data.acdc_root) or a CSV/JSON pair list (data.pairs)")
        parser.add_argument("--max-steps", type=int, help="overrides train.max_steps (the length of the LR schedule)")
        parser.set_defaults(handler=_run_train)
    diffusion.add_argument("--teacher", type=Path, help="teacher output directory (overrides the config's teacher)")


def _run_train(args: argparse.Namespace) -> int:
    from diffusereg.training.cli import run

    return run(args)


def _settings(args: argparse.Namespace) -> RegistrationSettings:
    from diffusereg.guidance import GuidanceSpec
    from diffusereg.registration import RegistrationError, RegistrationSettings

    for name in ("steps", "samples"):
        if getattr(args, name) < 1:
            raise RegistrationError(f"--{name} must be at least 1, got {getattr(args, name)}")
    guidance = tuple(GuidanceSpec.parse(text) for text in args.guidance)
    strength = getattr(args, "start_from_teacher", None)
    if strength is not None and not 0 < strength <= 1:
        raise RegistrationError(f"--start-from-teacher must be in (0, 1], got {strength}")
    return RegistrationSettings(steps=args.steps, scheduler=args.scheduler, guidance=guidance, samples=args.samples,
                                seed=args.seed, save_trajectory=getattr(args, "save_trajectory", False),
                                start_from_teacher=strength)


def _pipeline(args: argparse.Namespace, device: Any) -> DiffuseRegPipeline:
    """The pipeline of ``--model`` on ``device``, in ``--dtype``, pickle weights only with
    ``--trust-pickle-weights``."""
    from diffusereg.pipelines import load_pipeline

    return load_pipeline(args.model, device, allow_pickle=args.trust_pickle_weights, dtype=args.dtype)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _significant(value: float) -> str:
    """``value`` with two significant digits, positional (``0.0014``, ``0.44``, ``12``, ``0``)."""
    import numpy as np

    return np.format_float_positional(value, precision=2, unique=False, fractional=False, trim="-")


def _summary(metrics: dict[str, Any], output_dir: Path) -> str:
    """What a finished registration reports: a Dice table (with both label maps), then one line."""
    table = ""
    if "dice_after" in metrics:
        rows = [f"{'Dice':<8}{'before':>8}{'after':>8}"] + [
            f"{name:<8}{metrics['dice_before'][name]:>8.3f}{after:>8.3f}" for name, after in metrics["dice_after"].items()]
        table = "\n".join(rows) + "\n"
    if "sample_spread_mm" in metrics:
        table += "sample spread (mm): " + ", ".join(f"{name} {value:.2f}" for name, value in metrics["sample_spread_mm"].items())
        table += "\n"
    return (table + f"{output_dir}: {metrics['steps_run']} steps in {metrics['time_seconds']:.1f} s, "
            f"folding {_significant(metrics['NJD_percent'])} % of voxels, image similarity (NCC) "
            f"{metrics['NCC_before']:.3f} before, {metrics['NCC_after']:.3f} after")


def _run_register(args: argparse.Namespace) -> int:
    from diffusereg.registration import (RegistrationError, check_pair_list, check_request, read_inputs,
                                         register_checked, register_pair_list)

    settings = _settings(args)
    if args.pairs is not None:
        if args.fixed or args.moving or args.fixed_labels or args.moving_labels:
            raise RegistrationError("--pairs replaces FIXED MOVING and the label options (labels go in the list)")
        from accelerate import PartialState

        state = PartialState()
        requests = check_pair_list(args.pairs, args.output, settings)  # fail before loading the model
        pipe = _pipeline(args, args.device or state.device)
        pipe.set_progress_bar_config(disable=True)
        summary = register_pair_list(pipe, requests, model_name=args.model, state=state)
        print(f"{args.output}: registered {len(summary.registered)} pairs, skipped {len(summary.skipped)} finished "
              f"ones (process {state.process_index} of {state.num_processes})")
        return 0
    if args.fixed is None or args.moving is None:
        raise RegistrationError("give FIXED and MOVING images, or --pairs LIST")
    request = check_request(args.fixed, args.moving, args.output, settings, args.fixed_labels, args.moving_labels)
    pipe = _pipeline(args, _device(args))
    metrics = register_checked(pipe, read_inputs(pipe, request), settings, model_name=args.model)
    print(_summary(metrics, args.output))
    return 0


def _run_apply(args: argparse.Namespace) -> int:
    from diffusereg.registration import apply_field

    written = apply_field(args.field, args.image, args.output, labels=args.labels)
    print(f"{written}: {args.image} warped by {args.field} ({'labels, nearest neighbour' if args.labels else 'linear'})")
    return 0


def _run_cardiac(args: argparse.Namespace) -> int:
    from diffusereg.cardiac import REPORT_NAMES, cardiac_readout, parse_label_map, write_cardiac_report
    from diffusereg.metrics import ACDC_LABELS
    from diffusereg.validation import check_output_folder, check_sources

    settings = _settings(args)
    label_map = ACDC_LABELS if args.label_map is None else parse_label_map(args.label_map)
    sources = {"fixed": args.ed, "moving": args.es, "moving_labels": args.labels}
    check_sources(sources)
    check_output_folder(args.output, sources.values(), REPORT_NAMES.values())
    pipe = _pipeline(args, _device(args))
    frame = args.labels_frame.upper()
    readout = cardiac_readout(pipe, args.ed, args.es, args.labels, frame, label_map, settings)
    described = {"ED": str(args.ed), "ES": str(args.es), "labels": str(args.labels), "label_map": label_map,
                 "model": args.model, "steps": settings.steps, "scheduler": settings.scheduler,
                 "samples": settings.samples, "seed": settings.seed, "start_from_teacher": settings.start_from_teacher,
                 "guidance": [str(spec) for spec in settings.guidance], "device": str(pipe.device),
                 "diffusereg_version": __version__}
    report = write_cardiac_report(readout, args.output, described)
    lv, rv, strain = report["LV"], report["RV"], report["strain"]
    print(f"{report['direction']}\n"
          f"LV: EDV {lv['EDV_ml']:.1f} ml, ESV {lv['ESV_ml']:.1f} ml, EF {readout.volumes['LV']['EF']:.1f} %, "
          f"mass {lv['mass_g']:.1f} g\n"
          f"RV: EDV {rv['EDV_ml']:.1f} ml, ESV {rv['ESV_ml']:.1f} ml, EF {readout.volumes['RV']['EF']:.1f} %\n"
          f"LV strain: radial {readout.strain.radial:.1f} %, circumferential {readout.strain.circumferential:.1f} %\n"
          f"{args.output}: {report['steps_run']} steps in {report['time_seconds']:.1f} s")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from diffusereg.registration import register_pair

    settings = _settings(args)
    pipe = _pipeline(args, _device(args))
    if args.acdc is not None:
        from diffusereg.data import read_acdc_patient

        patient = read_acdc_patient(args.acdc / f"patient{args.patient:03d}")
        inputs = patient.files
        print(f"ACDC {patient.name} ({patient.group}): ES frame {patient.es} -> ED frame {patient.ed}")
    else:
        from diffusereg.phantom import write_phantom

        inputs = write_phantom(args.output, seed=0)
        print(f"cardiac phantom (end-systole -> end-diastole) written to {args.output}")
    metrics = register_pair(pipe, inputs.fixed, inputs.moving, args.output, settings, fixed_labels=inputs.fixed_labels,
                            moving_labels=inputs.moving_labels, model_name=args.model)
    print(_summary(metrics, args.output))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from diffusereg.callbacks import EarlyStopping
    from diffusereg.data import ACDCDataset
    from diffusereg.evaluation import evaluate, pipeline_registrar, write_evaluation
    from diffusereg.guidance import build_guides
    from diffusereg.registration import RegistrationError
    from diffusereg.schedulers import scheduler_of_kind

    settings = _settings(args)
    if any(spec.kind == "organ" for spec in settings.guidance):
        raise RegistrationError("evaluate: organ guidance would use the labels that Dice is scored on; "
                                "use smoothness=, similarity or folds")
    pipe = _pipeline(args, _device(args))
    if settings.start_from_teacher is not None and pipe.teacher is None:
        raise RegistrationError(f"--start-from-teacher: model {args.model!r} has no one-shot teacher component")
    pipe.scheduler = scheduler_of_kind(pipe.scheduler, args.scheduler)
    dataset = ACDCDataset(args.data, split=args.split, spatial_dims=3, patients=args.patients,
                          preprocessing=pipe.preprocessing)
    pipe.set_progress_bar_config(disable=True)
    callback = None if args.early_stopping is None else EarlyStopping(tolerance=args.early_stopping)
    start = {} if settings.start_from_teacher is None else {"init_field": "teacher",
                                                             "strength": settings.start_from_teacher}
    registrar = pipeline_registrar(pipe, args.steps, seed=args.seed, guidance=build_guides(settings.guidance, None),
                                   num_samples=args.samples, callback_on_step_end=callback, **start)
    rows = evaluate(dataset, registrar, description=f"{args.model} ({args.steps} {args.scheduler} steps)")
    run = {"data": str(args.data), "split": args.split, "patients": dataset.names, "model": args.model,
           "steps": args.steps, "scheduler": args.scheduler, "guidance": [str(g) for g in settings.guidance],
           "samples": args.samples, "seed": args.seed, "early_stopping": args.early_stopping,
           "start_from_teacher": settings.start_from_teacher,
           "device": str(pipe.device)}
    summary = write_evaluation(args.output, {args.model: rows}, run)[args.model]
    print(f"{len(rows)} cases ({args.split}): " + ", ".join(
        f"{name} {summary[name]['mean']:.2f}" for name in ("LV", "Myo", "RV", "Overall"))
          + f" Dice %, NJD {summary['NJD_percent']['mean']:.3f} %, {summary['seconds']['mean']:.1f} s per case"
          + f"; written to {args.output}")
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, a service manager stopping the command) raises
    KeyboardInterrupt like Ctrl+C, so the code that cleans up on Ctrl+C runs for it too; the
    previous handler is restored after."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_watch(args: argparse.Namespace) -> int:
    import tempfile

    from diffusereg.data import PairFiles
    from diffusereg.registration import RegistrationError
    from diffusereg.watch import WatchServer, WatchSession
    from diffusereg.watch.server import is_loopback

    if (args.fixed is None) != (args.moving is None):
        raise RegistrationError("give FIXED and MOVING, or neither (the cardiac phantom)")
    settings = _settings(args)
    pipe = _pipeline(args, _device(args))
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="diffusereg-watch-") as folder:
        session = WatchSession(pipe, folder, model_name=args.model, settings=settings)
        if args.fixed is None:
            session.load_phantom()
        else:
            session.load(PairFiles(args.fixed, args.moving, args.fixed_labels, args.moving_labels))
        server = WatchServer(session, args.host, args.port)
        try:
            if not is_loopback(args.host):
                print(f"diffusereg watch: warning: listening on {args.host}: anyone who can reach this address can "
                      "upload images and run registrations here, without a password", file=sys.stderr)
            print(f"diffusereg watch: open {server.url} in a browser (Ctrl+C or SIGTERM to quit; outputs not "
                  "downloaded are lost)", flush=True)
            server.serve_forever()
        except KeyboardInterrupt:
            print("diffusereg watch: stopped")
        finally:
            server.close()
    return 0


def _show_warnings_as_lines(command: str) -> None:
    """Print diffusereg's input warnings as ``diffusereg COMMAND: warning: MESSAGE`` on stderr."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"diffusereg {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffusereg`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a usage error, as argparse reports its own
        parser.print_usage(sys.stderr)
        print("diffusereg: error: give a COMMAND (diffusereg --help lists them)", file=sys.stderr)
        return 2
    if args.command == "train":  # the training CLI reports its own errors
        return int(args.handler(args))
    _show_warnings_as_lines(args.command)
    try:
        return int(args.handler(args))
    except (ValueError, OSError) as error:  # bad input: image/model/list errors all name their cause
        message = " ".join(str(error).split())
        print(f"diffusereg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: outputs of an unfinished registration were removed
        print(f"diffusereg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
