"""Pictures of one registration step: one slice of the model grid, drawn as PNG images.

Each picture is an RGB image of one ``(H, W)`` slice, enlarged by a whole factor to about
:data:`DISPLAY_PIXELS` pixels (nearest neighbour, so voxels stay visible):

- ``fixed``, ``moving``: the inputs on the model grid (grey, intensities in ``[0, 1]``);
- ``warped``: the moving image warped by the current field, with the deformed grid (yellow): the
  lines of the moving image's regular grid where the warp has carried them;
- ``difference``: ``fixed - warped`` (red where the fixed image is brighter, blue where darker,
  saturated at +-0.5);
- ``jacobian``: the Jacobian determinant (blue < 1 < red, saturated at 0 and 2; folds, det <= 0,
  in green);
- ``sample_spread``: the length (mm) of the field's standard deviation over samples (magma, from 0
  to a given maximum).
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

__all__ = ["DISPLAY_PIXELS", "deformed_grid", "display_factor", "slice_pictures"]

DISPLAY_PIXELS = 256
"""About how many pixels the larger side of a picture has."""

GRID_LINES = 16
"""Lines of the deformed grid across the larger side of the image."""

_GRID_COLOUR = np.array([255, 214, 0], dtype=np.uint8)
_FOLD_COLOUR = np.array([40, 220, 40], dtype=np.uint8)
_DIFFERENCE_RANGE = 0.5
_JACOBIAN_RANGE = (0.0, 2.0)


def display_factor(shape: tuple[int, ...]) -> int:
    """The whole enlargement factor that brings the larger side of ``shape`` to at least
    :data:`DISPLAY_PIXELS` pixels (1 for images already that large)."""
    return max(1, math.ceil(DISPLAY_PIXELS / max(shape)))


def _enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H * factor, W * factor, 3)``, nearest neighbour."""
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def _coloured(values: np.ndarray, colormap: str, low: float, high: float) -> np.ndarray:
    """``(H, W)`` values -> ``(H, W, 3)`` uint8 through a matplotlib colormap on ``[low, high]``."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    return matplotlib.colormaps[colormap](scaled, bytes=True)[..., :3]


def _grey(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` intensities in ``[0, 1]`` -> ``(H, W, 3)`` uint8 grey."""
    grey = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def deformed_grid(field: np.ndarray, factor: int, every: float) -> np.ndarray:
    """Where the moving image's grid lines lie in the warped image, on the enlarged picture.

    The warp pulls: the warped image at ``x`` shows the moving image at ``x + u(x)``, so the grid
    line at coordinate ``c`` of an axis appears where that axis's sampling coordinate
    ``x_axis + u_axis(x)`` crosses ``c``. A pixel is on a line when its sampling coordinate and a
    neighbour's fall in different multiples of ``every`` voxels (lines at ``every * k``).

    Args:
        field: ``(2, H, W)`` in-plane displacement, voxels (rows, columns).
        factor: enlargement factor of the picture; the field is interpolated bilinearly to it.
        every: grid spacing, voxels.

    Returns:
        Boolean mask ``(H * factor, W * factor)``.
    """
    enlarged = F.interpolate(torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None],
                             scale_factor=factor, mode="bilinear", align_corners=False)[0].numpy()
    height, width = enlarged.shape[1:]
    rows = ((np.arange(height) + 0.5) / factor - 0.5)[:, None] + enlarged[0]
    cols = ((np.arange(width) + 0.5) / factor - 0.5)[None, :] + enlarged[1]
    mask = np.zeros((height, width), dtype=bool)
    for coordinate in (rows, cols):
        band = np.floor(coordinate / every)
        mask[:-1] |= band[:-1] != band[1:]
        mask[:, :-1] |= band[:, :-1] != band[:, 1:]
    return mask


def slice_pictures(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, field: np.ndarray,
                   jacobian: np.ndarray, sample_spread: np.ndarray | None = None,
                   sample_spread_max: float = 1.0) -> dict[str, bytes]:
    """The PNG pictures of one slice (see the module docstring).

    Args:
        fixed, moving, warped: ``(H, W)`` intensities in ``[0, 1]``.
        field: ``(2, H, W)`` in-plane displacement, voxels.
        jacobian: ``(H, W)`` Jacobian determinant.
        sample_spread: ``(H, W)`` length of the field's std over samples, mm, or None (no picture).
        sample_spread_max: the value (mm) drawn brightest in the spread picture.

    Returns:
        PNG bytes by picture name: ``fixed``, ``moving``, ``warped``, ``difference``,
        ``jacobian`` and, with ``sample_spread``, ``sample_spread``.
    """
    factor = display_factor(fixed.shape)
    warped_rgb = _enlarge(_grey(warped), factor)
    warped_rgb[deformed_grid(field, factor, max(2.0, max(fixed.shape) / GRID_LINES))] = _GRID_COLOUR
    jacobian_rgb = _coloured(jacobian, "coolwarm", *_JACOBIAN_RANGE)
    jacobian_rgb[jacobian <= 0] = _FOLD_COLOUR
    pictures = {
        "fixed": _enlarge(_grey(fixed), factor),
        "moving": _enlarge(_grey(moving), factor),
        "warped": warped_rgb,
        "difference": _enlarge(_coloured(fixed - warped, "RdBu_r", -_DIFFERENCE_RANGE, _DIFFERENCE_RANGE), factor),
        "jacobian": _enlarge(jacobian_rgb, factor),
    }
    if sample_spread is not None:
        pictures["sample_spread"] = _enlarge(_coloured(sample_spread, "magma", 0.0, sample_spread_max), factor)
    return {name: _png(rgb) for name, rgb in pictures.items()}
