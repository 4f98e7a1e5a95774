"""Nonsense in, a warning out: noise as the moving image registers (exit 0) but the command says
that the input looks like noise and reports the image similarity before and after (issue 32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusereg.data import PairFiles
from diffusereg.io import read_image, write_image

WARNING = "diffusereg register: warning: "


def test_noise_as_moving_image_registers_with_warnings(case: PairFiles, case_model: Path, tmp_path: Path,
                                                       capsys, cli) -> None:
    fixed = read_image(case.fixed)
    noise = tmp_path / "noise.nii.gz"
    write_image(fixed.with_array(np.random.default_rng(0).random(fixed.array.shape, dtype=np.float32)), noise)
    code, error = cli("register", case.fixed, noise, "-o", tmp_path / "out", "--model", case_model, "--steps", "1")
    assert code == 0, error
    warnings = [line for line in error.splitlines() if line.startswith(WARNING)]
    assert any(f"{noise}: neighbouring voxels correlate" in line and "looks like noise" in line for line in warnings), error
    assert not any(str(case.fixed) + ":" in line for line in warnings), error  # the phantom is no noise
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert abs(metrics["NCC_before"]) < 0.1 and -1.0 <= metrics["NCC_after"] <= 1.0
    if metrics["NCC_after"] <= metrics["NCC_before"]:
        assert any("did not make the images more alike" in line for line in warnings), error


def test_similarity_before_and_after_is_reported(case: PairFiles, case_model: Path, tmp_path: Path, capsys) -> None:
    from diffusereg.cli import main

    assert main(["register", str(case.fixed), str(case.moving), "-o", str(tmp_path / "out"), "--model",
                 str(case_model), "--steps", "1"]) == 0
    shown = capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    before, after = metrics["NCC_before"], metrics["NCC_after"]
    assert 0.0 < before < 1.0 and -1.0 <= after <= 1.0
    assert f"image similarity (NCC) {before:.3f} before, {after:.3f} after" in shown.out
    assert ("did not make the images more alike" in shown.err) == (after <= before)


def test_a_registration_that_makes_the_images_less_alike_warns(case: PairFiles, case_model: Path, tmp_path: Path,
                                                               cli) -> None:
    """Identical images: any field leaves them at most as alike as before."""
    code, error = cli("register", case.fixed, case.fixed, "-o", tmp_path / "out", "--model", case_model,
                      "--steps", "1")
    assert code == 0
    assert f"{WARNING}{tmp_path / 'out'}: the registration did not make the images more alike (NCC 1 before" in error
