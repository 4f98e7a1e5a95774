"""A two-phase cardiac cine-MR phantom: end-diastole (ED) and end-systole (ES) short-axis volumes.

The phantom stands in for an ACDC patient when no data is at hand (``diffusereg demo``): a stack
of short-axis slices with ACDC-like anisotropic voxels (1.4 x 1.4 x 10 mm), an oblique
orientation, and the ACDC labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity).

Anatomy, per slice (base at slice 0, apex towards the last slices):

- body: an ellipse of soft tissue with smooth random texture, two dark lungs, air outside;
- LV: a bright blood pool inside a darker myocardial ring; both shrink towards the apex, where the
  myocardium closes into a cap;
- RV: a bright crescent wrapped around the septal side of the LV, in the basal two thirds.

From ED to ES the LV cavity shrinks, the myocardium thickens (its cross-section area is kept, as
for an incompressible wall), the RV shrinks towards the septum and the heart shortens along its
long axis. The MR signal gets partial-volume blur and Rician noise, independently per phase.
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from diffusereg.data import PairFiles
from diffusereg.io import Grid, Image, write_image

__all__ = ["CardiacPhantom", "cardiac_phantom", "write_phantom"]

# Intensities of the tissue classes (arbitrary MR units, about ACDC's range).
_BLOOD, _MYOCARDIUM, _TISSUE, _LUNG, _AIR = 900.0, 150.0, 330.0, 40.0, 0.0
_NOISE_SIGMA = 25.0  # Rician noise level, same units
_BLUR_MM = 1.2  # partial-volume blur of the in-plane edges, mm (Gaussian sigma)


@dataclass(frozen=True)
class CardiacPhantom:
    """The two phases of the phantom, all four images on one grid.

    Attributes:
        ed, es: float32 images ``(D, H, W)``, end-diastole (fixed) and end-systole (moving).
        ed_labels, es_labels: uint8 label maps on the same grid (0 bg, 1 RV, 2 Myo, 3 LV).
    """

    ed: Image
    es: Image
    ed_labels: Image
    es_labels: Image


@dataclass(frozen=True)
class _HeartShape:
    """Radii (mm) of one cardiac phase at the basal slice, and its long-axis extent (mm)."""

    lv_radius: float
    wall: float
    rv_semi_axes: tuple[float, float]  # (across, along the septum)
    rv_offset: float  # RV centre to LV centre, mm, towards the patient's right (image left)
    length: float  # base-to-apex extent of the LV cavity

    def contracted(self, cavity_ratio: float, rv_ratio: float, shortening: float) -> _HeartShape:
        """The systolic shape: cavity radius times ``cavity_ratio``, wall thickened so that the
        myocardial area is kept, RV axes times ``rv_ratio``, length times ``shortening``."""
        outer = self.lv_radius + self.wall
        lv = self.lv_radius * cavity_ratio
        wall = float(np.sqrt(lv**2 + outer**2 - self.lv_radius**2)) - lv
        across, along = self.rv_semi_axes
        return _HeartShape(lv, wall, (across * rv_ratio, along * rv_ratio), self.rv_offset * (0.5 + 0.5 * rv_ratio),
                           self.length * shortening)


def _oblique_direction(angles_degrees: tuple[float, float, float]) -> tuple[float, ...]:
    """A rotation matrix (row-major, ITK order) from x-y-z Euler angles: short-axis views are oblique."""
    ax, ay, az = np.deg2rad(angles_degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).flatten())


def _labels(shape: _HeartShape, centre: tuple[float, float], rows_mm: np.ndarray, cols_mm: np.ndarray,
            depth_mm: np.ndarray) -> np.ndarray:
    """ACDC label map ``(D, H, W)`` of one phase; coordinates in mm, ``depth_mm`` from the base."""
    taper_cavity = np.sqrt(np.clip(1.0 - (depth_mm / shape.length) ** 2, 0.0, None))
    taper_outer = np.sqrt(np.clip(1.0 - (depth_mm / (shape.length + shape.wall)) ** 2, 0.0, None))
    taper_rv = np.sqrt(np.clip(1.0 - (depth_mm / (0.7 * shape.length)) ** 2, 0.0, None))
    dy, dx = rows_mm - centre[0], cols_mm - centre[1]
    radius = np.sqrt(dy**2 + dx**2)[None]
    cavity = radius <= (shape.lv_radius * taper_cavity)[:, None, None]
    epicardium = radius <= ((shape.lv_radius + shape.wall) * taper_outer)[:, None, None]
    across, along = shape.rv_semi_axes
    scale = taper_rv[:, None, None]
    rv_ellipse = ((dx[None] + shape.rv_offset * scale) / np.maximum(across * scale, 1e-6)) ** 2 + (
        dy[None] / np.maximum(along * scale, 1e-6)) ** 2 <= 1.0
    labels = np.zeros(cavity.shape, dtype=np.uint8)
    labels[rv_ellipse] = 1
    labels[epicardium] = 2
    labels[cavity] = 3
    return labels


def _signal(labels: np.ndarray, background: np.ndarray, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """MR magnitude ``(D, H, W)``: blood and myocardium over the textured background, in-plane
    partial-volume blur, Rician noise."""
    values = np.where(labels == 2, _MYOCARDIUM, np.where(labels > 0, _BLOOD, background))
    sigma = _BLUR_MM / pixel_mm
    clean = np.stack([gaussian_filter(s, sigma) for s in values])
    real = clean + rng.normal(0.0, _NOISE_SIGMA, clean.shape)
    imaginary = rng.normal(0.0, _NOISE_SIGMA, clean.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def cardiac_phantom(seed: int = 0, shape: tuple[int, int, int] = (8, 176, 176),
                    spacing: tuple[float, float, float] = (1.4, 1.4, 10.0)) -> CardiacPhantom:
    """Generate the ED/ES phantom pair (see the module docstring).

    Args:
        seed: drives the anatomy (radii, position within a few mm), the texture and the noise.
        shape: ``(D, H, W)``; the default covers 8 short-axis slices of a 246 mm field of view.
        spacing: voxel size, mm, ITK ``(x, y, z)`` order (ACDC-like: fine in-plane, 10 mm slices).

    Returns:
        The :class:`CardiacPhantom`, with an oblique direction and a scanner-like origin.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    pixel_mm = float(spacing[0])
    rows_mm = (np.arange(height) - (height - 1) / 2)[:, None] * float(spacing[1])
    cols_mm = (np.arange(width) - (width - 1) / 2)[None, :] * pixel_mm
    depth_mm = np.arange(depth) * float(spacing[2])

    jitter = rng.uniform(-1.0, 1.0, size=6)
    diastole = _HeartShape(lv_radius=24.0 + 2.0 * jitter[0], wall=8.0 + 1.0 * jitter[1], rv_semi_axes=(20.0, 40.0),
                           rv_offset=38.0 + 2.0 * jitter[2], length=0.8 * depth * float(spacing[2]))
    systole = diastole.contracted(cavity_ratio=0.68 + 0.04 * jitter[3], rv_ratio=0.75, shortening=0.9)
    centre_ed = (-6.0 + 3.0 * jitter[4], 10.0 + 3.0 * jitter[5])
    centre_es = (centre_ed[0] + 1.5, centre_ed[1] - 1.0)  # the heart moves a little in systole

    body = (rows_mm / 105.0) ** 2 + (cols_mm / 118.0) ** 2 <= 1.0
    lungs = ((rows_mm + 5.0) / 70.0) ** 2 + ((np.abs(cols_mm) - 62.0) / 38.0) ** 2 <= 1.0
    texture = gaussian_filter(rng.normal(0.0, 1.0, (height, width)), 4.0 / pixel_mm)
    texture *= 60.0 / max(float(texture.std()), 1e-6)
    slice_background = np.where(body, np.where(lungs, _LUNG, _TISSUE + texture), _AIR)
    background = np.broadcast_to(slice_background, shape)

    ed_labels = _labels(diastole, centre_ed, rows_mm, cols_mm, depth_mm)
    es_labels = _labels(systole, centre_es, rows_mm, cols_mm, depth_mm)
    grid = Grid(shape, spacing, origin=(-118.3, -152.6, 61.5), direction=_oblique_direction((-30.0, 25.0, 15.0)))
    return CardiacPhantom(
        ed=Image.on_grid(_signal(ed_labels, background, pixel_mm, rng), grid),
        es=Image.on_grid(_signal(es_labels, background, pixel_mm, rng), grid),
        ed_labels=Image.on_grid(ed_labels, grid),
        es_labels=Image.on_grid(es_labels, grid),
    )


def write_phantom(folder: str | os.PathLike, seed: int = 0, shape: tuple[int, int, int] = (8, 176, 176)) -> PairFiles:
    """Write :func:`cardiac_phantom` (``shape`` ``(D, H, W)``) into ``folder`` (created if needed)
    as the registration case ``fixed.nii.gz`` (ED), ``moving.nii.gz`` (ES), ``fixed_labels.nii.gz``
    and ``moving_labels.nii.gz``; returns their paths."""
    phantom = cardiac_phantom(seed=seed, shape=shape)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = PairFiles(*(folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")))
    for image, path in zip((phantom.ed, phantom.es, phantom.ed_labels, phantom.es_labels),
                           (files.fixed, files.moving, files.fixed_labels, files.moving_labels)):
        write_image(image, path)
    return files
