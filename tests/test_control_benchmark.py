"""benchmarks/control.py: every section runs on one ACDC case, and its EarlyStopping replay is exact."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from diffusereg.callbacks import EarlyStopping, TrajectoryRecorder
from tiny import spread_tiny_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "control.py"


@pytest.fixture(scope="module")
def control(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("control")


def test_replayed_early_stopping_returns_what_a_stopped_run_returns(control: ModuleType) -> None:
    pipe = spread_tiny_pipeline((32, 64, 64))
    fixed, moving = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1))
    steps = 10
    recorder = TrajectoryRecorder()
    pipe(fixed, moving, num_inference_steps=steps, callback_on_step_end=recorder,
         generator=torch.Generator().manual_seed(0))
    changes = [float((b - a).abs().mean()) for a, b in zip(recorder.fields, recorder.fields[1:])]
    tolerance = float(np.median(changes))

    stop = control.replay_early_stopping(EarlyStopping(tolerance), recorder.fields)
    live = pipe(fixed, moving, num_inference_steps=steps, callback_on_step_end=EarlyStopping(tolerance),
                generator=torch.Generator().manual_seed(0))
    assert stop is not None and live.num_steps_run == stop + 1 < steps
    torch.testing.assert_close(live.field, recorder.fields[stop][0], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.acdc
def test_every_section_runs_on_one_case_and_writes_finite_numbers(control: ModuleType, acdc_root: Path,
                                                                  tmp_path: Path) -> None:
    spread_tiny_pipeline((8, 64, 64)).save_pretrained(tmp_path / "model")
    output = tmp_path / "out"
    report = control.main(["--data", str(acdc_root), "--patients", "10", "--model", str(tmp_path / "model"),
                           "--output", str(output), "--sections", *control.SECTIONS, "--steps", "2",
                           "--smoothness-scales", "0.05", "--organ-scales", "1", "--early-stopping-steps", "4",
                           "--early-stopping-tolerances", "0.01", "1000", "--threads", "1"])

    assert json.loads((output / "control.json").read_text()) == report
    markdown = (output / "control.md").read_text()
    for section in control.SECTIONS:
        assert f"## {section}" in markdown
        assert (output / f"{section}.png").stat().st_size > 0
        for row in report["sections"][section]["rows"]:
            assert 0 <= row["Overall"] <= 100 and 0 <= row["NJD_percent"] <= 100
            for column in set(control.SECTION_COLUMNS[section]) & set(row):
                assert row[column] is not None and math.isfinite(row[column]), (section, row["config"], column)

    folds = {row["config"]: row for row in report["sections"]["folds"]["rows"]}
    assert set(folds) == {"none", "--guidance folds", "--guidance smoothness=0.05"}
    similarity = {row["config"]: row for row in report["sections"]["similarity"]["rows"]}
    raw = "SimilarityGuidance(scale=1, sigma=0)"
    assert set(similarity) == {"none", "--guidance similarity", "--guidance similarity folds", raw,
                               f"{raw} + FoldGuidance()"}
    for fold_free in (folds["--guidance folds"], similarity["--guidance similarity folds"],
                      similarity[f"{raw} + FoldGuidance()"]):
        assert fold_free["NJD_percent"] == 0.0
    assert all(0 <= row["SSIM"] <= 100 for row in similarity.values())

    rows = {row["config"]: row for row in report["sections"]["organ"]["rows"]}
    assert set(rows) == {"none", "LV: fixed mask, scale 1", "Myo: fixed mask, scale 1", "RV: fixed mask, scale 1",
                         "LV: fixed+moving masks, scale 1"}
    assert rows["LV: fixed mask, scale 1"]["d_target"] == pytest.approx(rows["LV: fixed mask, scale 1"]["LV"]
                                                                         - rows["none"]["LV"])

    guided = report["sections"]["direction"]["rows"][1]
    assert 0 <= guided["angle_error_deg"] <= 180 and guided["magnitude_error"] >= -1 and guided["residual_voxels"] >= 0

    stopping = {row["config"]: row for row in report["sections"]["early-stopping"]["rows"]}
    assert stopping["4 steps, EarlyStopping(1000)"]["steps_run"] == 3  # patience 2: stops after the 3rd step
    assert stopping["4 steps, EarlyStopping(1000)"]["steps_saved_percent"] == 25.0
    assert stopping["2 steps, full"]["steps_run"] == 2
    assert report["settings"]["command"].startswith(str(SCRIPT))


def test_defaults_are_the_settings_of_the_published_run(control: ModuleType) -> None:
    published = SCRIPT.parent / "results" / "control_val" / "control.json"
    settings = json.loads(published.read_text())["settings"]
    moved = "uncertainty"  # a section of that run, now benchmarks/uncertainty.py
    settings["sections"] = [section for section in settings["sections"] if section != moved]
    defaults = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(control.parse_args([])).items()}
    added_since = [key for key in defaults if key not in settings]  # options added after the run: off by default
    assert all(defaults[key] == [] for key in added_since), added_since
    assert {key: defaults[key] for key in settings if key in defaults} == {
        key: settings[key] for key in settings if key in defaults}
