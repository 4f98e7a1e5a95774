"""Dimensionality and size: single-slice and few-slice volumes, 2D images of common formats and
DICOM series register through the CLI and write every output (``docs/data.md``, "What can be
registered")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusereg.data import PairFiles
from diffusereg.io import Image, read_image, write_image

FIELD_OUTPUTS = ("warped.nii.gz", "field.h5", "field.nii.gz", "jacobian.nii.gz", "metrics.json")


def slice_of(path: Path, index: int) -> Image:
    """One slice of a volume, kept as a volume of one slice ``(1, H, W)``."""
    image = read_image(path)
    return Image(image.array[index:index + 1], image.spacing, image.origin, image.direction)


def test_single_slice_volume_registers_and_writes_every_output(case: PairFiles, tiny_model: Path, tmp_path: Path,
                                                               cli) -> None:
    """A 96 x 96 x 1 NIfTI crashed while writing the Jacobian (torch.gradient, issue 32)."""
    for name, source in (("fixed", case.fixed), ("moving", case.moving)):
        write_image(slice_of(source, 1), tmp_path / f"{name}.nii.gz")
    code, stderr = cli("register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", "-o", tmp_path / "out",
                       "--model", tiny_model, "--steps", "1")
    assert code == 0, stderr
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == set(FIELD_OUTPUTS)
    jacobian = read_image(out / "jacobian.nii.gz")
    assert jacobian.array.shape == (1, 96, 96) and np.isfinite(jacobian.array).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["NJD_percent"]) and np.isfinite(metrics["JSD"])
