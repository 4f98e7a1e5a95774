"""The ``diffusereg`` command line: register (one pair, ACDC geometry; a list of pairs), demo, errors.

The model is a tiny randomly initialised 2D pipeline (``tiny_model``, conftest.py); its fields are
noise, so the Dice test steers it with organ-mask guidance: the improvement it checks comes from
the guidance, not from a trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import SimpleITK as sitk

from diffusereg.cli import _summary, main
from diffusereg.data import read_acdc_patient
from diffusereg.io import read_grid, read_image, write_image
from diffusereg.phantom import cardiac_phantom

IMAGE_OUTPUTS = ("warped.nii.gz", "warped_labels.nii.gz", "field.nii.gz", "jacobian.nii.gz", "sample_spread.nii.gz")
GUIDED = ["--guidance", "organ=1", "organ=2", "organ=3", "smoothness=0.3"]


@pytest.fixture(scope="module")
def patient_files(acdc_root: Path) -> list[str]:
    """ACDC patient001 in its native geometry: fixed (ED), moving (ES), their labels."""
    files = read_acdc_patient(acdc_root / "patient001").files
    return [str(files.fixed), str(files.moving), str(files.fixed_labels), str(files.moving_labels)]


@pytest.fixture(scope="module")
def registered(tiny_model: Path, patient_files: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of one in-process, guided, 2-sample registration of patient001 with trajectory."""
    fixed, moving, fixed_labels, moving_labels = patient_files
    output = tmp_path_factory.mktemp("registered") / "out"
    code = main(["register", fixed, moving, "-o", str(output), "--fixed-labels", fixed_labels, "--moving-labels",
                 moving_labels, "--model", str(tiny_model), "--steps", "4", "--samples", "2", "--save-trajectory",
                 *GUIDED])
    assert code == 0
    return output


@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small phantom pairs on disk (``pairN/ed.nii.gz``, ``es.nii.gz``, labels)."""
    root = tmp_path_factory.mktemp("phantoms")
    for seed in (1, 2):
        phantom = cardiac_phantom(seed=seed, shape=(4, 96, 96))
        (root / f"pair{seed}").mkdir()
        for image, name in ((phantom.ed, "ed"), (phantom.es, "es"), (phantom.ed_labels, "ed_gt"),
                            (phantom.es_labels, "es_gt")):
            write_image(image, root / f"pair{seed}" / f"{name}.nii.gz")
    return root


def write_pair_list(root: Path, rows: list[str]) -> Path:
    pairs = root / "pairs.csv"
    pairs.write_text("name,fixed,moving,fixed_labels,moving_labels\n" + "".join(row + "\n" for row in rows))
    return pairs


def phantom_row(name: str) -> str:
    return f"{name},{name}/ed.nii.gz,{name}/es.nii.gz,{name}/ed_gt.nii.gz,{name}/es_gt.nii.gz"


@pytest.mark.acdc
def test_every_output_overlays_the_fixed_image(registered: Path, patient_files: list[str]):
    fixed = read_grid(patient_files[0])
    for name in IMAGE_OUTPUTS:
        assert read_grid(registered / name).same_as(fixed), name
    transform = sitk.ReadTransform(str(registered / "field.h5"))
    assert transform.GetName() == "DisplacementFieldTransform"
    field_image = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    assert tuple(reversed(field_image.GetSize())) == fixed.shape
    assert np.allclose(field_image.GetSpacing(), fixed.spacing) and np.allclose(field_image.GetOrigin(), fixed.origin)
    assert np.allclose(field_image.GetDirection(), fixed.direction)
    jacobian = read_image(registered / "jacobian.nii.gz").array
    assert jacobian.shape == fixed.shape and np.isfinite(jacobian).all()
    assert (read_image(registered / "sample_spread.nii.gz").array >= 0).all()
    assert (registered / "trajectory.png").stat().st_size > 0 and (registered / "trajectory.gif").stat().st_size > 0
    metrics = json.loads((registered / "metrics.json").read_text())
    assert metrics["steps_run"] == 4 and metrics["samples"] == 2 and metrics["seed"] == 0
    assert set(metrics["dice_after"]) == {"LV", "Myo", "LVepi", "RV", "Heart", "Overall"}
    assert {"NJD_percent", "JSD", "time_seconds", "model"} <= set(metrics)
    sample_spread, fixed_labels = read_image(registered / "sample_spread.nii.gz").array, read_image(patient_files[2]).array
    assert set(metrics["sample_spread_mm"]) == {"image", "LV", "Myo", "LVepi", "RV", "Heart"}
    assert metrics["sample_spread_mm"]["LV"] == pytest.approx(float(sample_spread[fixed_labels == 3].mean()), rel=1e-5)
    assert sorted(metrics["outputs"]) == sorted(p.name for p in registered.iterdir())


@pytest.mark.acdc
def test_itk_resample_with_the_written_transform_gives_the_warped_image(registered: Path, patient_files: list[str]):
    fixed = sitk.ReadImage(patient_files[0])
    moving = sitk.ReadImage(patient_files[1], sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(registered / "field.h5"))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    warped = read_image(registered / "warped.nii.gz").array
    inside = (slice(None), slice(20, -20), slice(20, -20))  # away from the in-plane borders (padding differs)
    assert np.abs(resampled[inside] - warped[inside]).max() <= 1e-4 * np.abs(warped).max()


@pytest.mark.acdc
def test_organ_guidance_steers_the_untrained_model_to_a_better_dice(registered: Path):
    metrics = json.loads((registered / "metrics.json").read_text())
    before, after = metrics["dice_before"], metrics["dice_after"]
    assert after["Overall"] >= before["Overall"] + 0.01
    for structure in ("LV", "Myo", "RV"):
        assert after[structure] >= before[structure], structure


@pytest.mark.slow
@pytest.mark.acdc
def test_console_script_registers_an_acdc_patient(tiny_model: Path, patient_files: list[str], tmp_path: Path):
    script = Path(sys.executable).with_name("diffusereg")
    output = tmp_path / "out"
    result = subprocess.run([str(script), "register", patient_files[0], patient_files[1], "-o", str(output),
                             "--model", str(tiny_model), "--steps", "1", "--device", "cpu"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 steps" in result.stdout
    assert read_grid(output / "warped.nii.gz").same_as(read_grid(patient_files[0]))
    assert "dice_after" not in json.loads((output / "metrics.json").read_text())  # no labels given


def test_demo_registers_the_phantom(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    output = tmp_path / "demo"
    assert main(["demo", "-o", str(output), "--model", str(tiny_model), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "Overall" in printed
    for name in ("fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "field.h5", "jacobian.nii.gz", "trajectory.png",
                 "trajectory.gif", "metrics.json"):
        assert (output / name).is_file(), name
    assert read_grid(output / "warped_labels.nii.gz").same_as(read_grid(output / "fixed.nii.gz"))


def test_batch_registers_each_pair_once_and_resumes(tiny_model: Path, phantom_pairs: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    pairs = write_pair_list(phantom_pairs, [phantom_row("pair1"), phantom_row("pair2")])
    output = tmp_path / "batch"
    arguments = ["register", "--pairs", str(pairs), "-o", str(output), "--model", str(tiny_model), "--steps", "1"]
    assert main(arguments) == 0
    assert "registered 2 pairs, skipped 0" in capsys.readouterr().out
    finished = {name: (output / name / "metrics.json").stat().st_mtime_ns for name in ("pair1", "pair2")}
    assert main(arguments) == 0
    assert "registered 0 pairs, skipped 2" in capsys.readouterr().out
    assert finished == {name: (output / name / "metrics.json").stat().st_mtime_ns for name in ("pair1", "pair2")}


def test_batch_with_a_missing_file_stops_before_registering(tiny_model: Path, phantom_pairs: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]):
    pairs = write_pair_list(phantom_pairs, [phantom_row("pair1"), phantom_row("pair9")])
    output = tmp_path / "batch"
    assert main(["register", "--pairs", str(pairs), "-o", str(output), "--model", str(tiny_model)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "row 2" in error and "pair9/ed.nii.gz" in error
    assert not output.exists()


@pytest.mark.parametrize("problem", ["missing file", "input overwritten", "unknown model", "bad guidance",
                                     "organ without labels"])
def test_bad_input_exits_2_with_one_line(problem: str, tiny_model: Path, phantom_pairs: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]):
    fixed, moving = phantom_pairs / "pair1/ed.nii.gz", phantom_pairs / "pair1/es.nii.gz"
    output, options = tmp_path / "out", ["--model", str(tiny_model), "--steps", "1"]
    if problem == "missing file":
        moving, expected = tmp_path / "nowhere.nii.gz", "nowhere.nii.gz: file does not exist"
    elif problem == "input overwritten":  # e.g. chaining: the previous run's warped image as moving, same folder
        output.mkdir()
        moving = output / "warped.nii.gz"
        moving.write_bytes((phantom_pairs / "pair1/es.nii.gz").read_bytes())
        expected = "would be overwritten"
    elif problem == "unknown model":
        options, expected = ["--model", "diffusereg/no-such-model"], "model 'diffusereg/no-such-model' not found"
    elif problem == "bad guidance":
        options, expected = [*options, "--guidance", "smoothness=lots"], "guidance 'smoothness=lots'"
    else:
        options, expected = [*options, "--guidance", "organ=3"], "needs --fixed-labels and --moving-labels"
    before = moving.read_bytes() if moving.exists() else None
    assert main(["register", str(fixed), str(moving), "-o", str(output), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("diffusereg register: error:") and "\n" not in error and expected in error
    if before is not None:
        assert moving.read_bytes() == before


def test_register_can_start_from_the_models_teacher(coarse_tiny_model: Path, phantom_pairs: Path, tmp_path: Path,
                                                   with_teacher, capsys: pytest.CaptureFixture[str]):
    """--start-from-teacher: the pipeline's teacher component runs on the model-grid images
    (init_field="teacher"), the last STRENGTH of the steps run; a model without a teacher is
    refused before any output."""
    pair = phantom_pairs / "pair1"
    arguments = ["register", str(pair / "ed.nii.gz"), str(pair / "es.nii.gz"), "-o", str(tmp_path / "out"),
                 "--model", str(coarse_tiny_model), "--steps", "4", "--start-from-teacher", "0.5"]
    assert main(arguments) == 2
    assert "has no one-shot teacher" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    arguments[arguments.index("--model") + 1] = str(with_teacher(coarse_tiny_model, tmp_path / "model"))
    assert main(arguments) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps_run"] == 2 and metrics["start_from_teacher"] == 0.5
    assert main([*arguments[:-1], "1.5"]) == 2
    assert "--start-from-teacher must be in (0, 1], got 1.5" in capsys.readouterr().err


HELP_COMMANDS = [["--help"], ["register", "--help"], ["apply", "--help"], ["cardiac", "--help"], ["demo", "--help"],
                 ["evaluate", "--help"], ["watch", "--help"], ["train", "--help"], ["train", "teacher", "--help"],
                 ["train", "diffusion", "--help"]]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda argv: " ".join(argv) or "no arguments")
def test_help_of_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The first thing people type: usage on stdout, exit code 0."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: diffusereg") and ("COMMAND" in shown or "options:" in shown), shown


def test_bare_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``diffusereg`` alone exited 0 (issue 32): exit code 2, usage and the error on stderr."""
    assert main([]) == 2
    shown = capsys.readouterr()
    assert not shown.out and shown.err.startswith("usage: diffusereg") and "error: give a COMMAND" in shown.err


@pytest.mark.parametrize(("percent", "shown"), [(0.0014, "0.0014"), (0.44, "0.44"), (0.0, "0"), (12.34, "12")])
def test_summary_shows_folding_with_two_significant_digits(percent: float, shown: str) -> None:
    """'folding 0.00 %' was printed for 0.0014 % (issue 32)."""
    summary = _summary({"steps_run": 3, "time_seconds": 1.0, "NJD_percent": percent, "NCC_before": 0.5,
                        "NCC_after": 0.75}, Path("out"))
    assert summary.endswith(f"folding {shown} % of voxels, image similarity (NCC) 0.500 before, 0.750 after")


def test_help_imports_no_torch() -> None:
    """``diffusereg --help`` builds the whole parser without importing torch (a separate process)."""
    code = ("import sys\nfrom diffusereg.cli import _summary, main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for argv in (['train', 'diffusion', '--help'], ['apply', '--help']):\n    try:\n        main(argv)\n"
            "    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_bfloat16_registers_like_float32(coarse_tiny_model: Path, phantom_pairs: Path, tmp_path: Path,
                                         with_teacher) -> None:
    """``--dtype bfloat16`` runs the networks (here the teacher that starts sampling) in bfloat16:
    the field differs from float32's by rounding only."""
    model, pair, fields = with_teacher(coarse_tiny_model, tmp_path / "model"), phantom_pairs / "pair1", {}
    for dtype in ("float32", "bfloat16"):
        output = tmp_path / dtype
        assert main(["register", str(pair / "ed.nii.gz"), str(pair / "es.nii.gz"), "-o", str(output),
                     "--model", str(model), "--steps", "2", "--start-from-teacher", "0.5", "--dtype", dtype]) == 0
        fields[dtype] = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "field.nii.gz")))
    difference = np.abs(fields["bfloat16"] - fields["float32"]).max()
    assert np.isfinite(fields["bfloat16"]).all() and 0 < difference < 0.05 * np.abs(fields["float32"]).max()


def test_training_help_names_the_guides_and_the_shipped_configs(capsys: pytest.CaptureFixture[str]) -> None:
    """``train --help`` pointed to docs/ and configs/, which a pip install lacks (issue 32)."""
    for argv in (["train", "--help"], ["train", "teacher", "--help"], ["train", "diffusion", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        shown = " ".join(capsys.readouterr().out.split())
        assert "train_own_data.md" in shown and "diffusereg train --print-config NAME" in shown, argv
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--print-config", "teacher_2d_cpu"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert printed == (Path(__file__).parents[1] / "src/diffusereg/configs/teacher_2d_cpu.yaml").read_text()
    assert yaml.safe_load(printed)["train"]["output_dir"]
