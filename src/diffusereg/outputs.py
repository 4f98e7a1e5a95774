"""Writing a registration's files: every one atomically, ``metrics.json`` last, nothing partial.

Every file overlays the fixed image exactly (its shape, spacing, origin and direction):

- ``warped.nii.gz``: the moving image warped onto the fixed image (float32);
- ``warped_labels.nii.gz``: the moving labels warped (nearest neighbour), when given;
- ``field.h5``: the displacement as an ITK ``DisplacementFieldTransform`` (HDF5);
- ``field.nii.gz``: the same displacement as a vector image (mm, ITK ``x, y, z`` components);
- ``jacobian.nii.gz``: det of the Jacobian of ``x -> x + u(x)``, central differences (so it has
  the fixed grid's shape);
- ``sample_spread.nii.gz``: per voxel, the length (mm) of the vector of the field's per-axis
  standard deviations over samples (``DiffuseRegPipelineOutput.sample_spread``, voxels), when N > 1;
- ``trajectory.png``, ``trajectory.gif``: the sampling steps, when asked;
- ``metrics.json``: written last; a folder holding it holds a finished registration.

While a registration runs, it holds ``.diffusereg.lock`` in the folder (:func:`output_lock`): a
second registration into the same folder refuses to start, so a folder never mixes the files of
two registrations. The lock is an advisory ``flock``: the system releases it when its process
ends, even killed, and the file is removed when the registration ends.

The outputs of an earlier registration in the folder are removed (``metrics.json`` first) before
the new ones are written, and a write that fails or is interrupted removes what it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from diffusereg.data import resample_to_grid
from diffusereg.io import Grid, Image, write_atomically, write_displacement_field, write_image
from diffusereg.metrics import jacobian_std, ncc, njd_percent, structure_dice, structure_labels
from diffusereg.spatial import jacobian_determinant
from diffusereg.visualize import TrajectorySlice, save_trajectory_gif, save_trajectory_strip

__all__ = ["LOCK_NAME", "OUTPUT_NAMES", "OutputFolderBusyError", "is_complete", "length_mm", "output_lock",
           "registration_metrics", "write_registration"]

LOCK_NAME = ".diffusereg.lock"
"""The file a running registration holds locked in its output folder."""


class OutputFolderBusyError(ValueError):
    """Another registration is writing into the output folder."""

OUTPUT_NAMES: dict[str, str] = {
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "field_transform": "field.h5",
    "field_image": "field.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "sample_spread": "sample_spread.nii.gz",
    "trajectory_png": "trajectory.png",
    "trajectory_gif": "trajectory.gif",
    "metrics": "metrics.json",
}
"""File name of every output in the output folder."""


def is_complete(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a finished registration (its ``metrics.json``, written last)."""
    return (Path(output_dir) / OUTPUT_NAMES["metrics"]).is_file()


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the folder's lock (``LOCK_NAME``, created with the folder if needed) for the block.

    Raises:
        OutputFolderBusyError: another process (or another registration in this one) holds it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            owner = path.read_text().strip() if path.is_file() else "?"
            raise OutputFolderBusyError(
                f"{output_dir}: another registration (process {owner or '?'}) is writing into this folder; wait for "
                "it to end or choose another output folder") from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our lock
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting process sees a new file
        os.close(descriptor)


def _remove_outputs(output_dir: Path) -> None:
    """Delete every output of a registration from ``output_dir``, ``metrics.json`` first (from
    then on the folder is unfinished)."""
    metrics = OUTPUT_NAMES["metrics"]
    for name in (metrics, *(name for name in OUTPUT_NAMES.values() if name != metrics)):
        (output_dir / name).unlink(missing_ok=True)


def length_mm(field: np.ndarray, grid: Grid) -> np.ndarray:
    """Per-voxel length (mm) of a ``(ndim, *S)`` field given in voxels of ``grid``."""
    spacing = np.asarray(grid.axis_spacing, dtype=np.float32).reshape(-1, *([1] * grid.ndim))
    return np.sqrt(((field * spacing) ** 2).sum(axis=0)).astype(np.float32)


def registration_metrics(field: np.ndarray, warped: np.ndarray, warped_labels: np.ndarray | None, fixed: Image,
                         moving: Image, fixed_labels: Image | None, moving_labels: Image | None,
                         sample_spread: np.ndarray | None = None) -> dict[str, Any]:
    """What ``metrics.json`` reports of a registration on the fixed grid: the image similarity
    ``NCC_before`` and ``NCC_after`` (:func:`~diffusereg.metrics.ncc` of the fixed image with the
    moving image resampled onto its grid as it is, then with ``warped``), Dice before and after
    per structure (with both label maps; the moving labels resampled onto the fixed grid as they
    are, then ``warped_labels``), NJD % and JSD (forward differences, as the paper's evaluation),
    the largest displacement (mm) and, with several samples, ``sample_spread_mm``: the mean
    spread length (mm, as ``sample_spread.nii.gz``) over the image and, with fixed labels,
    inside each structure of the fixed labels (ACDC names, else ``label_K``).

    Args:
        field: ``(ndim, *S)`` voxels of ``fixed``'s grid.
        warped: ``(*S)`` the moving image warped onto it.
        warped_labels: the moving labels warped onto it, or None.
        fixed, moving, fixed_labels, moving_labels: the inputs (label maps may be None).
        sample_spread: ``(ndim, *S)`` per-axis std of the field over samples, voxels, or None.
    """
    metrics: dict[str, Any] = {"NCC_before": ncc(fixed.array, resample_to_grid(moving, fixed.grid, "linear")),
                               "NCC_after": ncc(fixed.array, warped)}
    reference = None if fixed_labels is None else resample_to_grid(fixed_labels, fixed.grid, "nearest")
    if reference is not None and moving_labels is not None:
        metrics["dice_before"] = structure_dice(resample_to_grid(moving_labels, fixed.grid, "nearest"), reference)
        metrics["dice_after"] = structure_dice(warped_labels, reference)
    metrics.update(NJD_percent=njd_percent(field), JSD=jacobian_std(field),
                   max_displacement_mm=float(length_mm(field, fixed.grid).max()))
    if sample_spread is not None:
        length = length_mm(sample_spread, fixed.grid)
        metrics["sample_spread_mm"] = {"image": float(length.mean())}
        if reference is not None:
            for name, values in structure_labels(reference).items():
                inside = np.isin(reference, values)
                if inside.any():
                    metrics["sample_spread_mm"][name] = float(length[inside].mean())
    return metrics


def write_registration(
    output_dir: str | os.PathLike,
    grid: Grid,
    transform: sitk.DisplacementFieldTransform,
    field: np.ndarray,
    warped: np.ndarray,
    metrics: dict[str, Any],
    warped_labels: np.ndarray | None = None,
    sample_spread: np.ndarray | None = None,
    trajectory: TrajectorySlice | None = None,
) -> dict[str, Any]:
    """Write one registration's files into ``output_dir`` (see the module docstring).

    Args:
        output_dir: the folder (created if needed).
        grid: the fixed image's grid.
        transform: ``field`` as an ITK transform (:func:`diffusereg.io.displacement_transform`),
            the one the warped outputs were resampled with.
        field: ``(ndim, *S)`` displacement, voxels of ``grid``.
        warped: ``(*S)`` the warped moving image.
        metrics: what ``metrics.json`` holds besides the list of outputs.
        warped_labels: ``(*S)`` the warped moving labels (their own dtype), or None.
        sample_spread: ``(ndim, *S)`` per-axis std of the field over samples, voxels, or None.
        trajectory: the slice of the sampling trajectory to draw, or None.

    Returns:
        ``metrics`` with ``outputs``: the names of the files written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(output_dir)
    written: list[str] = []

    def save(name: str, array: np.ndarray) -> None:
        write_image(Image.on_grid(array, grid), output_dir / OUTPUT_NAMES[name])
        written.append(OUTPUT_NAMES[name])

    try:
        save("warped", warped.astype(np.float32))
        if warped_labels is not None:
            save("warped_labels", warped_labels)
        for name in ("field_transform", "field_image"):
            write_displacement_field(transform, None, output_dir / OUTPUT_NAMES[name])
            written.append(OUTPUT_NAMES[name])
        as_tensor = torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None]
        save("jacobian", jacobian_determinant(as_tensor, method="central")[0].numpy())
        if sample_spread is not None:
            save("sample_spread", length_mm(sample_spread, grid))
        if trajectory is not None:
            save_trajectory_strip(trajectory, output_dir / OUTPUT_NAMES["trajectory_png"])
            save_trajectory_gif(trajectory, output_dir / OUTPUT_NAMES["trajectory_gif"])
            written += [OUTPUT_NAMES["trajectory_png"], OUTPUT_NAMES["trajectory_gif"]]
        metrics = {**metrics, "outputs": [*written, OUTPUT_NAMES["metrics"]]}
        text = json.dumps(metrics, indent=2) + "\n"
        write_atomically(output_dir / OUTPUT_NAMES["metrics"], lambda temporary: temporary.write_text(text))
    except BaseException:  # KeyboardInterrupt included: no output of an unfinished registration stays
        _remove_outputs(output_dir)
        raise
    return metrics
