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

from accelerate import PartialState

from diffusereg.training.config import ConfigError, DiffusionConfig, TeacherConfig, load_config
from diffusereg.training.diffusion import train_diffusion
from diffusereg.training.teacher import train_teacher

__all__ = ["apply_overrides", "report", "run"]


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


def report(stage: str, config: TeacherConfig | DiffusionConfig, last: dict[str, float]) -> str:
    """What a finished training run prints: where its result went, the final validation numbers,
    and the one command that uses the result."""
    output = Path(config.train.output_dir)
    scores = {name.removeprefix("val_"): value for name, value in last.items() if name.startswith("val_")}
    numbers = ", ".join(f"{name} {value:.4g}" for name, value in scores.items()) or "none (no validation set)"
    if stage == "teacher":
        written = f"teacher, phi0 cache and field statistics written to {output}"
        use = f"diffusereg train diffusion --config DIFFUSION_CONFIG --teacher {output}"
    else:
        written = f"pipeline written to {output / 'pipeline'} (its README.md records the data and these numbers)"
        use = f"diffusereg register FIXED MOVING --model {output / 'pipeline'} -o OUTDIR"
    return (f"diffusereg train {stage}: {written}\n"
            f"final validation (step {int(last.get('step', config.train.max_steps))}): {numbers}\n"
            f"use it: {use}")


def run(args: argparse.Namespace) -> int:
    """Train the stage ``args.stage`` (``teacher`` or ``diffusion``) as the config and overrides say."""
    kind = TeacherConfig if args.stage == "teacher" else DiffusionConfig
    try:
        config = load_config(args.config, kind)
        apply_overrides(config, args)
        train = train_teacher if kind is TeacherConfig else train_diffusion
        last = train(config, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError) as error:
        print(f"diffusereg train {args.stage}: error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(report(args.stage, config, last))
    return 0
