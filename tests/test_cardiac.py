"""The cardiac readout (diffusereg.cardiac, ``diffusereg cardiac``) on the phantom: the direction it
registers, the volumes it reports, its files, and its refusals.

The fast tests use the tiny untrained pipeline on a coarse grid (``coarse_tiny_model``,
conftest.py): its fields are noise, so they check what the readout does with a field, not how
good the field is. The slow test runs the shipped model and compares with the phantom's closed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusereg.cardiac import cardiac_readout, parse_label_map, to_acdc_labels
from diffusereg.cli import main
from diffusereg.io import Image, write_image
from diffusereg.metrics import label_volume_ml, myocardial_mass_g
from diffusereg.phantom import CardiacPhantom, cardiac_phantom
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.registration import RegistrationSettings
from diffusereg.strain import myocardial_strain
from diffusereg.validation import RegistrationError

PHANTOM_SHAPE = (6, 96, 96)


@pytest.fixture(scope="module")
def phantom() -> CardiacPhantom:
    return cardiac_phantom(seed=2, shape=PHANTOM_SHAPE)


@pytest.fixture(scope="module")
def phantom_files(phantom: CardiacPhantom, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cardiac")
    files = {name: folder / f"{name}.nii.gz" for name in ("ed", "es", "ed_gt", "es_gt")}
    for image, name in ((phantom.ed, "ed"), (phantom.es, "es"), (phantom.ed_labels, "ed_gt"),
                        (phantom.es_labels, "es_gt")):
        write_image(image, files[name])
    return files


@pytest.fixture(scope="module")
def tiny_pipe(coarse_tiny_model: Path) -> DiffuseRegPipeline:
    pipe = DiffuseRegPipeline.from_pretrained(coarse_tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_label_map_parsing_and_refusals() -> None:
    assert parse_label_map("LV=30, Myo=20,RV=10") == {"LV": 30, "Myo": 20, "RV": 10}
    for text in ("LV=3,Myo=2", "LV=3,Myo=3,RV=1", "LV=3,Myo=2,RA=1", "LV=x,Myo=2,RV=1", "LV=0,Myo=2,RV=1"):
        with pytest.raises(RegistrationError, match="--label-map"):
            parse_label_map(text)


def test_labels_are_mapped_to_acdc_values_or_refused_naming_what_is_missing(phantom: CardiacPhantom) -> None:
    own = phantom.ed_labels.with_array(phantom.ed_labels.array.astype(np.int16) * 10 + 7 * (phantom.ed_labels.array == 0))
    mapped = to_acdc_labels(own, {"LV": 30, "Myo": 20, "RV": 10})
    np.testing.assert_array_equal(mapped.array, phantom.ed_labels.array)
    no_rv = phantom.ed_labels.with_array(np.where(phantom.ed_labels.array == 1, 0, phantom.ed_labels.array))
    with pytest.raises(RegistrationError, match=r"SEG.nii.gz: .*RV \(1\) not found among the values \[0, 2, 3\]"):
        to_acdc_labels(no_rv, name="SEG.nii.gz")


@pytest.mark.parametrize("labels_frame", ["ED", "ES"])
def test_the_readout_registers_the_other_frame_onto_the_labelled_ones_and_measures_it(
        tiny_pipe: DiffuseRegPipeline, phantom: CardiacPhantom, labels_frame: str) -> None:
    # ES one row shorter than ED: the field's grid tells which frame was fixed
    es = Image.on_grid(phantom.es.array[:, :-1], phantom.es.grid.__class__(
        (PHANTOM_SHAPE[0], PHANTOM_SHAPE[1] - 1, PHANTOM_SHAPE[2]), phantom.es.spacing, phantom.es.origin,
        phantom.es.direction))
    es_labels = es.with_array(phantom.es_labels.array[:, :-1])
    given = phantom.ed_labels if labels_frame == "ED" else es_labels
    readout = cardiac_readout(tiny_pipe, phantom.ed, es, given, labels_frame, settings=RegistrationSettings(steps=1))
    fixed = es if labels_frame == "ED" else phantom.ed
    assert readout.fixed_frame == ("ES" if labels_frame == "ED" else "ED")
    assert readout.field.shape == (3, *fixed.array.shape)
    carried = readout.es_labels if labels_frame == "ED" else readout.ed_labels
    assert carried.same_geometry(fixed)
    np.testing.assert_array_equal((readout.ed_labels if labels_frame == "ED" else readout.es_labels).array,
                                  given.array)
    lv = readout.volumes["LV"]
    assert lv["EDV"] == pytest.approx(label_volume_ml(readout.ed_labels.array, 3, phantom.ed.axis_spacing))
    assert lv["ESV"] == pytest.approx(label_volume_ml(readout.es_labels.array, 3, es.axis_spacing))
    assert lv["EF"] == pytest.approx(100 * (lv["EDV"] - lv["ESV"]) / lv["EDV"])
    assert lv["mass"] == pytest.approx(myocardial_mass_g(readout.ed_labels.array, phantom.ed.axis_spacing))
    expected = myocardial_strain(readout.field, carried.array, fixed.axis_spacing,
                                 "moving" if labels_frame == "ED" else "fixed")
    assert readout.strain.radial == pytest.approx(expected.radial)
    np.testing.assert_allclose(readout.strain.slice_circumferential, expected.slice_circumferential)


def test_the_command_writes_the_report_and_its_picture(coarse_tiny_model: Path, phantom_files: dict[str, Path],
                                                        phantom: CardiacPhantom, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "report"
    code = main(["cardiac", str(phantom_files["ed"]), str(phantom_files["es"]), "--labels", str(phantom_files["ed_gt"]),
                 "--output", str(output), "--model", str(coarse_tiny_model), "--steps", "1"])
    assert code == 0
    assert "ED labels carried to ES (ES fixed, ED moving)" in capsys.readouterr().out
    report = json.loads((output / "report.json").read_text())
    assert sorted(path.name for path in output.iterdir()) == ["report.csv", "report.json", "report.png"]
    truth = phantom.lv.volumes()
    assert report["LV"]["EDV_ml"] == pytest.approx(truth["EDV"], rel=0.02)  # from the given ED labels
    assert report["labels_frame"] == "ED" and report["steps_run"] == 1
    assert len(report["strain"]["per_slice"]) == PHANTOM_SHAPE[0]
    rows = (output / "report.csv").read_text().splitlines()
    assert rows[0] == "quantity,value,unit" and rows[1].startswith("LV_EDV,") and rows[1].endswith(",ml")
    assert any(row.startswith("circumferential_strain_slice_0,") for row in rows)


def test_the_command_maps_other_label_values_and_refuses_missing_ones(
        coarse_tiny_model: Path, phantom_files: dict[str, Path], phantom: CardiacPhantom, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "es_own.nii.gz"
    write_image(phantom.es_labels.with_array(phantom.es_labels.array * 2), own)  # RV 2, Myo 4, LV 6
    arguments = ["cardiac", str(phantom_files["ed"]), str(phantom_files["es"]), "--labels", str(own),
                 "--labels-frame", "es", "--model", str(coarse_tiny_model), "--steps", "1"]
    assert main([*arguments, "--output", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "LV (3) not found among the values [0, 2, 4, 6]" in error and "--label-map" in error
    assert not (tmp_path / "refused" / "report.json").exists()
    assert main([*arguments, "--output", str(tmp_path / "mapped"), "--label-map", "LV=6,Myo=4,RV=2"]) == 0
    report = json.loads((tmp_path / "mapped" / "report.json").read_text())
    assert report["labels_frame"] == "ES" and report["label_map"] == {"LV": 6, "Myo": 4, "RV": 2}
    assert report["LV"]["ESV_ml"] == pytest.approx(phantom.lv.volumes()["ESV"], rel=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("labels_frame", ["ED", "ES"])
def test_the_shipped_model_reads_the_phantoms_ejection_fraction(labels_frame: str) -> None:
    phantom = cardiac_phantom(seed=0)
    pipe = DiffuseRegPipeline.from_pretrained("diffusereg/acdc-2d")
    pipe.set_progress_bar_config(disable=True)
    readout = cardiac_readout(pipe, phantom.ed, phantom.es,
                              phantom.ed_labels if labels_frame == "ED" else phantom.es_labels, labels_frame)
    truth = phantom.lv.volumes()
    assert readout.volumes["LV"]["EF"] == pytest.approx(truth["EF"], abs=3.0)
    assert readout.strain.circumferential == pytest.approx(phantom.lv.global_strain(readout.fixed_frame)[1], abs=8.0)
    assert readout.strain.radial > 0
