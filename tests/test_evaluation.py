"""diffusereg.evaluation and ``diffusereg evaluate``: the paper's ACDC protocol, rows, summaries, files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusereg.cli import main
from diffusereg.data import ACDCDataset
from diffusereg.evaluation import (CASE_COLUMNS, RegistrationResult, evaluate, identity_registrar,
                                   pipeline_registrar, summarize, teacher_registrar)
from diffusereg.metrics import acdc_dice
from diffusereg.models import RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline


@pytest.fixture(scope="module")
def one_patient(acdc_root: Path) -> ACDCDataset:
    return ACDCDataset(acdc_root, split="val", spatial_dims=3, patients=[10])


@pytest.mark.acdc
def test_identity_rows_are_the_dice_of_the_unregistered_labels(one_patient: ACDCDataset) -> None:
    (row,) = evaluate(one_patient, identity_registrar, progress=False)
    pair = one_patient.preprocessed(0)
    expected = acdc_dice(pair.moving_labels, pair.fixed_labels)
    assert set(row) == set(CASE_COLUMNS)
    assert row["case"] == "patient010" and row["group"] == "DCM"
    for name, value in expected.items():
        assert row[name] == pytest.approx(100 * value)
    assert row["NJD_percent"] == 0.0 and row["JSD"] == 0.0 and row["steps_run"] is None
    assert row["HD95"] > 0


@pytest.mark.acdc
def test_a_shifted_field_moves_the_labels_and_lowers_dice(one_patient: ACDCDataset) -> None:
    def shift(fixed: np.ndarray, moving: np.ndarray) -> RegistrationResult:
        field = np.zeros((3, *fixed.shape), dtype=np.float32)
        field[2] = 6.0  # 6 voxels (9 mm) along the width
        return RegistrationResult(field, steps_run=1)

    (identity,) = evaluate(one_patient, identity_registrar, progress=False)
    (shifted,) = evaluate(one_patient, shift, progress=False)
    assert shifted["Overall"] < identity["Overall"] - 5
    assert shifted["steps_run"] == 1


@pytest.mark.acdc
def test_a_field_of_the_wrong_shape_is_refused(one_patient: ACDCDataset) -> None:
    with pytest.raises(ValueError, match=r"patient010: the method returned a field of shape \(2, 4, 4\)"):
        evaluate(one_patient, lambda f, m: RegistrationResult(np.zeros((2, 4, 4))), progress=False)


def test_a_2d_teacher_registers_a_volume_slice_by_slice() -> None:
    torch.manual_seed(0)
    net = RegistrationNet(spatial_dims=2, channels=(8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,))
    with torch.no_grad():
        net.voxelmorph.backbone.net[1].final_conv_out.conv.weight.normal_(std=0.1)  # a visible field
    fixed, moving = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    field = teacher_registrar(net.eval())(fixed, moving).field
    assert field.shape == (3, 3, 32, 32)
    assert np.all(field[0] == 0) and np.abs(field[1:]).max() > 0
    with torch.no_grad():
        second_slice = net(torch.from_numpy(fixed[1:2, None]), torch.from_numpy(moving[1:2, None]))[0].numpy()
    np.testing.assert_allclose(field[1:, 1], second_slice, atol=1e-5)


def test_a_pipeline_registrar_passes_a_start_field(tiny_model: Path) -> None:
    """``init_field`` reaches the pipeline: with strength 0.1 one step runs, and the untrained
    denoiser (noise prediction 0) leaves the given field almost as is."""
    pipe = DiffuseRegPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    given = np.zeros((3, 2, 32, 32), dtype=np.float32)
    given[2] = 1.5  # one voxel along W, every slice
    fixed, moving = np.random.default_rng(0).random((2, 2, 32, 32), dtype=np.float32)
    result = pipeline_registrar(pipe, 10, init_field=given, strength=0.1)(fixed, moving)
    assert result.steps_run == 1
    np.testing.assert_allclose(result.field, given, atol=0.05)


def test_summary_is_mean_and_sample_std_skipping_missing_values() -> None:
    rows = [{"Overall": 80.0, "seconds": 1.0, "steps_run": None, "HD95": float("nan")},
            {"Overall": 90.0, "seconds": 3.0, "steps_run": None, "HD95": 4.0}]
    summary = summarize(rows)
    assert summary["Overall"] == {"mean": 85.0, "std": pytest.approx(np.std([80, 90], ddof=1)), "n": 2}
    assert summary["HD95"]["n"] == 1 and "steps_run" not in summary


@pytest.mark.acdc
def test_cli_writes_per_case_csv_and_summaries(acdc_root: Path, tiny_model: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    model = tiny_model
    output = tmp_path / "evaluation"
    code = main(["evaluate", "--data", str(acdc_root), "--patients", "10", "20", "--model", str(model), "--steps", "2",
                 "--early-stopping", "0.5", "-o", str(output)])
    assert code == 0
    with (output / "cases.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["case"] for row in rows] == ["patient010", "patient020"]
    assert list(rows[0]) == ["method", *CASE_COLUMNS]
    assert all(0 <= float(row["Overall"]) <= 100 and 1 <= int(row["steps_run"]) <= 2 for row in rows)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["settings"]["patients"] == ["patient010", "patient020"]
    assert summary["summary"][str(model)]["Overall"]["n"] == 2
    assert (output / "summary.md").read_text().startswith("| method | LV |")
    assert "2 cases (val)" in capsys.readouterr().out


@pytest.mark.acdc
def test_cli_can_start_from_the_models_teacher(acdc_root: Path, tiny_model: Path, tmp_path: Path, with_teacher,
                                               capsys: pytest.CaptureFixture) -> None:
    arguments = ["evaluate", "--data", str(acdc_root), "--patients", "10", "--model", str(tiny_model), "--steps", "4",
                 "--start-from-teacher", "0.5", "-o", str(tmp_path / "evaluation")]
    assert main(arguments) != 0
    assert "has no one-shot teacher" in capsys.readouterr().err
    arguments[arguments.index("--model") + 1] = str(with_teacher(tiny_model, tmp_path / "model"))
    assert main(arguments) == 0
    with (tmp_path / "evaluation" / "cases.csv").open() as stream:
        assert [int(row["steps_run"]) for row in csv.DictReader(stream)] == [2]
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert summary["settings"]["start_from_teacher"] == 0.5
