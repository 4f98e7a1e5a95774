"""Tests of diffusereg.metrics on hand-made label maps and fields with known answers."""

import math

import numpy as np
import pytest
import torch

from diffusereg.metrics import (
    ACDC_STRUCTURES,
    acdc_case_metrics,
    acdc_dice,
    auroc,
    dice,
    ejection_fraction,
    hd95,
    inverse_consistency_mm,
    jacobian_std,
    label_volume_ml,
    myocardial_mass_g,
    ncc,
    njd_percent,
    sdlogj,
)
from diffusereg.spatial import affine_field

# Positions 0..9: reference RV {1,2}, Myo {3,4,5}, LV {6..9}; prediction RV {1}, Myo {2,3,4}, LV {5..8}.
REF = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
PRED = np.array([0, 1, 2, 2, 2, 3, 3, 3, 3, 0])
EXPECTED_DICE = {
    "LV": 6 / 8,  # overlap {6,7,8}
    "Myo": 4 / 6,  # overlap {3,4}
    "LVepi": 12 / 14,  # {2..8} vs {3..9}
    "RV": 2 / 3,  # {1} vs {1,2}
    "Heart": 16 / 17,  # {1..8} vs {1..9}
}


def test_dice_values_and_empty_cases() -> None:
    assert dice(PRED, REF, 3) == pytest.approx(0.75)
    assert dice(PRED, REF, [2, 3]) == pytest.approx(12 / 14)
    assert dice(PRED, REF, 7) == 1.0  # absent from both
    assert dice(PRED, np.zeros_like(REF), 3) == 0.0  # absent from one


@pytest.mark.parametrize("shape", [(10,), (2, 5), (1, 2, 5)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_acdc_dice_exact_values(shape: tuple[int, ...], as_tensor: bool) -> None:
    pred, ref = PRED.reshape(shape), REF.reshape(shape)
    if as_tensor:
        pred, ref = torch.from_numpy(pred), torch.from_numpy(ref)
    scores = acdc_dice(pred, ref)
    assert list(scores) == ["LV", "Myo", "LVepi", "RV", "Heart", "Overall"]
    for name, value in EXPECTED_DICE.items():
        assert scores[name] == pytest.approx(value), name
    assert scores["Overall"] == pytest.approx(sum(EXPECTED_DICE.values()) / 5)
    assert all(isinstance(value, float) for value in scores.values())


def test_acdc_dice_rejects_foreign_labels() -> None:
    with pytest.raises(ValueError):
        acdc_dice(PRED, np.where(REF == 3, 4, REF))


def test_hd95_single_voxels_uses_axis_spacing_in_array_order() -> None:
    pred, ref = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.uint8)
    pred[1, 1, 1] = 1
    ref[3, 2, 4] = 1  # offset (2, 1, 3) voxels
    assert hd95(pred, ref, 1, spacing=(3.0, 2.0, 1.0)) == pytest.approx(7.0)  # sqrt(36 + 4 + 9)
    assert hd95(pred, ref, 1) == pytest.approx(math.sqrt(14))


def sphere(shape: tuple[int, ...], spacing: tuple[float, ...], center_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    mm = coords * np.reshape(spacing, (-1, 1, 1, 1))
    return (((mm - center_mm.reshape(-1, 1, 1, 1)) ** 2).sum(0) <= radius_mm**2).astype(np.uint8)


@pytest.mark.parametrize("axis, voxels", [(0, 2), (1, 4), (2, 5)])
def test_hd95_of_shifted_sphere_is_about_the_shift_in_mm(axis: int, voxels: int) -> None:
    spacing, shape, center = (2.5, 1.0, 0.8), (24, 40, 48), np.array([30.0, 20.0, 19.0])
    shift = np.zeros(3)
    shift[axis] = voxels * spacing[axis]
    distance = hd95(sphere(shape, spacing, center + shift, 10.0), sphere(shape, spacing, center, 10.0), 1, spacing)
    assert distance == pytest.approx(shift[axis], rel=0.15)


def test_hd95_empty_structure_is_nan() -> None:
    assert math.isnan(hd95(PRED, REF, 5))
    assert math.isnan(hd95(PRED, np.zeros_like(REF), 1))


def folding_field(ndim: int, axis: int, jump: float = -2.0) -> torch.Tensor:
    """Field moving along ``axis`` only, with forward difference ``jump`` at k_axis == 1:
    det = 1 + jump on that slab and 1 elsewhere."""
    shape = tuple(5 if dim == axis else 4 for dim in range(ndim))
    profile = torch.tensor([0.0, 0.0, jump, jump, jump])
    field = torch.zeros(ndim, *shape)
    field[axis] = profile.reshape([-1 if dim == axis else 1 for dim in range(ndim)])
    return field


@pytest.mark.parametrize("ndim", [2, 3])
def test_njd_jsd_sdlogj_exact_values(ndim: int) -> None:
    identity = torch.zeros(ndim, *(6,) * ndim)
    assert njd_percent(identity) == 0.0
    assert jacobian_std(identity) == 0.0
    assert sdlogj(identity) == 0.0
    for axis in range(ndim):
        field = folding_field(ndim, axis)
        # forward-difference determinants: one slab of four along axis has det -1
        assert njd_percent(field) == pytest.approx(25.0)
        count = 4 * 3 ** (ndim - 1)
        mean = 0.5
        expected_var = (count / 4 * (-1 - mean) ** 2 + 3 * count / 4 * (1 - mean) ** 2) / (count - 1)
        assert jacobian_std(field) == pytest.approx(math.sqrt(expected_var))
        assert sdlogj(field) == pytest.approx(abs(math.log(1e-9)) * math.sqrt(3) / 4)
        assert njd_percent(folding_field(ndim, axis, jump=-1.0)) == pytest.approx(25.0)  # det 0 counts
        assert njd_percent(folding_field(ndim, axis, jump=-0.9)) == 0.0


def test_field_metrics_accept_numpy_batched_and_reject_batches() -> None:
    field = folding_field(3, 1)
    assert njd_percent(field.numpy()) == njd_percent(field[None]) == pytest.approx(25.0)
    assert njd_percent(affine_field(torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (5, 5))) == 100.0
    with pytest.raises(ValueError):
        njd_percent(torch.zeros(2, 3, 4, 4, 4))


def test_acdc_case_metrics_row() -> None:
    shape = (2, 5)
    field = torch.zeros(2, *shape)
    row = acdc_case_metrics(PRED.reshape(shape), REF.reshape(shape), field, axis_spacing=(1.5, 1.5))
    names = list(ACDC_STRUCTURES)
    assert list(row) == (
        [f"Dice_{name}" for name in names + ["Overall"]]
        + [f"HD95_{name}" for name in names]
        + ["NJD_percent", "JSD", "SDlogJ"]
    )
    assert row["Dice_LV"] == pytest.approx(0.75)
    assert row["HD95_LV"] == pytest.approx(hd95(PRED.reshape(shape), REF.reshape(shape), 3, (1.5, 1.5)))
    assert row["NJD_percent"] == 0.0 and row["JSD"] == 0.0
    assert all(isinstance(value, float) for value in row.values())


def test_auroc_known_cases_and_ties() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of the 4 positive-negative pairs ordered
    assert auroc([1.0, 2.0, 3.0], [False, True, True]) == 1.0
    assert auroc([3.0, 2.0, 1.0], [False, True, True]) == 0.0
    assert auroc([5.0, 5.0, 5.0, 5.0], [0, 1, 0, 1]) == 0.5  # all tied: chance
    assert math.isnan(auroc([1.0, 2.0], [1, 1])) and math.isnan(auroc([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        auroc([1.0, 2.0, 3.0], [0, 1])


def test_auroc_is_the_share_of_correctly_ordered_pairs() -> None:
    generator = np.random.default_rng(0)
    scores = generator.integers(0, 5, size=200)  # many ties
    positives = generator.random(200) < scores / 8
    pairs = scores[positives][:, None] - scores[~positives][None, :]
    expected = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert auroc(torch.from_numpy(scores), positives) == pytest.approx(expected, abs=1e-12)


def test_label_volume_mass_and_ejection_fraction() -> None:
    labels = np.zeros((2, 10, 10), dtype=np.uint8)
    labels[0, :4, :5] = 3  # 20 voxels of 10 x 1.5 x 2 mm = 30 mm^3 each
    labels[1, :2, :5] = 2  # 10 voxels
    spacing = (10.0, 1.5, 2.0)
    assert label_volume_ml(labels, 3, spacing) == pytest.approx(0.6)
    assert label_volume_ml(torch.from_numpy(labels), (2, 3), spacing) == pytest.approx(0.9)
    assert myocardial_mass_g(labels, spacing) == pytest.approx(1.05 * 0.3)
    assert ejection_fraction(120.0, 48.0) == pytest.approx(60.0)
    assert math.isnan(ejection_fraction(0.0, 0.0))
    with pytest.raises(ValueError, match="spacings"):
        label_volume_ml(labels, 3, (1.0, 1.0))


def test_inverse_consistency_of_a_translation_and_its_inverse_is_zero() -> None:
    shift = np.zeros((3, 4, 12, 12), dtype=np.float32)
    shift[1], shift[2] = 2.0, -1.0
    mask = np.zeros((4, 12, 12), dtype=bool)
    mask[:, 4:8, 4:8] = True
    assert inverse_consistency_mm(shift, -shift, (10.0, 1.5, 1.5), mask) == pytest.approx(0.0, abs=1e-6)
    # the same shift twice: every point ends (4, -2) voxels away, 1.5 mm each
    assert inverse_consistency_mm(shift, shift, (10.0, 1.5, 1.5), mask) == pytest.approx(1.5 * math.sqrt(20))
    assert math.isnan(inverse_consistency_mm(shift, -shift, (10.0, 1.5, 1.5), np.zeros_like(mask)))


def test_inverse_consistency_of_a_scaling_and_its_inverse() -> None:
    # u: x -> 1.1 x on the first axis (around voxel 0); v: its inverse; the residual is zero
    # where x + u(x) stays inside the grid
    u = affine_field(torch.tensor([[1.1, 0.0, 0.0], [0.0, 1.0, 0.0]]), (30, 8))[0]
    v = affine_field(torch.tensor([[1 / 1.1, 0.0, 0.0], [0.0, 1.0, 0.0]]), (30, 8))[0]
    inside = np.zeros((30, 8), dtype=bool)
    inside[:25] = True
    assert inverse_consistency_mm(u, v, (2.0, 1.0), inside) == pytest.approx(0.0, abs=1e-4)
def test_ncc_is_pearsons_r_of_the_voxels() -> None:
    x = np.random.default_rng(0).random((6, 7))
    assert ncc(x, 3.0 * x + 2.0) == pytest.approx(1.0)
    assert ncc(x, -x) == pytest.approx(-1.0)
    assert ncc(x, np.random.default_rng(1).random((6, 7))) == pytest.approx(np.corrcoef(
        x.ravel(), np.random.default_rng(1).random((6, 7)).ravel())[0, 1])
    assert ncc(x, np.full((6, 7), 5.0)) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        ncc(x, x[:3])
