"""Radial and circumferential strain of the LV myocardium, from a displacement field between
end-diastole (ED) and end-systole (ES) of a short-axis stack.

Strain here is Lagrangian engineering strain with ED as the reference: a short piece of
myocardium of length ``L0`` at ED and ``L`` at ES has strain ``100 (L - L0) / L0`` percent
(radial: positive, the wall thickens; circumferential: negative, it shortens), the quantity cine-MRI
feature tracking reports.

The field ``u`` lies on the fixed image's grid ``(ndim, *S)`` (voxels, channel ``i`` along axis
``i``, :mod:`diffusereg.spatial`) and maps a fixed-frame point ``x`` to ``x + u(x)`` in the moving
frame. With ``G = I + grad u`` (mm per mm, central differences in-plane) and ``n`` a unit in-plane
direction at ``x``, a fibre along ``n`` is stretched by ``|G n|`` when the fixed frame is ED (the
reference) and by ``1 / |G n|`` when it is ES (``G`` then maps back to the reference).

Directions, per slice of the fixed frame's labels: radial points away from the centroid of the
LV (cavity and myocardium) in that slice, circumferential is radial turned by 90 degrees in-plane.
Per-slice strain is the median over that slice's myocardial voxels (robust to the few voxels where
a field nearly folds, whose strain is unbounded); global strain is the mean of the slices'
medians weighted by their myocardial voxel counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from diffusereg.metrics import ACDC_LABELS

__all__ = ["MyocardialStrain", "myocardial_strain"]

Reference = Literal["fixed", "moving"]


@dataclass(frozen=True)
class MyocardialStrain:
    """Radial and circumferential strain of the LV myocardium, percent.

    Attributes:
        radial, circumferential: global: the per-slice values averaged with the slices'
            myocardial voxel counts as weights.
        slice_radial, slice_circumferential: per slice ``(D,)`` of the fixed grid, median over the
            slice's myocardial voxels; NaN where a slice has none.
    """

    radial: float
    circumferential: float
    slice_radial: np.ndarray
    slice_circumferential: np.ndarray


def _stretch(gradient: np.ndarray, direction: np.ndarray, reference: Reference) -> np.ndarray:
    """Stretch of fibres along ``direction`` ``(2, N)`` (unit, in-plane, mm) given the in-plane
    columns of ``grad u`` at the same voxels, ``gradient`` ``(ndim, 2, N)`` (mm per mm)."""
    mapped = np.einsum("cah,ah->ch", gradient, direction)
    mapped[-2:] += direction
    length = np.sqrt((mapped**2).sum(axis=0))
    return length if reference == "fixed" else 1.0 / np.maximum(length, 1e-6)


def myocardial_strain(field: np.ndarray, labels: np.ndarray, axis_spacing: Sequence[float],
                      reference: Reference, myocardium: int = ACDC_LABELS["Myo"],
                      cavity: int = ACDC_LABELS["LV"]) -> MyocardialStrain:
    """Radial and circumferential strain of the LV myocardium (see the module docstring).

    Args:
        field: ``(3, D, H, W)`` displacement in voxels of the fixed grid, slices along ``D``.
        labels: ``(D, H, W)`` label map of the fixed frame (its myocardium and LV cavity).
        axis_spacing: voxel size of the fixed grid, mm, array-axis order.
        reference: which frame is ED, the strain's reference: ``"fixed"`` or ``"moving"``.
        myocardium, cavity: label values of the LV myocardium and the LV cavity.
    Returns:
        Global and per-slice strain, percent.
    """
    field, labels = np.asarray(field, dtype=np.float64), np.asarray(labels)
    if field.ndim != 4 or field.shape[0] != 3 or field.shape[1:] != labels.shape:
        raise ValueError(f"expected a field (3, D, H, W) and labels (D, H, W), got {field.shape} and {labels.shape}")
    if reference not in ("fixed", "moving"):
        raise ValueError(f"reference must be 'fixed' or 'moving', got {reference!r}")
    spacing = np.asarray(axis_spacing, dtype=np.float64)
    in_mm = field * spacing[:, None, None, None]
    # gradient[c, a] = d u_c / d x_a (mm per mm) along the two in-plane axes a
    gradient = np.stack([np.gradient(in_mm, axis=axis + 1) / spacing[axis] for axis in (1, 2)], axis=1)
    rows, cols = np.meshgrid(np.arange(labels.shape[1]) * spacing[1], np.arange(labels.shape[2]) * spacing[2],
                             indexing="ij")
    per_slice: dict[str, list[np.ndarray]] = {"radial": [], "circumferential": []}
    for index in range(labels.shape[0]):
        muscle = labels[index] == myocardium
        heart = muscle | (labels[index] == cavity)
        if not muscle.any():
            for values in per_slice.values():
                values.append(np.empty(0))
            continue
        offset = np.stack([rows[muscle] - rows[heart].mean(), cols[muscle] - cols[heart].mean()])
        radial = offset / np.maximum(np.sqrt((offset**2).sum(axis=0)), 1e-6)
        circumferential = np.stack([-radial[1], radial[0]])
        slice_gradient = gradient[:, :, index][:, :, muscle]
        per_slice["radial"].append(100.0 * (_stretch(slice_gradient, radial, reference) - 1.0))
        per_slice["circumferential"].append(100.0 * (_stretch(slice_gradient, circumferential, reference) - 1.0))

    counts = np.array([values.size for values in per_slice["radial"]])

    def slice_medians(values: list[np.ndarray]) -> np.ndarray:
        return np.array([np.median(v) if v.size else np.nan for v in values])

    def overall(medians: np.ndarray) -> float:
        return float((np.nan_to_num(medians) * counts).sum() / counts.sum()) if counts.sum() else float("nan")

    radial, circumferential = slice_medians(per_slice["radial"]), slice_medians(per_slice["circumferential"])
    return MyocardialStrain(overall(radial), overall(circumferential), radial, circumferential)
