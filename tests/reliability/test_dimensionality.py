"""Dimensionality and size: single-slice and few-slice volumes, 2D images of common formats and
DICOM series register through the CLI and write every output (``docs/data.md``, "What can be
registered")."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusereg.data import PairFiles
from diffusereg.io import Image, read_image, write_image

from test_io import write_dicom_series

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


def test_colour_png_pictures_register_as_2d_images(case: PairFiles, tiny_model: Path, tmp_path: Path, cli) -> None:
    """PNG was refused as an 'unsupported file extension' (issue 32); colour pixels become their luminance."""
    for name, source in (("fixed", case.fixed), ("moving", case.moving)):
        grey = read_image(source).array[1]
        rgb = np.repeat((255 * grey / grey.max()).astype(np.uint8)[..., None], 3, axis=-1)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / f"{name}.png"))
    code, stderr = cli("register", tmp_path / "fixed.png", tmp_path / "moving.png", "-o", tmp_path / "out",
                       "--model", tiny_model, "--steps", "1")
    assert code == 0, stderr
    warped = read_image(tmp_path / "out" / "warped.nii.gz")
    assert warped.array.shape == (96, 96) and warped.spacing == (1.0, 1.0)
    assert {path.name for path in (tmp_path / "out").iterdir()} == set(FIELD_OUTPUTS)


def test_dicom_series_folders_register(case: PairFiles, tiny_model: Path, tmp_path: Path, cli) -> None:
    """A folder of one DICOM series (what scanners write) is read as a volume with its geometry."""
    encoding = locale.getpreferredencoding(False)
    for name, source in (("fixed", case.fixed), ("moving", case.moving)):
        image = read_image(source)
        write_dicom_series(image.with_array((1000 * image.array).astype(np.int16)), tmp_path / name)
    code, stderr = cli("register", tmp_path / "fixed", tmp_path / "moving", "-o", tmp_path / "out",
                       "--model", tiny_model, "--steps", "1")
    assert code == 0, stderr
    assert read_image(tmp_path / "out" / "warped.nii.gz").grid.same_as(read_image(case.fixed).grid, atol=1e-3)
    assert locale.getpreferredencoding(False) == encoding  # GDCM's reading leaves the process locale as it was
