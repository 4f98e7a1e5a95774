"""``diffusereg train teacher|diffusion``: argument parsing for the two training stages.

``register(subparsers)`` adds the ``train`` command to the ``diffusereg`` parser; each handler
takes the parsed arguments and returns the exit code. Multi-process runs go through
``accelerate launch``, e.g. ``accelerate launch --multi_gpu --num_processes 4 -m diffusereg.cli
train diffusion --config configs/diffusion_3d_gpu.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusereg.training.config import ConfigError, DiffusionConfig, TeacherConfig, load_config
from diffusereg.training.diffusion import train_diffusion
from diffusereg.training.teacher import train_teacher

__all__ = ["apply_overrides", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train teacher`` and ``train diffusion`` to a ``diffusereg`` subparser group."""
    train = subparsers.add_parser("train", help="train the teacher (stage 1) or the diffusion model (stage 2)",
                                  description="Train DiffuseReg's two stages on Accelerate (see docs/training.md).")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    teacher = stages.add_parser("teacher", help="stage 1: one-shot registration network, phi0 cache, field statistics")
    diffusion = stages.add_parser("diffusion", help="stage 2: the denoiser, saved as a DiffuseRegPipeline")
    for parser in (teacher, diffusion):
        parser.add_argument("--config", required=True, type=Path, help="YAML config file (see configs/)")
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest checkpoint in the output directory")
        parser.add_argument("--output", type=Path, help="output directory (overrides train.output_dir)")
        parser.add_argument("--data", type=Path,
                            help="ACDC training folder (overrides data.acdc_root) or a CSV/JSON pair list (data.pairs)")
        parser.add_argument("--max-steps", type=int, help="overrides train.max_steps (the length of the LR schedule)")
    diffusion.add_argument("--teacher", type=Path, help="teacher output directory (overrides the config's teacher)")
    teacher.set_defaults(handler=_run_teacher)
    diffusion.set_defaults(handler=_run_diffusion)


def apply_overrides(config: TeacherConfig | DiffusionConfig, args: argparse.Namespace) -> None:
    """Write the command-line overrides (``--output``, ``--data``, ``--max-steps``,
    ``--teacher``) into ``config``."""
    if args.output is not None:
        config.train.output_dir = str(args.output)
    if args.data is not None:
        if args.data.is_dir():
            config.data.acdc_root, config.data.pairs = str(args.data), None
        elif args.data.suffix.lower() in (".csv", ".json"):
            config.data.pairs = str(args.data)
        else:
            raise ConfigError(f"--data {args.data}: neither a directory nor a .csv/.json pair list")
    if args.max_steps is not None:
        config.train.max_steps = args.max_steps
    if getattr(args, "teacher", None) is not None:
        config.teacher = str(args.teacher)


def _run_teacher(args: argparse.Namespace) -> int:
    return _run(args, TeacherConfig)


def _run_diffusion(args: argparse.Namespace) -> int:
    return _run(args, DiffusionConfig)


def _run(args: argparse.Namespace, kind: type[TeacherConfig] | type[DiffusionConfig]) -> int:
    try:
        config = load_config(args.config, kind)
        apply_overrides(config, args)
        train = train_teacher if kind is TeacherConfig else train_diffusion
        train(config, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError) as error:
        print(f"diffusereg train {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return 0
