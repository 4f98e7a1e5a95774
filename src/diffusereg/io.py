"""Images with their geometry, and atomic reading/writing of images and displacement fields.

`Image` is the library's one image type: a NumPy array in array-axis order (``(D, H, W)`` or
``(H, W)``, as ``SimpleITK.GetArrayFromImage`` returns it) together with the physical geometry
exactly as SimpleITK reports it (``spacing``, ``origin`` in ITK ``(x, y, z)`` order, millimetres;
``direction`` as a flattened row-major ``ndim x ndim`` matrix).

Images are read from and written to ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd`` (+ data file) and
``.nrrd`` files; 2D pictures are also read from ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``
and ``.bmp`` files (colour ones as their luminance), and volumes from a folder holding one DICOM
series. Displacement fields are written either as vector images (same extensions) or as an ITK
``DisplacementFieldTransform`` in an HDF5 transform file (``.h5``, ``.hdf5``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from diffusereg.spatial import field_to_world, world_to_field

__all__ = [
    "FIELD_TRANSFORM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "PICTURE_SUFFIXES",
    "Grid",
    "Image",
    "ImageError",
    "ImageReadError",
    "InvalidImageError",
    "displacement_transform",
    "luminance",
    "read_displacement_field",
    "read_displacement_transform",
    "read_grid",
    "read_image",
    "transform_grid",
    "validate_image",
    "write_atomically",
    "write_displacement_field",
    "write_image",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
"""File name endings read and written as images."""

PICTURE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File name endings read (never written) as pictures: SimpleITK's spacing (1 mm per pixel where
the file states none), colour pixels as their luminance (:func:`luminance`)."""

LUMINANCE_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""Weights of red, green and blue in a colour picture's luminance (ITU-R BT.601 luma)."""

FIELD_TRANSFORM_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
"""File name endings written as an ITK ``DisplacementFieldTransform`` (HDF5 transform file)."""


class ImageError(ValueError):
    """Base class of the image errors; the message names the file (or image) and the problem."""


class ImageReadError(ImageError):
    """A file is missing, empty, has an unsupported extension, or cannot be decoded (corrupt,
    truncated); a folder holds no DICOM series, or several."""


class InvalidImageError(ImageError):
    """An image was decoded but is not usable: wrong dimensionality, vector pixels, non-finite
    voxels, non-positive spacing or a non-orthonormal direction; or it does not fit the
    registration asked for (see :mod:`diffusereg.validation`)."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space, without voxel values.

    Attributes:
        shape: grid size in array-axis order, ``(D, H, W)`` or ``(H, W)``.
        spacing: voxel size in mm, ITK ``(x, y, z)`` order (the reverse of ``shape``'s order).
        origin: physical position (mm) of the first voxel's centre, ITK order.
        direction: row-major flattened ``ndim x ndim`` direction cosine matrix, ITK order.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        for name in ("spacing", "origin", "direction"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        ndim = len(self.shape)
        if len(self.spacing) != ndim or len(self.origin) != ndim or len(self.direction) != ndim * ndim:
            raise ValueError(
                f"inconsistent geometry for a {ndim}D grid: spacing {self.spacing}, origin "
                f"{self.origin}, direction {self.direction}"
            )

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape)

    def __str__(self) -> str:
        """Every quantity in ITK ``(x, y, z)`` order, so size and spacing read axis by axis (the
        array order ``shape`` is reversed)."""
        axes = "(x, y, z)" if self.ndim == 3 else "(x, y)"

        def values(numbers: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:g}" for v in numbers) + ")"

        return (f"Grid(size {axes} = {values(tuple(reversed(self.shape)))} voxels, spacing {axes} = "
                f"{values(self.spacing)} mm, origin {axes} = {values(self.origin)} mm, direction = "
                f"{values(self.direction)})")

    @property
    def axis_spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) in array-axis order, i.e. ``spacing`` reversed."""
        return tuple(reversed(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction cosines as an ``(ndim, ndim)`` float64 matrix (ITK order)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def same_as(self, other: Grid, atol: float = 1e-5) -> bool:
        """True when both grids have the same shape and, within ``atol``, the same geometry."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0.0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0.0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=atol)
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's spacing, origin and direction on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Grid:
        """The grid of a SimpleITK image (of any pixel type)."""
        return cls(
            shape=tuple(reversed(image.GetSize())),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )


@dataclass(frozen=True, eq=False)
class Image:
    """A scalar 2D or 3D image: voxel array plus geometry.

    Attributes:
        array: voxel values, shape ``(D, H, W)`` or ``(H, W)`` (array-axis order).
        spacing: voxel size in mm, ITK ``(x, y, z)`` order.
        origin: physical position (mm) of voxel ``(0, ..., 0)``, ITK order.
        direction: row-major flattened ``ndim x ndim`` direction matrix, ITK order.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        grid = Grid(tuple(self.array.shape), self.spacing, self.origin, self.direction)  # checks lengths
        for name in ("spacing", "origin", "direction"):
            object.__setattr__(self, name, getattr(grid, name))

    @property
    def grid(self) -> Grid:
        """The image's voxel grid (shape and geometry, no values)."""
        return Grid(tuple(self.array.shape), self.spacing, self.origin, self.direction)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.array.ndim

    @property
    def axis_spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) in array-axis order, i.e. ``spacing`` reversed."""
        return self.grid.axis_spacing

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Image:
        """Copy a scalar SimpleITK image into an `Image`. Raises ValueError for vector images."""
        components = image.GetNumberOfComponentsPerPixel()
        if components != 1:
            raise ValueError(f"a vector image with {components} components per voxel is not a scalar Image")
        grid = Grid.from_sitk(image)
        return cls(sitk.GetArrayFromImage(image), grid.spacing, grid.origin, grid.direction)

    @classmethod
    def on_grid(cls, array: np.ndarray, grid: Grid) -> Image:
        """An image with voxel values ``array`` (shape ``grid.shape``) on ``grid``."""
        if tuple(array.shape) != grid.shape:
            raise ValueError(f"array shape {tuple(array.shape)} does not match the grid shape {grid.shape}")
        return cls(array, grid.spacing, grid.origin, grid.direction)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and geometry (bool arrays become uint8)."""
        array = self.array.astype(np.uint8) if self.array.dtype == np.bool_ else self.array
        return self.grid.apply_to(sitk.GetImageFromArray(array, isVector=False))

    def with_array(self, array: np.ndarray) -> Image:
        """The same geometry with new voxel values; ``array`` must have this image's shape."""
        return Image.on_grid(array, self.grid)

    def same_geometry(self, other: Image, atol: float = 1e-5) -> bool:
        """True when both images have the same shape, spacing, origin and direction (within ``atol``)."""
        return self.grid.same_as(other.grid, atol=atol)


def validate_image(image: Image, name: str) -> Image:
    """Check that ``image`` is usable by diffusereg and return it unchanged.

    Args:
        image: the image to check.
        name: how to call the image in error messages (usually its file path).

    Raises:
        InvalidImageError: naming ``name`` and the problem, when the image is not 2D or 3D, has
            NaN/inf voxels, a zero or negative spacing, or a direction matrix that is not orthonormal.
    """
    if image.ndim not in (2, 3):
        raise InvalidImageError(
            f"{name}: has {image.ndim} dimensions; diffusereg reads 2D or 3D scalar images"
        )
    if not np.all(np.isfinite(image.array)):
        count = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
        raise InvalidImageError(f"{name}: has {count} non-finite voxels (NaN or inf)")
    if any(not (s > 0.0) for s in image.spacing):
        raise InvalidImageError(f"{name}: has zero or negative spacing {image.spacing}")
    direction = image.grid.direction_matrix
    if not np.allclose(direction @ direction.T, np.eye(image.ndim), atol=1e-4):
        raise InvalidImageError(f"{name}: direction matrix {image.direction} is not orthonormal")
    return image


def _suffix(path: Path) -> str:
    """The file's format suffix, lower case, with ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@contextlib.contextmanager
def _itk_warnings_silenced() -> Iterator[None]:
    """Silence ITK's console warnings (e.g. NIfTI 'unexpected scales in sform') while reading;
    the geometry is validated by `validate_image` instead. The previous setting is restored."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _check_readable(path: Path, suffixes: tuple[str, ...], series: bool = False) -> None:
    """Raise ImageReadError unless ``path`` is a non-empty file with one of ``suffixes`` (or, with
    ``series``, a folder: a DICOM series)."""
    if not path.exists():
        raise ImageReadError(f"{path}: file does not exist")
    if path.is_dir() and series:
        return
    if not path.is_file():
        raise ImageReadError(f"{path}: is not a file")
    if _suffix(path) not in suffixes:
        folder = " (or a folder of one DICOM series)" if series else ""
        raise ImageReadError(f"{path}: unsupported file extension; expected one of {', '.join(suffixes)}{folder}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: is empty (0 bytes)")


def _raw_nifti_header(stream: BinaryIO) -> nib.Nifti1Header:
    """A NIfTI-1 or NIfTI-2 header exactly as stored at the start of ``stream`` (``nib.load``
    would 'repair' fields such as a zero spacing, and log about it)."""
    size = stream.read(4)
    stream.seek(0)
    header_class = nib.Nifti2Header if 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big")) else (
        nib.Nifti1Header)
    return header_class(stream.read(header_class.sizeof_hdr), check=False)


def _check_nifti(path: Path) -> None:
    """Catch, in one pass over a NIfTI file, what ITK reads from it without an error:
    ImageReadError when the file holds fewer voxel bytes than its header promises (ITK zero-fills
    them); InvalidImageError when float voxels are NaN or inf (ITK reads them as 0) or the
    header's spacing (``pixdim``) is zero or negative (ITK makes it 1 or its absolute value).
    """
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as stream:
            header = _raw_nifti_header(stream)
            dtype, offset = header.get_data_dtype(), int(header.get_data_offset())
            voxel_bytes = int(np.prod(header.get_data_shape())) * dtype.itemsize
            non_finite, read = 0, 0  # voxel bytes read
            stream.seek(offset)
            while read < voxel_bytes and (chunk := stream.read(min(dtype.itemsize << 20, voxel_bytes - read))):
                read += len(chunk)
                if dtype.kind == "f":
                    values = np.frombuffer(chunk, dtype, count=len(chunk) // dtype.itemsize)
                    non_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ImageReadError(f"{path}: compressed data is truncated or corrupt ({error})") from error
    except Exception as error:  # nibabel raises many types for a bad header
        raise ImageReadError(f"{path}: not a readable NIfTI file ({type(error).__name__}: {error})") from error
    if read < voxel_bytes:
        raise ImageReadError(
            f"{path}: file is truncated ({offset + read} of {offset + voxel_bytes} header+voxel bytes)")
    if non_finite:
        raise InvalidImageError(f"{path}: has {non_finite} non-finite voxels (NaN or inf)")
    spacing = tuple(float(f"{s:.6g}") for s in header["pixdim"][1 : 1 + min(int(header["dim"][0]), 3)])
    if any(not (s > 0.0) for s in spacing):
        raise InvalidImageError(f"{path}: has zero or negative spacing {spacing} in its NIfTI header")


def _itk_reason(error: RuntimeError, path: Path) -> str:
    """The last line of an ITK error message, without the file name it repeats."""
    return str(error).strip().splitlines()[-1].replace(f' for "{path}"', "").strip()


def _dicom_series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order (GDCM's sorting)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(f"{folder}: is a folder without a DICOM series; give an image file or the folder of "
                             "one DICOM series")
    if len(series) > 1:
        raise ImageReadError(f"{folder}: holds {len(series)} DICOM series ({', '.join(series)}); give the folder "
                             "of one series")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _read_sitk(path: Path) -> sitk.Image:
    """Read a file (or the DICOM series of a folder) with SimpleITK, turning its multi-line errors
    into a one-line ImageReadError."""
    try:
        with _itk_warnings_silenced():
            if path.is_dir():
                return sitk.ReadImage(_dicom_series_files(path))
            return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = _itk_reason(error, path)
        raise ImageReadError(f"{path}: cannot be read as an image (corrupt or unsupported: {reason})") from error


def luminance(picture: sitk.Image) -> sitk.Image:
    """A colour picture (RGB or RGBA pixels) as one float32 grey value per pixel,
    ``LUMINANCE_WEIGHTS`` times red, green and blue (alpha ignored); grey pictures unchanged."""
    components = picture.GetNumberOfComponentsPerPixel()
    if components not in (3, 4):
        return picture
    rgb = sitk.GetArrayFromImage(picture)[..., :3].astype(np.float32)
    grey = sitk.GetImageFromArray(rgb @ np.asarray(LUMINANCE_WEIGHTS, dtype=np.float32), isVector=False)
    grey.CopyInformation(picture)
    return grey


def read_grid(path: str | os.PathLike) -> Grid:
    """Read only the header of an image file (a DICOM series folder: the whole series): its grid
    (shape, spacing, origin, direction)."""
    path = Path(path)
    _check_readable(path, IMAGE_SUFFIXES + PICTURE_SUFFIXES, series=True)
    if path.is_dir():
        return Grid.from_sitk(_read_sitk(path))  # a series has no header of its own: read it whole
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_warnings_silenced():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(f"{path}: cannot read the image header ({_itk_reason(error, path)})") from error
    return Grid(
        shape=tuple(reversed(reader.GetSize())),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )


def read_image(path: str | os.PathLike) -> Image:
    """Read a 2D or 3D scalar image: a ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd`` or ``.nrrd`` file,
    a picture (:data:`PICTURE_SUFFIXES`; colour as :func:`luminance`), or a folder holding one
    DICOM series.

    Returns:
        The `Image`, with the file's voxel type and geometry.

    Raises:
        ImageReadError: the file is missing, empty, has an unsupported extension, or is
            corrupt/truncated; the folder holds no DICOM series or several.
        InvalidImageError: the image is 4D, vector-valued, has NaN/inf voxels, non-positive
            spacing or a non-orthonormal direction.
    """
    path = Path(path)
    _check_readable(path, IMAGE_SUFFIXES + PICTURE_SUFFIXES, series=True)
    if _suffix(path) in (".nii", ".nii.gz") and path.is_file():
        _check_nifti(path)
    sitk_image = _read_sitk(path)
    if _suffix(path) in PICTURE_SUFFIXES:
        sitk_image = luminance(sitk_image)
    components = sitk_image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InvalidImageError(
            f"{path}: is a vector image with {components} components per voxel; "
            "diffusereg reads 2D or 3D scalar images"
        )
    return validate_image(Image.from_sitk(sitk_image), str(path))


def write_atomically(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temporary path with ``path``'s name, then move the result(s)
    into place with ``os.replace``.

    The temporary folder lives beside ``path`` (same file system, so the move is atomic) and is
    removed whatever happens. Companion files written alongside (e.g. the ``.raw`` of an ``.mhd``)
    are moved first and the named file last, so a reader never sees a header without its data.

    Raises:
        OSError: naming ``path``, when the writer fails (SimpleITK reports a full disk or a refused
            write as a multi-line ``RuntimeError``, Python as an ``OSError`` naming the temporary
            file; either becomes one line naming ``path``).
    """
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists and overwrite=False")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            write(tmp_dir / path.name)
        except OSError as error:
            raise OSError(f"{path}: cannot be written ({error.strerror or error})") from error
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            reason = lines[-1].strip() if lines else type(error).__name__
            raise OSError(f"{path}: cannot be written ({reason})") from error
        for written in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_image(image: Image, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write ``image`` with its geometry, atomically (temporary file, then ``os.replace``).

    The format follows the extension (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``);
    ``.mha``/``.mhd``/``.nrrd`` voxels are compressed. Bool arrays are written as uint8.
    """
    path = Path(path)
    if _suffix(path) not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file extension; expected one of {', '.join(IMAGE_SUFFIXES)}")
    sitk_image = image.to_sitk()
    write_atomically(path, lambda tmp: sitk.WriteImage(sitk_image, str(tmp), True), overwrite)


def _field_to_world(field: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxel displacement ``(ndim, *S)`` -> world vectors ``(*S, ndim)``, mm, ITK ``(x, y, z)`` order."""
    world = field_to_world(torch.from_numpy(np.asarray(field, dtype=np.float64)), grid.axis_spacing, grid.direction)
    return np.moveaxis(world.numpy(), 0, -1)


def _world_to_field(vectors: np.ndarray, grid: Grid) -> np.ndarray:
    """Inverse of `_field_to_world`: world vectors ``(*S, ndim)`` in mm -> voxels ``(ndim, *S)``."""
    field = world_to_field(torch.from_numpy(np.moveaxis(vectors, -1, 0).copy()), grid.axis_spacing, grid.direction)
    return field.numpy()


def _grid_of(reference: Image | Grid) -> Grid:
    return reference.grid if isinstance(reference, Image) else reference


def displacement_transform(field: np.ndarray, reference: Image | Grid) -> sitk.DisplacementFieldTransform:
    """The ITK transform ``T(x) = x + d(x)`` of a displacement field on ``reference``'s grid.

    Args:
        field: displacement in voxels of ``reference``'s grid, shape ``(ndim, *S)`` with
            ``S = reference.shape``; channel ``i`` moves along array axis ``i``.
        reference: the fixed image (or its grid).

    The transform holds world displacements in mm, ITK ``(x, y, z)`` component order
    (``direction @ (spacing * index_displacement)``), float64. ``sitk.Resample(moving, reference,
    T)`` gives ``moving(x + d(x))``, the same pull warp as diffusereg's ``warp(moving, field)``.

    Raises:
        ValueError: the field's shape does not fit the grid, or it has non-finite values.
    """
    field = np.asarray(field)
    grid = _grid_of(reference)
    if field.shape != (grid.ndim, *grid.shape):
        raise ValueError(f"field shape {field.shape} does not match (ndim, *S) = {(grid.ndim, *grid.shape)}")
    if not np.all(np.isfinite(field)):
        raise ValueError("the displacement field has non-finite values")
    vectors = grid.apply_to(sitk.GetImageFromArray(_field_to_world(field, grid), isVector=True))
    return sitk.DisplacementFieldTransform(vectors)


def transform_grid(transform: sitk.DisplacementFieldTransform) -> Grid:
    """The grid a displacement field transform is defined on (for a registration: the fixed grid)."""
    return Grid.from_sitk(transform.GetDisplacementField())


def write_displacement_field(
    field: np.ndarray | sitk.DisplacementFieldTransform, reference: Image | Grid | None, path: str | os.PathLike, *,
    overwrite: bool = True,
) -> None:
    """Write a displacement field in physical units on the reference image's grid, atomically.

    Args:
        field: displacement in voxels of ``reference``'s grid ``(ndim, *S)`` (see
            :func:`displacement_transform`), or the transform itself (``reference`` is then None).
        reference: the fixed image (or its grid); the file gets its spacing, origin and direction.
        path: ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd`` for a float64 vector image of the
            world displacements (mm), or ``.h5``/``.hdf5`` for an ITK ``DisplacementFieldTransform``.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in FIELD_TRANSFORM_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported extension for a displacement field; expected one of "
            f"{', '.join(IMAGE_SUFFIXES + FIELD_TRANSFORM_SUFFIXES)}"
        )
    try:
        transform = field if isinstance(field, sitk.DisplacementFieldTransform) else displacement_transform(field, reference)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if suffix in FIELD_TRANSFORM_SUFFIXES:
        write_atomically(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)), overwrite)
    else:
        vectors = transform.GetDisplacementField()
        write_atomically(path, lambda tmp: sitk.WriteImage(vectors, str(tmp), True), overwrite)


def read_displacement_transform(path: str | os.PathLike) -> sitk.DisplacementFieldTransform:
    """Read a displacement field file (``.h5``/``.hdf5`` ITK transform, or a vector image) as a transform.

    Raises:
        ImageReadError: the file is missing, unreadable, or not a displacement field transform.
        InvalidImageError: a vector image without one component per dimension.
    """
    path = Path(path)
    _check_readable(path, IMAGE_SUFFIXES + FIELD_TRANSFORM_SUFFIXES)
    if _suffix(path) in FIELD_TRANSFORM_SUFFIXES:
        try:
            transform = sitk.ReadTransform(str(path))
        except RuntimeError as error:
            raise ImageReadError(f"{path}: cannot be read as an ITK transform ({_itk_reason(error, path)})") from error
        if transform.GetName() != "DisplacementFieldTransform":
            raise ImageReadError(f"{path}: holds a {transform.GetName()}, not a displacement field transform")
        return sitk.DisplacementFieldTransform(transform)
    vectors = _read_sitk(path)
    if vectors.GetNumberOfComponentsPerPixel() != vectors.GetDimension():
        raise InvalidImageError(
            f"{path}: has {vectors.GetNumberOfComponentsPerPixel()} components per voxel; "
            f"a {vectors.GetDimension()}D displacement field needs {vectors.GetDimension()}"
        )
    return sitk.DisplacementFieldTransform(sitk.Cast(vectors, sitk.sitkVectorFloat64))


def read_displacement_field(path: str | os.PathLike, reference: Image | Grid) -> np.ndarray:
    """Read a displacement field written by `write_displacement_field` (or by ITK tools).

    The field (vector image in mm, or an ITK transform file) is evaluated on ``reference``'s
    grid with ``sitk.TransformToDisplacementField``, so a field stored on another grid is
    linearly interpolated (and is zero outside its own domain).

    Returns:
        float64 displacement in voxels of ``reference``, shape ``(ndim, *S)``.
    """
    transform = read_displacement_transform(path)
    grid = _grid_of(reference)
    if transform.GetDimension() != grid.ndim:
        raise InvalidImageError(f"{path}: is a {transform.GetDimension()}D transform, the reference is {grid.ndim}D")
    world = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        list(reversed(grid.shape)),
        grid.origin,
        grid.spacing,
        grid.direction,
    )
    return _world_to_field(sitk.GetArrayFromImage(world), grid)
