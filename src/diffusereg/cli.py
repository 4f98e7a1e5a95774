"""The ``diffusereg`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from diffusereg import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffusereg``; subcommands register themselves here."""
    parser = argparse.ArgumentParser(
        prog="diffusereg",
        description="Deformable image registration by denoising diffusion of the deformation field.",
    )
    parser.add_argument("--version", action="version", version=f"diffusereg {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffusereg`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
