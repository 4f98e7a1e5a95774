"""Evaluation metrics: Dice per ACDC structure, HD95, image similarity (NCC), Jacobian-based field
regularity, cardiac volumes (ml), ejection fraction and myocardial mass, and the inverse
consistency of two fields.

Every function evaluates one case and returns plain Python floats (or a flat ``dict`` of
them, one CSV row). Label maps are integer arrays or tensors of any matching shape; fields
are NumPy arrays or tensors ``(ndim, *S)`` or ``(1, ndim, *S)`` in voxels (see
:mod:`diffusereg.spatial`). Definitions and their match with the paper's evaluation code are
in ``docs/spatial_metrics.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy.stats import rankdata

from diffusereg.spatial import compose, jacobian_determinant, voxel_to_mm

__all__ = [
    "ACDC_LABELS",
    "ACDC_SCORES",
    "ACDC_STRUCTURES",
    "MYOCARDIAL_DENSITY",
    "acdc_case_metrics",
    "acdc_dice",
    "auroc",
    "dice",
    "ejection_fraction",
    "hd95",
    "inverse_consistency_mm",
    "jacobian_std",
    "label_volume_ml",
    "myocardial_mass_g",
    "ncc",
    "njd_percent",
    "sdlogj",
    "structure_dice",
    "structure_labels",
]

ArrayLike = np.ndarray | torch.Tensor
Labels = int | Sequence[int]

ACDC_LABELS: dict[str, int] = {"RV": 1, "Myo": 2, "LV": 3}
"""The label values of ACDC's label maps (0 is the background): the vocabulary every part of
diffusereg that names a cardiac structure uses."""

#: Label values of each evaluated structure, in the order of the paper's code: the three labels,
#: the LV epicardium (myocardium and cavity) and the whole heart (every foreground label).
ACDC_STRUCTURES: dict[str, tuple[int, ...]] = {
    "LV": (ACDC_LABELS["LV"],),
    "Myo": (ACDC_LABELS["Myo"],),
    "LVepi": (ACDC_LABELS["Myo"], ACDC_LABELS["LV"]),
    "RV": (ACDC_LABELS["RV"],),
    "Heart": tuple(sorted(ACDC_LABELS.values())),
}

ACDC_SCORES: tuple[str, ...] = (*ACDC_STRUCTURES, "Overall")
"""The Dice columns of an ACDC evaluation: each structure, then their mean (``Overall``)."""

MYOCARDIAL_DENSITY = 1.05
"""Density of the myocardium, g/ml: the LV mass is this times the myocardial volume."""

#: Clipping range of the determinant before the log in :func:`sdlogj` (Learn2Reg convention).
LOG_DET_CLIP = (1e-9, 1e9)


def _mask(labels: ArrayLike, label_or_labels: Labels) -> torch.Tensor:
    """Boolean mask of voxels whose label is one of ``label_or_labels``."""
    values = torch.as_tensor(labels)
    if not values.is_floating_point():
        values = values.long()  # isin lacks bool and unsigned 16/32/64-bit kernels
    wanted = torch.as_tensor(label_or_labels, dtype=values.dtype, device=values.device).flatten()
    return torch.isin(values, wanted)


def _mask_pair(pred: ArrayLike, ref: ArrayLike, label_or_labels: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    pred_mask, ref_mask = _mask(pred, label_or_labels), _mask(ref, label_or_labels)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"label maps differ in shape: {tuple(pred_mask.shape)} vs {tuple(ref_mask.shape)}")
    return pred_mask, ref_mask


def dice(pred: ArrayLike, ref: ArrayLike, label_or_labels: Labels) -> float:
    """Dice overlap ``2 |P & R| / (|P| + |R|)`` of one structure, in ``[0, 1]``.

    Args:
        pred, ref: label maps of the same shape.
        label_or_labels: label value, or several values merged into one structure.
    Returns:
        Dice; ``1.0`` when the structure is absent from both maps (never NaN).
    """
    pred_mask, ref_mask = _mask_pair(pred, ref, label_or_labels)
    total = int(pred_mask.sum()) + int(ref_mask.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred_mask & ref_mask).sum()) / total


def _check_acdc_labels(labels: ArrayLike) -> None:
    present = set(torch.unique(torch.as_tensor(labels)).tolist())
    if not present <= {0, *ACDC_LABELS.values()}:
        raise ValueError(f"ACDC label maps hold only 0..3, found {sorted(present)}")


def acdc_dice(pred_labels: ArrayLike, ref_labels: ArrayLike) -> dict[str, float]:
    """Dice of each ACDC structure and their mean.

    Args:
        pred_labels, ref_labels: ACDC label maps (values 0..3) of the same shape.
    Returns:
        ``{"LV", "Myo", "LVepi", "RV", "Heart", "Overall"}`` as fractions in ``[0, 1]``;
        ``Overall`` is the mean of the five structures (as in the paper's code).
    """
    _check_acdc_labels(pred_labels)
    _check_acdc_labels(ref_labels)
    scores = {name: dice(pred_labels, ref_labels, labels) for name, labels in ACDC_STRUCTURES.items()}
    scores["Overall"] = sum(scores.values()) / len(scores)
    return scores


def structure_labels(*label_maps: ArrayLike) -> dict[str, tuple[int, ...]]:
    """The structures of integer label maps and their label values: the ACDC structures
    (:data:`ACDC_STRUCTURES`) when the maps hold only the values 0..3, else one per label value
    present (``label_K``)."""
    values = set().union(*(torch.unique(torch.as_tensor(labels)).tolist() for labels in label_maps))
    if values <= {0, *ACDC_LABELS.values()}:
        return dict(ACDC_STRUCTURES)
    return {f"label_{int(value)}": (int(value),) for value in sorted(values - {0})}


def structure_dice(labels: ArrayLike, reference: ArrayLike) -> dict[str, float]:
    """Dice of ``labels`` against ``reference`` (integer maps of one shape) per structure of
    :func:`structure_labels` (with ``Overall``, their mean, for ACDC label maps)."""
    structures = structure_labels(labels, reference)
    if structures == ACDC_STRUCTURES:
        return acdc_dice(labels, reference)
    return {name: dice(labels, reference, values) for name, values in structures.items()}


def hd95(
    pred: ArrayLike,
    ref: ArrayLike,
    label_or_labels: Labels,
    spacing: float | Sequence[float] | None = None,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of one structure.

    Computed by :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``,
    Euclidean distance between boundary voxels).

    Args:
        pred, ref: label maps of the same shape.
        label_or_labels: label value(s) of the structure.
        spacing: voxel size in mm in array-axis order (``Image.axis_spacing``); ``None``
            measures in voxels.
    Returns:
        HD95 in mm (voxels without spacing); NaN when the structure is absent from either map.
    """
    pred_mask, ref_mask = _mask_pair(pred, ref, label_or_labels)
    if not pred_mask.any() or not ref_mask.any():
        return math.nan
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal get_mask_edges call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        distance = compute_hausdorff_distance(
            pred_mask[None, None], ref_mask[None, None], include_background=True, percentile=95, spacing=spacing
        )
    return float(distance)


def ncc(a: ArrayLike, b: ArrayLike) -> float:
    """Normalised cross-correlation (Pearson's r) of the voxel values of two arrays of one shape:
    1 for images that are a positive linear function of each other, near 0 for unrelated ones,
    0 when either is constant. Computed in float64."""
    x, y = (torch.as_tensor(np.asarray(v), dtype=torch.float64).flatten() for v in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"arrays differ in size: {tuple(np.shape(a))} vs {tuple(np.shape(b))}")
    x, y = x - x.mean(), y - y.mean()
    scale = math.sqrt(float(x.square().sum()) * float(y.square().sum()))
    return float(x.dot(y)) / scale if scale > 0.0 else 0.0


def _single_case_field(field: ArrayLike) -> torch.Tensor:
    """``(ndim, *S)`` or ``(1, ndim, *S)`` array/tensor -> float ``(1, ndim, *S)`` tensor."""
    tensor = torch.as_tensor(field)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim >= 3 and tensor.shape[0] == tensor.ndim - 1:
        tensor = tensor[None]
    if tensor.shape[0] != 1 or tensor.shape[1] != tensor.ndim - 2:
        raise ValueError(
            f"expected one field (ndim, *S) or (1, ndim, *S), got {tuple(tensor.shape)}; metrics are per case"
        )
    return tensor


def _determinant(field: ArrayLike, method: Literal["forward", "central"]) -> torch.Tensor:
    return jacobian_determinant(_single_case_field(field), method=method).flatten()


def njd_percent(field: ArrayLike, method: Literal["forward", "central"] = "forward") -> float:
    """Percentage of voxels with a non-positive Jacobian determinant (folding), ``[0, 100]``.

    Args:
        field: ``(ndim, *S)`` or ``(1, ndim, *S)`` in voxels.
        method: finite differences, see :func:`diffusereg.spatial.jacobian_determinant`.
    """
    return 100.0 * float((_determinant(field, method) <= 0).double().mean())


def jacobian_std(field: ArrayLike, method: Literal["forward", "central"] = "forward") -> float:
    """JSD: standard deviation of the Jacobian determinant (Bessel-corrected, like the
    paper's ``sqrt(torch.var(det))``).

    Args:
        field: ``(ndim, *S)`` or ``(1, ndim, *S)`` in voxels.
        method: finite differences, see :func:`diffusereg.spatial.jacobian_determinant`.
    """
    return float(_determinant(field, method).double().std(correction=1))


def sdlogj(field: ArrayLike, method: Literal["forward", "central"] = "forward") -> float:
    """Standard deviation (population) of ``log(clip(det, 1e-9, 1e9))``.

    Args:
        field: ``(ndim, *S)`` or ``(1, ndim, *S)`` in voxels.
        method: finite differences, see :func:`diffusereg.spatial.jacobian_determinant`.
    """
    determinant = _determinant(field, method).double().clamp(*LOG_DET_CLIP)
    return float(determinant.log().std(correction=0))


def acdc_case_metrics(
    warped_labels: ArrayLike,
    fixed_labels: ArrayLike,
    field: ArrayLike,
    axis_spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """One evaluation row for an ACDC pair.

    Args:
        warped_labels: moving labels warped onto the fixed grid (values 0..3).
        fixed_labels: fixed labels, same shape.
        field: ``(ndim, *S)`` or ``(1, ndim, *S)`` field in voxels that produced ``warped_labels``.
        axis_spacing: voxel size in mm in array-axis order for HD95 (``None``: voxels).
    Returns:
        ``Dice_<s>`` for ``s`` in LV, Myo, LVepi, RV, Heart, Overall (fractions),
        ``HD95_<s>`` for the five structures (mm), ``NJD_percent``, ``JSD`` and ``SDlogJ``
        (forward differences).
    """
    row = {f"Dice_{name}": value for name, value in acdc_dice(warped_labels, fixed_labels).items()}
    for name, labels in ACDC_STRUCTURES.items():
        row[f"HD95_{name}"] = hd95(warped_labels, fixed_labels, labels, spacing=axis_spacing)
    row["NJD_percent"] = njd_percent(field)
    row["JSD"] = jacobian_std(field)
    row["SDlogJ"] = sdlogj(field)
    return row


def auroc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for ranking the ``positives`` first.

    The probability that a random positive scores higher than a random negative, a tie counting
    one half: the Mann-Whitney U of the positives over ``n_pos * n_neg``, from average ranks. 0.5 is
    chance, 1 a perfect ranking, 0 a perfectly reversed one.

    Args:
        scores: real scores of any shape (higher: more likely positive).
        positives: booleans of the same number of elements.
    Returns:
        The AUROC in ``[0, 1]``; NaN when there are no positives or no negatives.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(positives, dtype=bool).ravel()
    if values.shape != labels.shape:
        raise ValueError(f"auroc: {values.size} scores for {labels.size} labels")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(rankdata(values)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def label_volume_ml(labels: ArrayLike, label_or_labels: Labels, axis_spacing: Sequence[float]) -> float:
    """Volume of one structure, ml: its voxel count times the voxel volume.

    Args:
        labels: integer label map ``(*S)``.
        label_or_labels: label value(s) of the structure.
        axis_spacing: voxel size in mm in array-axis order (``Image.axis_spacing``).
    """
    mask = _mask(labels, label_or_labels)
    if mask.ndim != len(axis_spacing):
        raise ValueError(f"a {mask.ndim}D label map needs {mask.ndim} spacings, got {tuple(axis_spacing)}")
    return int(mask.sum()) * math.prod(float(s) for s in axis_spacing) / 1000.0


def ejection_fraction(end_diastolic_ml: float, end_systolic_ml: float) -> float:
    """Ejection fraction in percent, ``100 (EDV - ESV) / EDV``; NaN when ``EDV`` is not positive."""
    if not end_diastolic_ml > 0:
        return math.nan
    return 100.0 * (end_diastolic_ml - end_systolic_ml) / end_diastolic_ml


def myocardial_mass_g(labels: ArrayLike, axis_spacing: Sequence[float], label: int = ACDC_LABELS["Myo"]) -> float:
    """LV myocardial mass, g: the volume of ``label`` (ml, :func:`label_volume_ml`) times
    :data:`MYOCARDIAL_DENSITY`."""
    return MYOCARDIAL_DENSITY * label_volume_ml(labels, label, axis_spacing)


def inverse_consistency_mm(forward: ArrayLike, backward: ArrayLike, axis_spacing: Sequence[float],
                           mask: ArrayLike | None = None) -> float:
    """Mean inverse-consistency residual, mm: how far a point comes from where it started when
    mapped by one field and then by the other.

    ``forward`` registers image B onto image A (it lives on A's grid and points into B),
    ``backward`` registers A onto B; both grids must be the same voxels (e.g. two frames of one
    cine acquisition). The residual at ``x`` is ``u(x) + v(x + u(x))``
    (:func:`~diffusereg.spatial.compose`), zero for exact inverses.

    Args:
        forward, backward: fields ``(ndim, *S)`` or ``(1, ndim, *S)``, voxels of the shared grid.
        axis_spacing: voxel size in mm in array-axis order.
        mask: where to average, ``(*S)`` booleans on ``forward``'s grid (None: everywhere).
    Returns:
        The mean residual length in mm; NaN for an empty mask.
    """
    first, second = _single_case_field(backward), _single_case_field(forward)
    residual = voxel_to_mm(compose(first, second.to(first.dtype)), axis_spacing)[0]
    length = residual.square().sum(dim=0).sqrt()
    if mask is not None:
        length = length[torch.as_tensor(np.asarray(mask), dtype=torch.bool)]
    return float(length.double().mean()) if length.numel() else math.nan
