"""Bad inputs: every one ends in a one-line error naming the file and the problem, exit code 2,
and no output file, through the CLI (``diffusereg register``) and the Python API
(``load_pipeline`` + ``register_pair``).

Each case starts from the good phantom case and breaks one thing. The messages checked here are
the ones listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from diffusereg.data import PairFiles
from diffusereg.io import Image, read_image, write_image
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg import registration
from diffusereg.pipelines import load_pipeline
from diffusereg.registration import RegistrationSettings, register_pair

WEIGHTS = Path("denoiser/diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class Request:
    """What one ``diffusereg register`` call gets."""

    fixed: Path
    moving: Path
    output: Path
    model: Path | str
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    def argv(self) -> list[str | os.PathLike]:
        labels = [*([] if self.fixed_labels is None else ["--fixed-labels", self.fixed_labels]),
                  *([] if self.moving_labels is None else ["--moving-labels", self.moving_labels])]
        return ["register", self.fixed, self.moving, "-o", self.output, "--model", self.model, "--steps", "1", *labels]


@dataclass(frozen=True)
class Setup:
    """What a bad case is made from: the good case, a scratch folder, the saved models."""

    case: PairFiles
    tmp: Path
    model: Path
    model_3d: Path
    fixtures: pytest.FixtureRequest

    @property
    def locked(self) -> Path:
        """A folder nobody can write into (skips the test where there is none)."""
        return self.fixtures.getfixturevalue("locked_folder")

    @property
    def good(self) -> Request:
        return Request(self.case.fixed, self.case.moving, self.tmp / "out", self.model)

    @property
    def labelled(self) -> Request:
        return replace(self.good, fixed_labels=self.case.fixed_labels, moving_labels=self.case.moving_labels)

    def image(self, name: str, image: Image) -> Path:
        """``image`` written as ``tmp/name``."""
        write_image(image, self.tmp / name)
        return self.tmp / name

    def changed(self, path: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
        """The image at ``path`` with its voxels changed by ``change``, written as ``tmp/name``."""
        image = read_image(path)
        return self.image(name, image.with_array(change(image.array)))

    def model_copy(self, name: str) -> Path:
        """A copy of the 2D model, to break."""
        return Path(shutil.copytree(self.model, self.tmp / name))


@dataclass(frozen=True)
class Bad:
    """A bad request, the file its error must name, and the problem it must state."""

    request: Request
    culprit: Path | str
    problem: str


def nifti_with_pixdim(source: Path, target: Path, axis: int, value: float) -> Path:
    """A copy of a ``.nii.gz`` whose header spacing along ITK axis ``axis`` is ``value`` (raw
    header bytes: nibabel refuses to set such a value, ITK silently 'repairs' it)."""
    raw = gzip.decompress(source.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["pixdim"][1 + axis] = value
    target.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock):]))
    return target


def huge_header(target: Path, size: int) -> Path:
    """A ``.nii.gz`` whose header promises ``size``^3 float32 voxels (and holds none of them)."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
    header.set_data_shape((size, size, size))
    header["vox_offset"] = 352
    target.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return target


def as_2d(path: Path, target: Path) -> Path:
    """The middle slice of a volume as a 2D image (in-plane geometry kept, axis-aligned)."""
    volume = read_image(path)
    write_image(Image(volume.array[volume.array.shape[0] // 2], volume.spacing[:2], volume.origin[:2],
                      (1.0, 0.0, 0.0, 1.0)), target)
    return target


# ---------------------------------------------------------------------------------- the cases
def missing_file(s: Setup) -> Bad:
    return Bad(replace(s.good, moving=s.tmp / "nowhere.nii.gz"), s.tmp / "nowhere.nii.gz", "file does not exist")


def corrupt_nifti(s: Setup) -> Bad:
    path = s.tmp / "corrupt.nii.gz"
    path.write_bytes(b"this is not an image" * 50)
    return Bad(replace(s.good, fixed=path), path, "cannot read the image header (sitk::ERROR: Unable to determine "
               "ImageIO reader)")


def empty_file(s: Setup) -> Bad:
    path = s.tmp / "empty.nii.gz"
    path.touch()
    return Bad(replace(s.good, moving=path), path, "is empty (0 bytes)")


def folder_without_dicom(s: Setup) -> Bad:
    path = s.tmp / "series"
    path.mkdir()
    (path / "notes.txt").write_text("no DICOM here")
    return Bad(replace(s.good, fixed=path), path, "is a folder without a DICOM series")


def truncated_nifti(s: Setup) -> Bad:
    path = s.tmp / "truncated.nii.gz"
    data = s.case.moving.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return Bad(replace(s.good, moving=path), path, "compressed data is truncated or corrupt")


def image_4d(s: Setup) -> Bad:
    path = s.tmp / "cine.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((2, 8, 96, 96), np.float32),
                                           isVector=False), str(path))
    return Bad(replace(s.good, fixed=path), path, "has 4 dimensions; diffusereg reads 2D or 3D scalar images")


def image_2d_with_3d(s: Setup) -> Bad:
    fixed = as_2d(s.case.fixed, s.tmp / "fixed2d.nii.gz")
    return Bad(replace(s.good, fixed=fixed), s.case.moving, f"is 3D but {fixed} is 2D")


def images_2d_for_3d_model(s: Setup) -> Bad:
    fixed, moving = as_2d(s.case.fixed, s.tmp / "fixed2d.nii.gz"), as_2d(s.case.moving, s.tmp / "moving2d.nii.gz")
    return Bad(Request(fixed, moving, s.tmp / "out", s.model_3d), fixed,
               "is a 2D image; this model registers 3D volumes")


def nan_and_inf(s: Setup) -> Bad:
    def spoil(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        array[0, 5, 5], array[3, 50, 60] = np.nan, np.inf
        return array

    path = s.changed(s.case.moving, "nan.nii.gz", spoil)
    return Bad(replace(s.good, moving=path), path, "has 2 non-finite voxels (NaN or inf)")


def constant_image(s: Setup) -> Bad:
    path = s.changed(s.case.fixed, "constant.nii.gz", lambda array: np.full_like(array, 7.0))
    return Bad(replace(s.good, fixed=path), path, "every voxel is 7 (a constant image); nothing to register")


def zero_spacing(s: Setup) -> Bad:
    path = nifti_with_pixdim(s.case.fixed, s.tmp / "flat.nii.gz", axis=0, value=0.0)
    return Bad(replace(s.good, fixed=path), path, "has zero or negative spacing (0.0, 1.4, 10.0) in its NIfTI header")


def negative_spacing(s: Setup) -> Bad:
    path = nifti_with_pixdim(s.case.moving, s.tmp / "mirrored.nii.gz", axis=2, value=-10.0)
    return Bad(replace(s.good, moving=path), path, "has zero or negative spacing (1.4, 1.4, -10.0) in its NIfTI header")


def sheared_direction(s: Setup) -> Bad:
    image = read_image(s.case.moving).to_sitk()
    image.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    path = s.tmp / "sheared.mha"
    sitk.WriteImage(image, str(path))
    return Bad(replace(s.good, moving=path), path, "is not orthonormal")


def no_overlap(s: Setup) -> Bad:
    moving = read_image(s.case.moving)
    path = s.image("elsewhere.nii.gz", Image(moving.array, moving.spacing, (2000.0, 0.0, 0.0), moving.direction))
    return Bad(replace(s.good, moving=path), path, f"does not overlap {s.case.fixed} in physical space")


def too_small(s: Setup) -> Bad:
    fixed = read_image(s.case.fixed)
    path = s.image("small.nii.gz", Image(fixed.array[:, :4, :4].copy(), fixed.spacing, fixed.origin, fixed.direction))
    return Bad(replace(s.good, fixed=path), path, "too small for the model: it spans 2 x 2 voxels of the model grid")


def too_large(s: Setup) -> Bad:
    path = huge_header(s.tmp / "huge.nii.gz", 2048)
    return Bad(replace(s.good, fixed=path), path, "2048 x 2048 x 2048 voxels would need about 2.0 TiB of memory")


def little_overlap(s: Setup) -> Bad:
    moving = read_image(s.case.moving)
    shift = 0.7 * moving.array.shape[-1] * moving.spacing[0]  # 70 % of the field of view along x
    path = s.image("shifted.nii.gz", Image(moving.array, moving.spacing,
                                           (moving.origin[0] + shift, *moving.origin[1:]), moving.direction))
    return Bad(replace(s.good, moving=path), path, "% of the field of view of ")


def fixed_labels_alone(s: Setup) -> Bad:
    return Bad(replace(s.good, fixed_labels=s.case.fixed_labels), "labels", "--fixed-labels needs --moving-labels")


def labels_off_grid(s: Setup) -> Bad:
    labels = read_image(s.case.fixed_labels)
    path = s.image("shifted_gt.nii.gz", Image(labels.array, labels.spacing, (0.0, 0.0, 0.0), labels.direction))
    return Bad(replace(s.labelled, fixed_labels=path), path,
               f"label map is not on the grid of its image {s.case.fixed} "
               "(origin (0, 0, 0) vs (-118.3, -152.6, 61.5) mm)")


def labels_not_integer(s: Setup) -> Bad:
    path = s.changed(s.case.moving_labels, "soft_gt.nii.gz", lambda array: array.astype(np.float32) * 0.5)
    return Bad(replace(s.labelled, moving_labels=path), path, "label map has non-integer values (e.g. 0.5)")


def labels_negative(s: Setup) -> Bad:
    path = s.changed(s.case.fixed_labels, "signed_gt.nii.gz", lambda array: array.astype(np.int16) - 1)
    return Bad(replace(s.labelled, fixed_labels=path), path, "label map has negative values (e.g. -1)")


def labels_other_scheme(s: Setup) -> Bad:
    path = s.changed(s.case.moving_labels, "mmwhs_gt.nii.gz",
                     lambda array: np.where(array > 0, array.astype(np.int32) + 499, 0))
    return Bad(replace(s.labelled, moving_labels=path), path, "labels [500, 501, 502] share none with")


def labels_empty(s: Setup) -> Bad:
    path = s.changed(s.case.fixed_labels, "empty_gt.nii.gz", np.zeros_like)
    return Bad(replace(s.labelled, fixed_labels=path), path, "label map is empty (every voxel is 0); Dice needs")


def output_not_writable(s: Setup) -> Bad:
    return Bad(replace(s.good, output=s.locked / "out"), s.locked / "out", f"cannot be created in {s.locked}")


def output_is_a_file(s: Setup) -> Bad:
    path = s.tmp / "out"
    path.write_text("not a folder")
    return Bad(replace(s.good, output=path), path, "exists and is not a folder")


def output_is_an_input(s: Setup) -> Bad:
    (s.tmp / "out").mkdir()
    path = Path(shutil.copy(s.case.moving, s.tmp / "out" / "warped.nii.gz"))
    return Bad(replace(s.good, moving=path), path, "this input would be overwritten by an output")


def unknown_model(s: Setup) -> Bad:
    return Bad(replace(s.good, model="./no/such/model"), "model './no/such/model' not found", "no such folder")


def truncated_weights(s: Setup) -> Bad:
    model = s.model_copy("truncated_model")
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) // 2])
    return Bad(replace(s.good, model=model), model / WEIGHTS, "weights file is corrupt or truncated")


def config_other_shapes(s: Setup) -> Bad:
    model = s.model_copy("wider_model")
    config = model / "denoiser/config.json"
    config.write_text(config.read_text().replace('"feature_size": 12', '"feature_size": 24'))
    return Bad(replace(s.good, model=model), model / "denoiser", "weights do not match its config.json (")


def config_more_layers(s: Setup) -> Bad:
    model = s.model_copy("deeper_model")
    config = model / "denoiser/config.json"
    config.write_text(config.read_text().replace('"depths": [\n    1,', '"depths": [\n    2,'))
    return Bad(replace(s.good, model=model), model / "denoiser", "tensors missing, e.g. ")


def pickle_weights(s: Setup) -> Bad:
    model = s.model_copy("pickled_model")
    torch.save(load_file(model / WEIGHTS), model / WEIGHTS.with_suffix(".bin"))
    (model / WEIGHTS).unlink()
    return Bad(replace(s.good, model=model), model / WEIGHTS.with_suffix(".bin"),
               "pickle weights can run code when loaded and are refused")


CASES = [missing_file, empty_file, folder_without_dicom, corrupt_nifti, truncated_nifti, image_4d, image_2d_with_3d, images_2d_for_3d_model, nan_and_inf,
         constant_image, zero_spacing, negative_spacing, sheared_direction, no_overlap, little_overlap, too_small,
         too_large, fixed_labels_alone, labels_off_grid, labels_not_integer, labels_negative, labels_other_scheme, labels_empty, output_not_writable,
         output_is_a_file, output_is_an_input, unknown_model, truncated_weights, config_other_shapes,
         config_more_layers, pickle_weights]


@pytest.fixture
def setup(case: PairFiles, tmp_path: Path, case_model: Path, tiny_model_3d: Path,
          request: pytest.FixtureRequest) -> Setup:
    return Setup(case, tmp_path, case_model, tiny_model_3d, request)


def files_in(folder: Path) -> list[str]:
    """Every file below ``folder`` (none when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def inputs_of(request: Request) -> dict[Path, bytes]:
    paths = (request.fixed, request.moving, request.fixed_labels, request.moving_labels)
    return {path: path.read_bytes() for path in paths if path is not None and path.is_file()}


@pytest.mark.parametrize("make", CASES, ids=[make.__name__ for make in CASES])
def test_cli_refuses_with_one_line_naming_the_file(make: Callable[[Setup], Bad], setup: Setup, cli) -> None:
    bad = make(setup)
    inputs, outputs_before = inputs_of(bad.request), files_in(bad.request.output)
    code, error = cli(*bad.request.argv())
    assert code == 2
    assert "\n" not in error and error.startswith("diffusereg register: error: "), error
    assert f"{bad.culprit}: " in error and bad.problem in error, error
    assert files_in(bad.request.output) == outputs_before  # nothing written (an input there stays as it was)
    assert inputs_of(bad.request) == inputs


@pytest.mark.parametrize("make", CASES, ids=[make.__name__ for make in CASES])
def test_python_api_refuses_with_the_same_message(make: Callable[[Setup], Bad], setup: Setup) -> None:
    bad = make(setup)
    request, outputs_before = bad.request, files_in(bad.request.output)
    with pytest.raises((ValueError, OSError)) as caught:
        pipe = load_pipeline(str(request.model))
        register_pair(pipe, request.fixed, request.moving, request.output, RegistrationSettings(steps=1),
                      fixed_labels=request.fixed_labels, moving_labels=request.moving_labels)
    message = str(caught.value)
    assert "\n" not in message and f"{bad.culprit}: " in message and bad.problem in message, message
    assert files_in(request.output) == outputs_before


def test_too_large_is_refused_before_reading_a_voxel(setup: Setup, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    def no_reading(*args: object) -> None:
        raise AssertionError("voxels were read")

    monkeypatch.setattr("diffusereg.pipelines.layout.read_image", no_reading)
    monkeypatch.setattr("diffusereg.io._check_nifti", no_reading)
    request = too_large(setup).request
    code, error = cli(*request.argv())
    assert code == 2 and "of memory to register" in error
    with pytest.raises(ValueError, match="of memory to register"):  # the pipeline called directly, too
        DiffuseRegPipeline.from_pretrained(setup.model)(request.fixed, request.moving)


@pytest.mark.parametrize(("make", "expected"), [pytest.param(make, expected, id=make.__name__) for make, expected in [
    (constant_image, "fixed: every voxel is 7 (a constant image)"),
    (no_overlap, "moving: does not overlap fixed in physical space"),
    (images_2d_for_3d_model, "fixed: is a 2D image; this model registers 3D volumes"),
    (labels_not_integer, "moving_labels: label map has non-integer values (e.g. 0.5)"),
]])
def test_pipeline_refuses_in_memory_images_naming_their_role(make: Callable[[Setup], Bad], expected: str,
                                                            setup: Setup) -> None:
    """The pipeline runs the same checks when called directly; in-memory images are named by their role."""
    request = make(setup).request
    pipe = DiffuseRegPipeline.from_pretrained(request.model)
    labels = None if request.moving_labels is None else read_image(request.moving_labels)
    with pytest.raises(ValueError) as caught:
        pipe(read_image(request.fixed), read_image(request.moving), moving_labels=labels)
    assert str(caught.value).startswith(expected), caught.value


def test_trusted_pickle_weights_load_and_register_like_safetensors(setup: Setup, cli) -> None:
    model = pickle_weights(setup).request.model
    with pytest.raises(ValueError, match="refused"):
        DiffuseRegPipeline.from_pretrained(model)
    trusted = DiffuseRegPipeline.from_pretrained(model, allow_pickle=True)
    reference = DiffuseRegPipeline.from_pretrained(setup.model)
    for name, weights in reference.denoiser.state_dict().items():
        assert torch.equal(weights, trusted.denoiser.state_dict()[name]), name
    output = setup.tmp / "trusted"
    code, error = cli(*replace(setup.good, model=model, output=output).argv(), "--trust-pickle-weights")
    assert code == 0, error
    assert (output / "metrics.json").is_file()


@pytest.mark.slow
def test_console_script_refuses_with_one_line(setup: Setup) -> None:
    """A real process: exit code 2, exactly one line on stderr, no output folder."""
    request = constant_image(setup).request
    script = Path(sys.executable).with_name("diffusereg")
    result = subprocess.run([str(script), *map(str, request.argv()), "--device", "cpu"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "a constant image" in result.stderr, result.stderr
    assert str(request.fixed) in result.stderr and not request.output.exists()


def test_a_much_larger_moving_image_registers_with_a_warning(setup: Setup, cli) -> None:
    """A moving image with 3 times the fixed image's field of view along its x axis (zero padding
    around it; 2.3 times along the world x axis, the phantom is oblique): registered (exit 0), with
    a warning line that names it and says what to check."""
    moving = read_image(setup.case.moving)
    array = np.pad(moving.array, ((0, 0), (0, 0), (moving.array.shape[2], moving.array.shape[2])))
    shift = moving.grid.direction_matrix @ np.array([-moving.array.shape[2] * moving.spacing[0], 0.0, 0.0])
    path = setup.image("wide.nii.gz", Image(array, moving.spacing, tuple(np.add(moving.origin, shift)),
                                            moving.direction))
    code, error = cli(*replace(setup.good, moving=path).argv())
    assert code == 0
    warning = [line for line in error.splitlines() if line.startswith("diffusereg register: warning: ")
               and " spans " in line]
    assert len(warning) == 1 and f"{path}: spans 2.3 times" in warning[0] and "same anatomy" in warning[0], error


@pytest.mark.parametrize(("arrays", "expected"), [
    pytest.param(lambda: (np.full((64, 64), 14.0), np.linspace(14, 255, 64 * 64).reshape(64, 64)),
                 "fixed: intensities span 14 .. 14, but arrays must be on the model grid with intensities in [0, 1]",
                 id="raw_intensities"),
    pytest.param(lambda: (np.random.default_rng(0).random((10, 232, 256)),) * 2,
                 "arrays of shape (10, 232, 256) are not on a model grid", id="native_shape"),
])
def test_pipeline_refuses_arrays_off_the_model_grid(arrays, expected: str, setup: Setup) -> None:
    """Arrays are taken as model-grid images; raw intensities or a native shape are refused with
    the way to the model grid (files / Image objects, or pipe.preprocessing)."""
    fixed, moving = arrays()
    with pytest.raises(ValueError) as caught:
        DiffuseRegPipeline.from_pretrained(setup.model)(fixed, moving)
    assert str(caught.value).startswith(expected) and "pipe.preprocessing(" in str(caught.value), caught.value


def test_one_registration_reads_each_input_once_and_runs_each_check_once(setup: Setup, cli,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``diffusereg register`` with both label maps: one header read (``read_grid``) and one full
    read (``read_image``) per input file, and every check of diffusereg.validation once."""
    import diffusereg.validation
    from diffusereg.pipelines import layout

    calls: dict[str, list[str]] = {}

    def counting(module: object, name: str) -> None:
        original = getattr(module, name)

        def counted(*args: object, **kwargs: object) -> object:
            calls.setdefault(name, []).append(str(args[0]) if name.startswith("read") else "")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(diffusereg.validation, "read_grid")
    counting(layout, "read_image")
    for name in ("check_sources", "check_output_folder", "check_pair", "check_model_grid_arrays"):
        for module in (diffusereg.validation, registration, layout):
            if hasattr(module, name):
                counting(module, name)
    request = setup.labelled
    assert cli(*request.argv())[0] == 0
    inputs = sorted(str(p) for p in (request.fixed, request.moving, request.fixed_labels, request.moving_labels))
    assert sorted(calls["read_grid"]) == inputs and sorted(calls["read_image"]) == inputs
    assert {name: len(calls[name]) for name in ("check_sources", "check_output_folder", "check_pair",
                                                 "check_model_grid_arrays")} == dict.fromkeys(
        ("check_sources", "check_output_folder", "check_pair", "check_model_grid_arrays"), 1)
