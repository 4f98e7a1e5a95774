"""The model shipped inside the package, ``diffusereg/acdc-2d``: offline loading, the documented call,
and real registrations through the command line (the demo, an ACDC patient in native geometry).

These tests fail, rather than skip, when the bundled files are missing: the model is part of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusereg.cli import main
from diffusereg.data import ACDCDataset, read_acdc_patient
from diffusereg.hub import bundled_model_path
from diffusereg.io import read_grid
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import denoise

pytestmark = pytest.mark.slow  # the full-size shipped model: seconds per call

SHIPPED = "diffusereg/acdc-2d"


def test_the_model_is_bundled_with_safetensors_weights_and_a_card() -> None:
    folder = bundled_model_path(SHIPPED)
    assert folder is not None, "the package lacks src/diffusereg/pretrained/acdc-2d"
    weights = list(folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin"))
    assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) <= 25 * 2**20
    card = (folder / "README.md").read_text()
    assert "ACDC" in card and "Overall" in card


def test_offline_load_and_the_documented_call_give_a_volume_field(tmp_path: Path) -> None:
    """In a fresh process with the Hub switched off: (32, 128, 128) arrays in [0, 1] -> field (3, 32, 128, 128)."""
    script = (
        "import numpy as np, torch\n"
        "from diffusereg import DiffuseRegPipeline\n"
        f"pipe = DiffuseRegPipeline.from_pretrained('{SHIPPED}')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "rng = np.random.default_rng(0)\n"
        "fixed, moving = rng.random((2, 32, 128, 128), dtype=np.float32)\n"
        "out = pipe(fixed, moving, num_inference_steps=2, generator=torch.Generator().manual_seed(0))\n"
        "field = out.field.numpy()\n"
        "assert field.dtype == np.float32 and np.isfinite(field).all()\n"
        "print(tuple(field.shape), float(np.abs(field[0]).max()), float(np.abs(field[1:]).max()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, across_slices, in_plane = result.stdout.strip().rsplit(" ", 2)
    assert shape.endswith("(3, 32, 128, 128)")
    assert float(across_slices) == 0.0 and float(in_plane) > 0.0  # a 2D model: no displacement across slices


@pytest.mark.acdc
def test_registering_an_acdc_patient_in_native_geometry_raises_dice(acdc_root: Path, tmp_path: Path) -> None:
    files = read_acdc_patient(acdc_root / "patient010").files
    output = tmp_path / "patient010"
    code = main(["register", str(files.fixed), str(files.moving), "-o", str(output), "--fixed-labels",
                 str(files.fixed_labels), "--moving-labels", str(files.moving_labels), "--steps", "5"])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["model"] == SHIPPED
    assert metrics["dice_after"]["Overall"] > metrics["dice_before"]["Overall"] + 0.01
    assert metrics["NJD_percent"] < 1.0
    fixed_grid = read_grid(files.fixed)
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "field.nii.gz", "jacobian.nii.gz"):
        assert read_grid(output / name).same_as(fixed_grid), name


def test_the_demo_registers_the_phantom_with_the_shipped_model(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "demo"
    assert main(["demo", "-o", str(output), "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Overall" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["dice_after"]["Overall"] > metrics["dice_before"]["Overall"]
    assert np.isfinite(metrics["NJD_percent"])
    for name in ("warped.nii.gz", "field.h5", "trajectory.png", "trajectory.gif"):
        assert (output / name).is_file(), name


def clean_estimate(pipe, fixed: torch.Tensor, moving: torch.Tensor, start: torch.Tensor, timestep: int) -> torch.Tensor:
    """The shipped denoiser's clean-field estimate (voxels) when sampling holds ``start`` at
    ``timestep``: ``start`` noised there (seeded), one denoiser call (on the moving image warped by
    ``start``, for a refining denoiser)."""
    alpha_bar = pipe.scheduler.alphas_cumprod[timestep]
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    noisy = alpha_bar.sqrt() * pipe.normalizer.normalize(start) + (1 - alpha_bar).sqrt() * noise
    condition = pipe.denoiser.encode_condition(fixed, moving)
    denoised = denoise(pipe.denoiser, pipe.denoiser.config, noisy, torch.tensor(timestep), alpha_bar, pipe.normalizer,
                       estimate=start, condition=condition, moving=moving, proposal=pipe.proposal)
    return pipe.normalizer.denormalize(denoised.clean)


PAPER_IGNORES_IMAGES = pytest.mark.xfail(
    strict=True, reason="the paper recipe's known defect (docs/evaluation.md): below t ~ 1200 its denoiser returns "
                        "the field it is given; strict, so a fix shows up as XPASS")


SHIPPED_CORRECTS_TOO_LITTLE = pytest.mark.xfail(
    strict=True, reason="the shipped model passes the zero half but brings a wrong field less than half of the "
                        "way back (measured before the symmetric teacher: 38 %, docs/evaluation.md)")


@pytest.mark.acdc
@pytest.mark.parametrize("model", [pytest.param(SHIPPED, marks=SHIPPED_CORRECTS_TOO_LITTLE),
                                   pytest.param("diffusereg/acdc-2d-paper", marks=PAPER_IGNORES_IMAGES)])
def test_the_denoiser_reads_the_images_at_low_noise(acdc_root: Path, model: str) -> None:
    """The probe of a denoiser that ignores its images, at t = 600 on eight labelled slices of
    patient 050 (the right field: the bundled teacher's): given another slice's field, the
    estimate comes at least halfway back to the right field; given zero, it is at least half as
    large as the right field."""
    pipe = DiffuseRegPipeline.from_pretrained(model)
    dataset = ACDCDataset(acdc_root, split="val", spatial_dims=3, patients=[50], preprocessing=pipe.preprocessing)
    pair = dataset.preprocessed(0)
    labelled = np.flatnonzero((pair.fixed_labels > 0).any(axis=(1, 2)))
    chosen = labelled[np.linspace(0, len(labelled) - 1, 8).round().astype(int)]
    fixed, moving = (torch.from_numpy(x[chosen][:, None].copy()) for x in (pair.fixed, pair.moving))

    def rms(field: torch.Tensor) -> float:
        return float(field.square().sum(dim=1).mean().sqrt())

    with torch.no_grad():
        right = pipe.teacher(fixed, moving)
        other = right.roll(1, dims=0)  # each slice given its neighbour's field
        from_other = clean_estimate(pipe, fixed, moving, other, 600)
        from_zero = clean_estimate(pipe, fixed, moving, torch.zeros_like(right), 600)
    assert rms(from_other - right) <= 0.5 * rms(other - right), (rms(from_other - right), rms(other - right))
    assert rms(from_zero) >= 0.5 * rms(right), (rms(from_zero), rms(right))
