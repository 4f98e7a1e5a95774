"""Fixtures of the reliability suite: a registration case on disk, the CLI run in-process, and a
folder nobody can write into."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diffusereg.cli import main
from diffusereg.data import PairFiles
from diffusereg.phantom import write_phantom
from tiny import save_tiny_pipeline

CliRun = Callable[..., tuple[int, str]]


@pytest.fixture(scope="session")
def case(tmp_path_factory: pytest.TempPathFactory) -> PairFiles:
    """A small cardiac phantom as files: fixed (ED), moving (ES) and both label maps (4 x 96 x 96)."""
    return write_phantom(tmp_path_factory.mktemp("case"), seed=1, shape=(4, 96, 96))


@pytest.fixture(scope="session")
def case_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2D pipeline on a model grid of 4 x 64 x 64: the case's 4 slices, no padding."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny_4_slices", 2, model_size=(4, 64, 64))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    """``cli(*argv)`` runs ``diffusereg`` in this process and returns its exit code and stderr (stripped)."""
    def run(*argv: str | os.PathLike) -> tuple[int, str]:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        return code, capsys.readouterr().err.strip()

    return run


@pytest.fixture(scope="session")
def locked_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An existing folder that cannot be written into, not even by root (``chattr +i`` then)."""
    folder = tmp_path_factory.mktemp("locked")
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        immutable = False
    if os.geteuid() == 0 and not immutable:
        pytest.skip("running as root without chattr +i: no folder here is unwritable")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)
