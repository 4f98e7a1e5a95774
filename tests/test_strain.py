"""Myocardial strain (diffusereg.strain) and the phantom's LV in closed form (diffusereg.phantom.LVMotion):
volumes, ejection fraction, mass and strain measured on the phantom's labels and exact fields
against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusereg.metrics import ejection_fraction, inverse_consistency_mm, label_volume_ml, myocardial_mass_g
from diffusereg.phantom import CardiacPhantom, cardiac_phantom
from diffusereg.spatial import affine_field
from diffusereg.strain import myocardial_strain


@pytest.fixture(scope="module", params=[0, 1])
def phantom(request: pytest.FixtureRequest) -> CardiacPhantom:
    return cardiac_phantom(seed=request.param)


def test_label_volumes_ejection_fraction_and_mass_match_the_closed_form(phantom: CardiacPhantom) -> None:
    truth, spacing = phantom.lv.volumes(), phantom.ed.axis_spacing
    edv = label_volume_ml(phantom.ed_labels.array, 3, spacing)
    esv = label_volume_ml(phantom.es_labels.array, 3, spacing)
    assert edv == pytest.approx(truth["EDV"], rel=0.01)
    assert esv == pytest.approx(truth["ESV"], rel=0.02)
    assert ejection_fraction(edv, esv) == pytest.approx(truth["EF"], abs=0.5)
    assert myocardial_mass_g(phantom.ed_labels.array, spacing) == pytest.approx(truth["mass"], rel=0.02)


@pytest.mark.parametrize("fixed_frame", ["ED", "ES"])
def test_strain_of_the_exact_field_matches_the_closed_form(phantom: CardiacPhantom, fixed_frame: str) -> None:
    lv = phantom.lv
    labels = (phantom.ed_labels if fixed_frame == "ED" else phantom.es_labels).array * lv.is_ring[:, None, None]
    field = lv.field(phantom.ed.grid, fixed_frame)
    strain = myocardial_strain(field, labels, phantom.ed.axis_spacing, "fixed" if fixed_frame == "ED" else "moving")
    radial, circumferential = lv.slice_strain()
    assert lv.is_ring.sum() >= 5
    np.testing.assert_allclose(strain.slice_radial[lv.is_ring], radial[lv.is_ring], atol=1.0)
    np.testing.assert_allclose(strain.slice_circumferential[lv.is_ring], circumferential[lv.is_ring], atol=0.3)
    assert np.isnan(strain.slice_radial[~lv.is_ring]).all()
    expected = lv.global_strain(fixed_frame)
    assert strain.radial == pytest.approx(expected[0], abs=0.5)
    assert strain.circumferential == pytest.approx(expected[1], abs=0.3)
    assert strain.radial > 15 and strain.circumferential < -15  # the wall thickens and shortens


def test_the_exact_fields_of_both_directions_are_inverse(phantom: CardiacPhantom) -> None:
    grid, lv = phantom.ed.grid, phantom.lv
    forward, backward = lv.field(grid, "ED"), lv.field(grid, "ES")
    myocardium = (phantom.ed_labels.array == 2) & lv.is_ring[:, None, None]
    assert inverse_consistency_mm(forward, backward, grid.axis_spacing, myocardium) < 0.05
    assert inverse_consistency_mm(forward, np.zeros_like(backward), grid.axis_spacing, myocardium) > 2.0


@pytest.mark.parametrize("reference", ["fixed", "moving"])
def test_a_uniform_in_plane_scaling_strains_every_direction_alike(reference: str) -> None:
    labels = np.zeros((2, 40, 40), dtype=np.uint8)
    rows, cols = np.ogrid[:40, :40]
    radius = np.hypot(rows - 19.5, cols - 19.5)
    labels[:, radius < 14] = 2
    labels[:, radius < 8] = 3
    scale = 0.9
    matrix = torch.tensor([[1.0, 0, 0, 0], [0, scale, 0, 19.5 * (1 - scale)], [0, 0, scale, 19.5 * (1 - scale)]])
    field = affine_field(matrix, labels.shape)[0].numpy()
    strain = myocardial_strain(field, labels, (8.0, 1.2, 1.2), reference)
    stretch = scale if reference == "fixed" else 1 / scale
    for value in (strain.radial, strain.circumferential, *strain.slice_radial, *strain.slice_circumferential):
        assert value == pytest.approx(100 * (stretch - 1), abs=1e-3)
    zero = myocardial_strain(np.zeros_like(field), labels, (8.0, 1.2, 1.2), reference)
    assert zero.radial == pytest.approx(0.0) and zero.circumferential == pytest.approx(0.0)


def test_strain_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="expected a field"):
        myocardial_strain(np.zeros((2, 4, 8, 8)), np.zeros((4, 8, 8)), (1.0, 1.0, 1.0), "fixed")
    with pytest.raises(ValueError, match="reference"):
        myocardial_strain(np.zeros((3, 4, 8, 8)), np.zeros((4, 8, 8)), (1.0, 1.0, 1.0), "ED")
