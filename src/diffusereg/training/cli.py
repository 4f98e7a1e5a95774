"""``diffusereg train teacher|diffusion``: what the two training commands run.

The arguments are defined with the rest of the command line (:mod:`diffusereg.cli`, which
imports no torch); :func:`run` takes the parsed arguments and returns the exit code.
Multi-process runs go through
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

__all__ = ["apply_overrides", "run"]


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


def run(args: argparse.Namespace) -> int:
    """Train the stage ``args.stage`` (``teacher`` or ``diffusion``) as the config and overrides say."""
    kind = TeacherConfig if args.stage == "teacher" else DiffusionConfig
    try:
        config = load_config(args.config, kind)
        apply_overrides(config, args)
        train = train_teacher if kind is TeacherConfig else train_diffusion
        train(config, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError) as error:
        print(f"diffusereg train {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return 0
