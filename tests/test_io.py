"""diffusereg.io: geometry-preserving, atomic reading/writing; input checks; displacement fields."""

from __future__ import annotations

import gzip
import locale
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusereg.io import (
    Grid,
    Image,
    ImageReadError,
    InvalidImageError,
    read_displacement_field,
    read_displacement_transform,
    read_grid,
    read_image,
    validate_image,
    write_displacement_field,
    write_image,
)


def oblique_direction(ndim: int) -> tuple[float, ...]:
    """A rotation by 30 degrees (2D) or about two axes (3D): orthonormal, not axis-aligned."""
    a, b = np.deg2rad(30.0), np.deg2rad(-50.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    matrix = rz[:2, :2] if ndim == 2 else rz @ rx
    return tuple(matrix.ravel())


def make_image(shape: tuple[int, ...], dtype: type = np.float32, seed: int = 0) -> Image:
    """Random voxels on an anisotropic, shifted, oblique grid."""
    ndim = len(shape)
    rng = np.random.default_rng(seed)
    spacing = (0.7, 1.3, 2.9)[:ndim]
    origin = (12.5, -30.25, 7.0)[:ndim]
    return Image(rng.normal(size=shape).astype(dtype), spacing, origin, oblique_direction(ndim))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
@pytest.mark.parametrize("shape", [(5, 6, 7), (9, 11)], ids=["3d", "2d"])
def test_write_read_keeps_voxels_and_geometry(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    image = make_image(shape)
    path = tmp_path / f"image{suffix}"
    write_image(image, path)
    back = read_image(path)
    assert back.same_geometry(image, atol=1e-6)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, image.array)
    assert read_grid(path).same_as(image.grid, atol=1e-6)
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_image_properties_and_sitk_round_trip() -> None:
    image = make_image((4, 5, 6))
    assert image.ndim == 3
    assert image.axis_spacing == (2.9, 1.3, 0.7)
    sitk_image = image.to_sitk()
    assert sitk_image.GetSize() == (6, 5, 4)
    assert Image.from_sitk(sitk_image).same_geometry(image, atol=0.0)
    assert not image.same_geometry(Image(image.array, image.spacing, (0.0, 0.0, 0.0), image.direction))
    with pytest.raises(ValueError, match="does not match"):
        image.with_array(np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match="inconsistent geometry"):
        Image(np.zeros((4, 5, 6)), (1.0, 1.0), (0.0, 0.0, 0.0), image.direction)


def test_overwrite_false_refuses_existing_file(tmp_path: Path) -> None:
    image = make_image((3, 4, 5))
    path = tmp_path / "image.nii.gz"
    write_image(image, path)
    with pytest.raises(FileExistsError, match="image.nii.gz"):
        write_image(image, path, overwrite=False)


def test_write_into_missing_folder_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_image(make_image((3, 4, 5)), tmp_path / "missing" / "image.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_failing_write_leaves_no_partial_or_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_writer(image: sitk.Image, path: str, *args: object) -> None:
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    with pytest.raises(OSError, match=r"image\.nii\.gz: cannot be written \(disk full\)"):
        write_image(make_image((3, 4, 5)), tmp_path / "image.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.nii.gz"
    with pytest.raises(ImageReadError, match=r"nothing\.nii\.gz: file does not exist"):
        read_image(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "image.docx"
    path.write_bytes(b"PK")
    with pytest.raises(ImageReadError, match=r"image\.docx: unsupported file extension"):
        read_image(path)


def test_empty_file_is_named_empty_not_corrupt(tmp_path: Path) -> None:
    for name in ("empty.nii.gz", "empty.png", "empty.h5"):
        (tmp_path / name).touch()
    for read in (read_image, read_grid):
        for name in ("empty.nii.gz", "empty.png"):
            with pytest.raises(ImageReadError, match=rf"^{re.escape(str(tmp_path / name))}: is empty \(0 bytes\)$"):
                read(tmp_path / name)
    with pytest.raises(ImageReadError, match=r"empty\.h5: is empty \(0 bytes\)"):
        read_displacement_transform(tmp_path / "empty.h5")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".bmp"])
def test_colour_pictures_are_read_as_their_luminance(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / f"colour{suffix}"))
    image = read_image(tmp_path / f"colour{suffix}")
    assert image.array.shape == (20, 30) and image.ndim == 2
    expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    np.testing.assert_allclose(image.array, expected, atol=3.0 if suffix == ".jpg" else 1e-3)  # JPEG is lossy
    assert read_grid(tmp_path / f"colour{suffix}").shape == (20, 30)


def test_grey_png_keeps_its_values(tmp_path: Path) -> None:
    grey = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "grey.png"))
    image = read_image(tmp_path / "grey.png")
    np.testing.assert_array_equal(image.array, grey)
    assert image.spacing == (1.0, 1.0)


def write_dicom_series(image: Image, folder: Path) -> Path:
    """``image`` (3D, int16 values) as a DICOM series, one file per slice, geometry in the tags.
    GDCM's writer sets the process locale to "C" (Python would then read text as ASCII): restored."""
    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)
    volume = image.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = "\\".join(f"{v:.6f}" for v in (*image.direction[0:7:3], *image.direction[1:8:3]))
    for k in range(volume.GetDepth()):
        piece = volume[:, :, k]
        for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|0037", direction),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0008|0060", "MR"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.2.{k + 1}")):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_ALL, saved_locale)
    return folder


def test_dicom_series_folder_is_read_as_one_volume(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 1000, size=(5, 12, 16)).astype(np.int16)
    image = Image(values, (0.8, 0.9, 2.5), (-10.0, 20.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    folder = write_dicom_series(image, tmp_path / "series")
    read = read_image(folder)
    np.testing.assert_array_equal(read.array, values)
    assert read.grid.same_as(image.grid, atol=1e-3)
    assert read_grid(folder).same_as(image.grid, atol=1e-3)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ImageReadError, match=r"empty_folder: is a folder without a DICOM series"):
        read_image(tmp_path / "empty_folder")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_corrupt_bytes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"this is not an image" * 50)
    with pytest.raises(ImageReadError, match=rf"corrupt{suffix.replace('.', '[.]')}: "):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    write_image(make_image((8, 16, 16)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match=rf"image{suffix.replace('.', '[.]')}: .*(truncated|corrupt)"):
        read_image(path)


def test_gzip_stream_of_short_nifti(tmp_path: Path) -> None:
    """A complete gzip stream holding a NIfTI cut short is still caught."""
    path = tmp_path / "image.nii.gz"
    write_image(make_image((8, 16, 16)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(ImageReadError, match=r"image\.nii\.gz: file is truncated"):
        read_image(path)


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "cine.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))
    with pytest.raises(InvalidImageError, match=r"cine\.nii\.gz: has 4 dimensions; diffusereg reads 2D or 3D scalar"):
        read_image(path)


def test_vector_image(tmp_path: Path) -> None:
    path = tmp_path / "vectors.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True), str(path))
    with pytest.raises(InvalidImageError, match=r"vectors\.mha: is a vector image with 3 components"):
        read_image(path)


def test_nan_voxels(tmp_path: Path) -> None:
    image = make_image((3, 4, 5))
    array = image.array.copy()
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    path = tmp_path / "nan.nrrd"
    write_image(image.with_array(array), path)
    with pytest.raises(InvalidImageError, match=r"nan\.nrrd: has 2 non-finite voxels"):
        read_image(path)


def test_non_orthonormal_direction_in_file(tmp_path: Path) -> None:
    sheared = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    sheared.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "sheared.mha"
    sitk.WriteImage(sheared, str(path))
    with pytest.raises(InvalidImageError, match=r"sheared\.mha: direction matrix .* is not orthonormal"):
        read_image(path)


def test_validate_image_in_memory() -> None:
    image = make_image((3, 4, 5))
    assert validate_image(image, "fixed") is image
    flat = Image(image.array, (1.0, 0.0, 2.0), image.origin, image.direction)
    with pytest.raises(InvalidImageError, match="fixed: has zero or negative spacing"):
        validate_image(flat, "fixed")


def shift_test_setup(ndim: int) -> tuple[Image, np.ndarray, tuple[int, ...]]:
    """A random image on an oblique anisotropic grid and a constant integer voxel shift field."""
    shape = (10, 12, 14)[-ndim:] if ndim == 3 else (12, 14)
    image = make_image(shape, seed=1)
    shift = (2, -1, 3)[:ndim]
    field = np.stack([np.full(shape, float(s)) for s in shift])
    return image, field, shift


def shifted_interior(array: np.ndarray, shift: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``array[x + shift]`` on the voxels ``x`` where ``x + shift`` stays inside, and those voxels."""
    target = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, array.shape))
    source = tuple(slice(t.start + s, t.stop + s) for t, s in zip(target, shift))
    return array[source], target


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("suffix", [".h5", ".nii.gz"])
def test_displacement_field_matches_simpleitk_resample(tmp_path: Path, ndim: int, suffix: str) -> None:
    image, field, shift = shift_test_setup(ndim)
    path = tmp_path / f"field{suffix}"
    write_displacement_field(field, image, path)
    if suffix == ".h5":
        transform = sitk.ReadTransform(str(path))
    else:
        transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    warped = sitk.GetArrayFromImage(sitk.Resample(image.to_sitk(), image.to_sitk(), transform, sitk.sitkLinear, 0.0))
    expected, interior = shifted_interior(image.array, shift)
    np.testing.assert_allclose(warped[interior], expected, atol=1e-4)
    np.testing.assert_allclose(read_displacement_field(path, image), field, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_displacement_field_stores_world_vectors(tmp_path: Path) -> None:
    """One voxel along array axis 0 of a 3D grid is ``spacing_z * direction[:, 2]`` mm (ITK x, y, z)."""
    image, _, _ = shift_test_setup(3)
    field = np.zeros((3, *image.array.shape))
    field[0] = 1.0
    path = tmp_path / "field.mha"
    write_displacement_field(field, image, path)
    vectors = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    expected = image.spacing[2] * image.grid.direction_matrix[:, 2]
    np.testing.assert_allclose(vectors[3, 4, 5], expected, atol=1e-12)


def test_displacement_field_bad_inputs(tmp_path: Path) -> None:
    image, field, _ = shift_test_setup(3)
    with pytest.raises(ValueError, match="does not match"):
        write_displacement_field(field[:2], image, tmp_path / "field.h5")
    with pytest.raises(ValueError, match="unsupported extension"):
        write_displacement_field(field, image, tmp_path / "field.txt")
    with pytest.raises(ImageReadError, match="field.h5: file does not exist"):
        read_displacement_field(tmp_path / "field.h5", image)


def test_grid_prints_size_and_spacing_in_one_axis_order() -> None:
    """``print(grid)`` showed the shape in array order (D, H, W) beside an (x, y, z) spacing (issue 32)."""
    grid = Grid((10, 256, 232), (1.5625, 1.4, 10.0), (0.0, -5.0, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert str(grid) == ("Grid(size (x, y, z) = (232, 256, 10) voxels, spacing (x, y, z) = (1.5625, 1.4, 10) mm, "
                         "origin (x, y, z) = (0, -5, 2.5) mm, direction = (1, 0, 0, 0, 1, 0, 0, 0, 1))")
    assert str(Grid((4, 6), (2.0, 3.0), (0.0, 0.0), (1, 0, 0, 1))).startswith("Grid(size (x, y) = (6, 4) voxels")
