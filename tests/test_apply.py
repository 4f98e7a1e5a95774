"""Label propagation: ``register --moving-labels`` alone, and ``diffusereg apply`` of a saved field
to another image or label map, with the same voxels, the fixed image's geometry and the same checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusereg.cli import main
from diffusereg.data import PairFiles
from diffusereg.io import Image, read_grid, read_image, write_image
from diffusereg.phantom import write_phantom
from diffusereg.registration import apply_field


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> PairFiles:
    return write_phantom(tmp_path_factory.mktemp("apply_case"), seed=3, shape=(4, 96, 96))


@pytest.fixture(scope="module")
def registered(case: PairFiles, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``diffusereg register F M --moving-labels L -o out`` (no fixed labels)."""
    output = tmp_path_factory.mktemp("registered") / "out"
    assert main(["register", str(case.fixed), str(case.moving), "--moving-labels", str(case.moving_labels),
                 "-o", str(output), "--model", str(tiny_model), "--steps", "2"]) == 0
    return output


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip()


def test_moving_labels_alone_are_warped_without_dice(registered: Path, case: PairFiles) -> None:
    metrics = json.loads((registered / "metrics.json").read_text())
    assert "warped_labels.nii.gz" in metrics["outputs"] and "dice_after" not in metrics
    warped = read_image(registered / "warped_labels.nii.gz")
    assert warped.array.dtype == read_image(case.moving_labels).array.dtype
    assert set(np.unique(warped.array)) <= set(np.unique(read_image(case.moving_labels).array))


@pytest.mark.parametrize("field_name", ["field.h5", "field.nii.gz"])
def test_apply_reproduces_the_registered_labels_and_image(registered: Path, case: PairFiles, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], field_name: str) -> None:
    code, error = run(capsys, "apply", registered / field_name, case.moving_labels, "--labels", "-o", tmp_path / "out2")
    assert code == 0, error
    applied, registered_labels = (read_image(p / "warped_labels.nii.gz") for p in (tmp_path / "out2", registered))
    assert np.array_equal(applied.array, registered_labels.array) and applied.array.dtype == registered_labels.array.dtype
    image = read_image(apply_field(registered / field_name, case.moving, tmp_path / "warped.mha")).array
    reference = read_image(registered / "warped.nii.gz").array
    if field_name == "field.h5":  # the transform as registered, bit for bit
        assert np.array_equal(image, reference)
    else:  # a NIfTI header keeps the grid's geometry in float32: the same up to that rounding
        np.testing.assert_allclose(image, reference, rtol=1e-4, atol=1e-4 * float(reference.max()))


def test_applied_result_overlays_the_fixed_image(registered: Path, case: PairFiles, tmp_path: Path) -> None:
    """Same grid as the fixed image (shape, spacing, origin, direction), and the same voxels as
    SimpleITK resampling the moving labels through field.h5 by itself (what a viewer or ITK tool does)."""
    written = apply_field(registered / "field.h5", case.moving_labels, tmp_path, labels=True)
    assert written == tmp_path / "warped_labels.nii.gz"
    assert read_grid(written).same_as(read_grid(case.fixed), atol=1e-6)
    transform = sitk.ReadTransform(str(registered / "field.h5"))
    fixed = sitk.ReadImage(str(case.fixed))
    by_itk = sitk.Resample(sitk.ReadImage(str(case.moving_labels)), fixed, transform, sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(by_itk), read_image(written).array)


def test_apply_to_an_image_on_another_grid(registered: Path, case: PairFiles, tmp_path: Path) -> None:
    """An image of the moving image's space on a grid of its own (half the in-plane resolution) is
    resampled through the field onto the fixed grid, close to the full-resolution warped image."""
    moving = sitk.ReadImage(str(case.moving))
    size, spacing = moving.GetSize(), moving.GetSpacing()
    coarse = sitk.Resample(moving, [size[0] // 2, size[1] // 2, size[2]], sitk.Transform(), sitk.sitkLinear,
                           moving.GetOrigin(), [2 * spacing[0], 2 * spacing[1], spacing[2]], moving.GetDirection())
    write_image(Image.from_sitk(coarse), tmp_path / "coarse.nii.gz")
    written = apply_field(registered / "field.nii.gz", tmp_path / "coarse.nii.gz", tmp_path / "out.nii.gz")
    assert read_grid(written).same_as(read_grid(case.fixed), atol=1e-6)
    assert np.corrcoef(read_image(written).array.ravel(), read_image(registered / "warped.nii.gz").array.ravel())[0, 1] > 0.9


def bad_apply_cases(registered: Path, case: PairFiles, tmp: Path) -> list[tuple[list[str | Path], Path | str, str]]:
    """(argv, the input the message names, the problem) for refused ``diffusereg apply`` calls."""
    labels = read_image(case.moving_labels)
    soft = tmp / "soft.nii.gz"
    write_image(labels.with_array(labels.array.astype(np.float32) * 0.5), soft)
    flat = tmp / "flat.nii.gz"
    write_image(Image(labels.array[0], labels.spacing[:2], labels.origin[:2], (1.0, 0.0, 0.0, 1.0)), flat)
    far = tmp / "far.nii.gz"
    write_image(Image(labels.array, labels.spacing, (5000.0, 0.0, 0.0), labels.direction), far)
    field = registered / "field.h5"
    return [
        (["apply", field, soft, "--labels", "-o", tmp / "o1"], soft, "label map has non-integer values (e.g. 0.5)"),
        (["apply", field, flat, "-o", tmp / "o2"], flat, "is 2D but the field"),
        (["apply", field, far, "--labels", "-o", tmp / "o3"], far, "does not overlap the field"),
        (["apply", field, case.moving, "-o", case.moving], case.moving, "this input would be overwritten"),
        (["apply", case.fixed, case.moving, "-o", tmp / "o4"], case.fixed, "has 1 components per voxel"),
        (["apply", tmp / "none.h5", case.moving, "-o", tmp / "o5"], tmp / "none.h5", "file does not exist"),
    ]


def test_apply_refuses_bad_inputs_with_one_line_and_writes_nothing(registered: Path, case: PairFiles, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for argv, culprit, problem in bad_apply_cases(registered, case, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        moving_bytes = case.moving.read_bytes()
        code, error = run(capsys, *argv)
        assert code == 2 and "\n" not in error and error.startswith("diffusereg apply: error: "), error
        assert f"{culprit}: " in error and problem in error, error
        assert sorted(p.name for p in tmp_path.iterdir()) == before and case.moving.read_bytes() == moving_bytes
