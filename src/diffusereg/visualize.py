"""Pictures of a sampling trajectory: how the field and the warped image evolve over the steps.

Like Fig. 3 of the DiffuseReg paper, every step shows the warped moving image with the deformed
grid drawn over it (and the fixed image's label contours, when known) and the displacement
magnitude in mm. :func:`trajectory_slice` cuts one 2D slice out of the steps a
:class:`~diffusereg.callbacks.TrajectoryRecorder` kept; :func:`save_trajectory_strip` draws a PNG strip of selected
steps and :func:`save_trajectory_gif` an animation with one frame per recorded step. Files are
written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image as PILImage

from diffusereg.io import write_atomically
from diffusereg.metrics import ACDC_LABELS

if TYPE_CHECKING:
    from diffusereg.callbacks import TrajectoryRecorder
    from diffusereg.data.preprocessing import ModelGrid
    from diffusereg.pipelines.layout import ModelGridBatch

__all__ = ["LABEL_COLOURS", "TrajectorySlice", "shown_slice", "trajectory_picture", "save_trajectory_gif", "save_trajectory_strip", "trajectory_slice"]

_GRID_LINES = 12  # deformed grid: about this many lines per image side
#: Contour colour of each ACDC structure (Okabe-Ito colours, told apart with colour-blindness too).
LABEL_COLOURS = {"RV": "#CC79A7", "Myo": "#009E73", "LV": "#E69F00"}


@dataclass(frozen=True)
class TrajectorySlice:
    """One 2D slice of a sampling trajectory, on the model grid.

    Attributes:
        steps: the recorded step indices (0-based), length ``T``.
        num_steps: how many steps the sampling was asked to run (for titles).
        warped: ``(T, H, W)`` moving image warped by each step's clean-field estimate, in [0, 1].
        field: ``(T, 2, H, W)`` in-plane displacement, voxels, channels along rows and columns.
        magnitude_mm: ``(T, H, W)`` length of the whole displacement vector, mm.
        fixed, moving: ``(H, W)`` the images being registered, or None.
        fixed_labels: ``(H, W)`` integer labels of the fixed image (contours are drawn), or None.
    """

    steps: list[int]
    num_steps: int
    warped: np.ndarray
    field: np.ndarray
    magnitude_mm: np.ndarray
    fixed: np.ndarray | None = None
    moving: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None


def shown_slice(grid: ModelGrid, fixed_labels: np.ndarray | None) -> int:
    """The model-grid slice (index along ``D``) worth showing: the one with the most fixed-label
    voxels, else the middle of the image data; 0 for 2D images.

    Args:
        grid: the model grid of the registration.
        fixed_labels: the fixed labels on the model grid ``(D, H, W)``, or None.
    """
    if grid.model.ndim == 2:
        return 0
    if fixed_labels is not None and np.any(fixed_labels > 0):
        return int(np.argmax((fixed_labels > 0).sum(axis=(1, 2))))
    region = grid.data_region[0]
    return (region.start + region.stop - 1) // 2


def trajectory_slice(recorder: TrajectoryRecorder, axis_spacing: Sequence[float], num_steps: int, slice_index: int = 0,
                     fixed: np.ndarray | None = None, moving: np.ndarray | None = None,
                     fixed_labels: np.ndarray | None = None) -> TrajectorySlice:
    """Cut one slice of the first sample out of the steps a :class:`~diffusereg.callbacks.TrajectoryRecorder`
    kept during one pipeline call on one pair.

    Args:
        recorder: holds ``fields`` ``(num_samples, ndim, *S)`` (voxels) and ``warped``
            ``(num_samples, *S)`` per recorded step, on the model grid (a volume's field is
            ``(3, D, H, W)``, whether a 2D model registered it slice by slice or a 3D model whole).
        axis_spacing: model grid voxel size, mm, array-axis order (``(D, H, W)`` or ``(H, W)``).
        num_steps: the number of sampling steps asked for.
        slice_index: index along ``D`` for volumes.
        fixed, moving, fixed_labels: the same slice of the model-grid inputs, for display.
    """
    fields = torch.stack(recorder.fields)[:, 0].numpy().astype(np.float32)  # (T, ndim, *S)
    warped = torch.stack(recorder.warped)[:, 0].numpy().astype(np.float32)  # (T, *S)
    ndim = fields.shape[1]
    if fields.ndim != ndim + 2:
        raise ValueError(f"a trajectory of one pair has fields (ndim, *S), got {fields.shape[1:]}")
    if ndim == 3:
        fields, warped = fields[:, :, slice_index], warped[:, slice_index]
    spacing = np.asarray(axis_spacing[-ndim:], dtype=np.float32).reshape(1, ndim, 1, 1)
    magnitude = np.sqrt(((fields * spacing) ** 2).sum(axis=1))
    return TrajectorySlice(list(recorder.steps), num_steps, warped, fields[:, -2:], magnitude, fixed, moving,
                           fixed_labels)


def trajectory_picture(recorder: TrajectoryRecorder, batch: ModelGridBatch, fixed_labels: np.ndarray | None,
                       num_steps: int) -> TrajectorySlice:
    """The slice worth showing (:func:`shown_slice`) of the steps recorded during one registration
    of images with geometry, with the model-grid images of ``batch`` and the model-grid
    ``fixed_labels`` (or None) for display."""
    grid = batch.images.grid
    index = shown_slice(grid, fixed_labels)
    images = [batch.to_output(x, is_field=False).numpy() for x in (batch.fixed, batch.moving)]
    shown = [None if x is None else (x if x.ndim == 2 else x[index]) for x in (*images, fixed_labels)]
    return trajectory_slice(recorder, grid.model.axis_spacing, num_steps, index, *shown)


def _show_image(ax: Axes, image: np.ndarray, title: str, labels: np.ndarray | None) -> None:
    """Grey-scale image with the label contours of the fixed image, no ticks."""
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if labels is not None:
        for name, colour in LABEL_COLOURS.items():
            if np.any(labels == ACDC_LABELS[name]):
                ax.contour(labels == ACDC_LABELS[name], levels=[0.5], colors=colour, linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _legend_handles(labels: np.ndarray | None) -> list[Line2D]:
    """One legend entry per fixed-label contour drawn (none without labels), plus the deformed grid."""
    handles = [Line2D([], [], color="yellow", linewidth=1.0, label="deformed grid")]
    if labels is not None:
        handles += [Line2D([], [], color=colour, linewidth=1.5, label=f"{name} (fixed)")
                    for name, colour in LABEL_COLOURS.items() if np.any(labels == ACDC_LABELS[name])]
    return handles


def _draw_deformed_grid(ax: Axes, field: np.ndarray) -> None:
    """The regular grid of the moving image as it appears after warping.

    The warp pulls: the warped image at ``x`` shows the moving image at ``x + u(x)``. A line of
    the moving image's grid at row ``r`` therefore appears where ``x_row + u_row(x) = r``: the
    level sets of the two sampling coordinates are the deformed grid.
    """
    height, width = field.shape[-2:]
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    every = max(2, round(max(height, width) / _GRID_LINES))
    style = dict(colors="yellow", linewidths=0.4, alpha=0.6)
    ax.contour(rows + field[0], levels=np.arange(every / 2, height, every), **style)
    ax.contour(cols + field[1], levels=np.arange(every / 2, width, every), **style)


def _draw_step(ax_warped: Axes, ax_magnitude: Axes, trajectory: TrajectorySlice, index: int, vmax: float) -> Any:
    """Step ``index`` of the trajectory in two panels; returns the magnitude image (for a colour bar)."""
    step = trajectory.steps[index]
    _show_image(ax_warped, trajectory.warped[index], f"step {step + 1}/{trajectory.num_steps}", trajectory.fixed_labels)
    _draw_deformed_grid(ax_warped, trajectory.field[index])
    shown = ax_magnitude.imshow(trajectory.magnitude_mm[index], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax_magnitude.set_title("|u| (mm)", fontsize=9)
    ax_magnitude.set_axis_off()
    return shown


def _magnitude_range(trajectory: TrajectorySlice) -> float:
    """A colour range shared by all steps: the 99th percentile of |u| over the trajectory (mm)."""
    return max(float(np.percentile(trajectory.magnitude_mm, 99)), 1e-3)


def _selected_steps(count: int, max_columns: int) -> list[int]:
    """At most ``max_columns`` evenly spread indices of ``range(count)``, always with the last one."""
    if count <= max_columns:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, max_columns)})


def save_trajectory_strip(trajectory: TrajectorySlice, path: str | os.PathLike, max_columns: int = 8) -> int:
    """Draw selected steps side by side and save a PNG.

    Top row: the moving image, then the warped image of each shown step with the deformed grid
    (yellow) and the fixed labels' contours (colours of :data:`LABEL_COLOURS`, named in a legend).
    Bottom row: the fixed image, then the displacement magnitude in mm (one colour scale for all
    steps).

    Args:
        trajectory: from :func:`trajectory_slice`.
        path: the ``.png`` file to write.
        max_columns: most steps shown; evenly spread over the trajectory, the last always included.

    Returns:
        The number of step columns drawn.
    """
    shown = _selected_steps(len(trajectory.steps), max_columns)
    columns = len(shown) + 1
    figure = Figure(figsize=(1.9 * columns + 0.6, 4.2))
    axes = figure.subplots(2, columns, squeeze=False, gridspec_kw={"wspace": 0.04, "hspace": 0.12})
    for ax, image, name in ((axes[0, 0], trajectory.moving, "moving"), (axes[1, 0], trajectory.fixed, "fixed")):
        if image is None:
            ax.set_axis_off()
        else:
            _show_image(ax, image, name, trajectory.fixed_labels)
    vmax = _magnitude_range(trajectory)
    for column, index in enumerate(shown, start=1):
        magnitude = _draw_step(axes[0, column], axes[1, column], trajectory, index, vmax)
    figure.colorbar(magnitude, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="mm")
    handles = _legend_handles(trajectory.fixed_labels)
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 1.02))
    write_atomically(Path(path), lambda temporary: figure.savefig(temporary, format="png", dpi=110,
                                                                   bbox_inches="tight"), overwrite=True)
    return len(shown)


def save_trajectory_gif(trajectory: TrajectorySlice, path: str | os.PathLike, frame_ms: int = 400) -> int:
    """Save an animated GIF with one frame per recorded step (warped image + grid, |u| in mm).

    The last frame is held three times longer. Returns the number of frames.
    """
    vmax = _magnitude_range(trajectory)
    frames = []
    for index in range(len(trajectory.steps)):
        figure = Figure(figsize=(5.6, 2.9), layout="tight")
        ax_warped, ax_magnitude = figure.subplots(1, 2)
        magnitude = _draw_step(ax_warped, ax_magnitude, trajectory, index, vmax)
        figure.colorbar(magnitude, ax=ax_magnitude, fraction=0.046, pad=0.02)
        handles = _legend_handles(trajectory.fixed_labels)
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        frames.append(PILImage.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]))
    durations = [frame_ms] * (len(frames) - 1) + [3 * frame_ms]
    write_atomically(Path(path), lambda temporary: frames[0].save(
        temporary, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0), overwrite=True)
    return len(frames)
