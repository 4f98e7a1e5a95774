"""Determinism: on a CPU the same seed gives bit-identical results in two separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusereg.data import PairFiles

SAMPLING = ["--steps", "2", "--scheduler", "ddpm", "--device", "cpu"]


def field_and_warped(output: Path) -> tuple[np.ndarray, np.ndarray]:
    return tuple(sitk.GetArrayFromImage(sitk.ReadImage(str(output / name)))
                 for name in ("field.nii.gz", "warped.nii.gz"))


@pytest.mark.slow
def test_same_seed_gives_bit_identical_fields_in_two_processes(case: PairFiles, case_model: Path, tmp_path: Path,
                                                                cli) -> None:
    """DDPM sampling (fresh noise at every step), in a new process and in this one at the same
    time; a run with another seed shows that the seed is what fixes the result."""
    def argv(output: str, seed: str) -> list[str]:
        return ["register", str(case.fixed), str(case.moving), "-o", str(tmp_path / output), "--model",
                str(case_model), "--seed", seed, *SAMPLING]

    script = Path(sys.executable).with_name("diffusereg")
    other = subprocess.Popen([str(script), *argv("other_process", "5")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cli(*argv("this_process", "5"))[0] == 0
    assert cli(*argv("other_seed", "6"))[0] == 0
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    this, that = field_and_warped(tmp_path / "this_process"), field_and_warped(tmp_path / "other_process")
    for a, b in zip(this, that):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert not np.array_equal(field_and_warped(tmp_path / "other_seed")[0], this[0])
