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

The LV is known in closed form (:class:`LVMotion`): per slice, concentric circles for the cavity
and the epicardium at both phases, their volumes and ejection fraction, and an in-plane motion
between the phases (the myocardial annulus mapped with a uniform area change, the
cavity and the outside smoothly joined to it) whose field and median radial and circumferential
strain per slice are exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from diffusereg.data import PairFiles
from diffusereg.io import Grid, Image, write_image
from diffusereg.metrics import MYOCARDIAL_DENSITY

__all__ = ["CardiacPhantom", "LVMotion", "cardiac_phantom", "write_phantom"]

# Intensities of the tissue classes (arbitrary MR units, about ACDC's range).
_BLOOD, _MYOCARDIUM, _TISSUE, _LUNG, _AIR = 900.0, 150.0, 330.0, 40.0, 0.0
_NOISE_SIGMA = 25.0  # Rician noise level, same units
_BLUR_MM = 1.2  # partial-volume blur of the in-plane edges, mm (Gaussian sigma)


def _median_stretches(a: np.ndarray, b: np.ndarray, a_es: np.ndarray, b_es: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Median radial and circumferential stretch over the annuli ``a <= R <= b`` (ED radii, mm)
    mapped to ``a_es <= r <= b_es`` by ``r^2 = a_es^2 + J (R^2 - a^2)``, ``J`` the area ratio.

    Both stretches are monotonic in ``R`` (circumferential ``r / R``, radial ``dr / dR = J R / r``),
    so their medians over the annulus area are their values at the radius that halves the area,
    ``R^2 = (a^2 + b^2) / 2``, which goes to ``r^2 = (a_es^2 + b_es^2) / 2`` (the same in either
    phase, as the area changes uniformly).
    """
    area_ratio = (b_es**2 - a_es**2) / (b**2 - a**2)
    circumferential = np.sqrt((a_es**2 + b_es**2) / (a**2 + b**2))
    return area_ratio / circumferential, circumferential


@dataclass(frozen=True)
class LVMotion:
    """The phantom's LV in closed form, per short-axis slice ``(D,)``.

    The cavity is the disc of radius ``*_cavity`` and the myocardium the annulus out to
    ``*_outer`` (mm, 0 where absent) around ``*_centre`` (row, column in mm from the grid's centre),
    at ED and ES. The in-plane map from ED to ES, per slice, around the centres: a point at radius
    ``R`` outside the cavity goes to ``r = sqrt(es_cavity^2 + J (R^2 - ed_cavity^2))`` (``J`` the
    slice's ratio of myocardial areas, 1 for an incompressible wall), which maps the ED
    myocardium onto the ES one; a cavity point to ``es_cavity (R / ed_cavity)^p``, ``p`` chosen so
    that both meet with the same slope (a field without kinks at the endocardium, whose finite
    differences are accurate). Slices where the LV is not a ring in both phases (the apex) do not move.

    Attributes:
        ed_cavity, ed_outer, es_cavity, es_outer: radii per slice, mm.
        ed_centre, es_centre: LV centre in each phase, mm.
        slice_mm: slice thickness, mm.
    """

    ed_cavity: np.ndarray
    ed_outer: np.ndarray
    es_cavity: np.ndarray
    es_outer: np.ndarray
    ed_centre: tuple[float, float]
    es_centre: tuple[float, float]
    slice_mm: float

    @property
    def is_ring(self) -> np.ndarray:
        """``(D,)`` booleans: slices where the LV is a ring (a cavity inside myocardium) in both
        phases, where the map is defined."""
        return ((self.ed_cavity > 0) & (self.es_cavity > 0) & (self.ed_outer > self.ed_cavity)
                & (self.es_outer > self.es_cavity))

    def volumes(self) -> dict[str, float]:
        """LV ``EDV`` and ``ESV`` (ml, discs per slice), ``EF`` (%) and ``mass`` (g, ED myocardium)."""
        edv, esv = (np.pi * (radius**2).sum() * self.slice_mm / 1000 for radius in (self.ed_cavity, self.es_cavity))
        wall_ml = np.pi * (self.ed_outer**2 - self.ed_cavity**2).sum() * self.slice_mm / 1000
        return {"EDV": edv, "ESV": esv, "EF": 100 * (edv - esv) / edv, "mass": MYOCARDIAL_DENSITY * wall_ml}

    def slice_strain(self) -> tuple[np.ndarray, np.ndarray]:
        """Median radial and circumferential Lagrangian engineering strain (%, ED reference) over
        the myocardium of every slice, ``(D,)`` each, NaN where :attr:`is_ring` is False."""
        wall = self.is_ring
        radial, circumferential = np.full(wall.shape, np.nan), np.full(wall.shape, np.nan)
        radial[wall], circumferential[wall] = _median_stretches(self.ed_cavity[wall], self.ed_outer[wall],
                                                             self.es_cavity[wall], self.es_outer[wall])
        return 100 * (radial - 1), 100 * (circumferential - 1)

    def global_strain(self, frame: str) -> tuple[float, float]:
        """Global radial and circumferential strain (%) on the myocardium of ``frame`` (``"ED"`` or
        ``"ES"``): the slices' medians weighted by their myocardial areas in it."""
        cavity, outer = (self.ed_cavity, self.ed_outer) if frame == "ED" else (self.es_cavity, self.es_outer)
        wall = self.is_ring
        weights = (outer**2 - cavity**2)[wall]
        return tuple(float((values[wall] * weights).sum() / weights.sum()) for values in self.slice_strain())

    def _exponent(self, index: int) -> float:
        """``p`` of the cavity's map ``R -> es_cavity (R / ed_cavity)^p``, which meets the wall's
        map with the same slope at the endocardium (so the field is smooth there)."""
        a, b, a_es, b_es = self.ed_cavity[index], self.ed_outer[index], self.es_cavity[index], self.es_outer[index]
        return (b_es**2 - a_es**2) / (b**2 - a**2) * a**2 / a_es**2

    def radius_to_es(self, radius: np.ndarray, index: int) -> np.ndarray:
        """ES radius (mm) of points at ED ``radius`` (mm) in slice ``index`` (see the class docstring)."""
        a, b, a_es, b_es = self.ed_cavity[index], self.ed_outer[index], self.es_cavity[index], self.es_outer[index]
        if not self.is_ring[index]:
            return radius
        area_ratio = (b_es**2 - a_es**2) / (b**2 - a**2)
        wall = np.sqrt(np.maximum(a_es**2 + area_ratio * (radius**2 - a**2), 0.0))
        return np.where(radius < a, a_es * (radius / a) ** self._exponent(index), wall)

    def radius_to_ed(self, radius: np.ndarray, index: int) -> np.ndarray:
        """ED radius (mm) of points at ES ``radius`` (mm) in slice ``index``: the inverse of
        :meth:`radius_to_es`."""
        a, b, a_es, b_es = self.ed_cavity[index], self.ed_outer[index], self.es_cavity[index], self.es_outer[index]
        if not self.is_ring[index]:
            return radius
        area_ratio = (b_es**2 - a_es**2) / (b**2 - a**2)
        wall = np.sqrt(np.maximum(a**2 + (radius**2 - a_es**2) / area_ratio, 0.0))
        return np.where(radius < a_es, a * (radius / a_es) ** (1 / self._exponent(index)), wall)

    def field(self, grid: Grid, fixed_frame: str) -> np.ndarray:
        """The exact in-plane field of the map ``(3, D, H, W)``, voxels of the phantom's ``grid``,
        zero across slices: with ``fixed_frame="ED"`` it takes ED points to ES (it warps ES onto
        ED), with ``"ES"`` ES points to ED."""
        if fixed_frame not in ("ED", "ES"):
            raise ValueError(f"fixed_frame must be 'ED' or 'ES', got {fixed_frame!r}")
        spacing = np.asarray(grid.axis_spacing, dtype=np.float64)
        depth, height, width = grid.shape
        rows = (np.arange(height) - (height - 1) / 2)[:, None] * spacing[1] + np.zeros((1, width))
        cols = (np.arange(width) - (width - 1) / 2)[None, :] * spacing[2] + np.zeros((height, 1))
        start, end = (self.ed_centre, self.es_centre) if fixed_frame == "ED" else (self.es_centre, self.ed_centre)
        to_other = self.radius_to_es if fixed_frame == "ED" else self.radius_to_ed
        dy, dx = rows - start[0], cols - start[1]
        radius = np.sqrt(dy**2 + dx**2)
        unit = np.stack([dy, dx]) / np.maximum(radius, 1e-9)
        field = np.zeros((3, *grid.shape))
        for index in range(depth):
            target = np.asarray(end)[:, None, None] + to_other(radius, index) * unit
            field[1:, index] = (target - np.stack([rows, cols])) / spacing[1:, None, None]
        return field.astype(np.float32)


@dataclass(frozen=True)
class CardiacPhantom:
    """The two phases of the phantom, all four images on one grid.

    Attributes:
        ed, es: float32 images ``(D, H, W)``, end-diastole (fixed) and end-systole (moving).
        ed_labels, es_labels: uint8 label maps on the same grid (0 bg, 1 RV, 2 Myo, 3 LV).
        lv: the LV's shape and motion in closed form.
    """

    ed: Image
    es: Image
    ed_labels: Image
    es_labels: Image
    lv: LVMotion


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

    def lv_radii(self, depth_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Radii (mm) of the LV cavity and epicardium at each depth (mm from the base): both
        taper to zero towards the apex, the epicardium one wall thickness further."""
        taper_cavity = np.sqrt(np.clip(1.0 - (depth_mm / self.length) ** 2, 0.0, None))
        taper_outer = np.sqrt(np.clip(1.0 - (depth_mm / (self.length + self.wall)) ** 2, 0.0, None))
        return self.lv_radius * taper_cavity, (self.lv_radius + self.wall) * taper_outer


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
    cavity_radius, outer_radius = shape.lv_radii(depth_mm)
    taper_rv = np.sqrt(np.clip(1.0 - (depth_mm / (0.7 * shape.length)) ** 2, 0.0, None))
    dy, dx = rows_mm - centre[0], cols_mm - centre[1]
    radius = np.sqrt(dy**2 + dx**2)[None]
    cavity = radius <= cavity_radius[:, None, None]
    epicardium = radius <= outer_radius[:, None, None]
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
        The :class:`CardiacPhantom`, with an oblique direction and a scanner-like origin, and its LV
        in closed form.
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
        lv=LVMotion(*diastole.lv_radii(depth_mm), *systole.lv_radii(depth_mm), centre_ed, centre_es, float(spacing[2])),
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
