"""benchmarks/uncertainty.py: its voxel maps on known cases, its sampling, and one ACDC case end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from monai.networks.layers import GaussianFilter
from scipy import stats

from tiny import spread_tiny_pipeline


@pytest.fixture(scope="module")
def uncertainty(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("uncertainty")


def test_label_disagreement_is_one_minus_the_majority_share(uncertainty: ModuleType) -> None:
    labels = np.array([[0, 1, 3], [0, 2, 3], [1, 3, 3]])  # 3 samples of 3 voxels
    np.testing.assert_allclose(uncertainty.label_disagreement(labels), [1 / 3, 2 / 3, 0.0])


def test_boundary_distance_in_mm_from_either_side_of_a_label_change(uncertainty: ModuleType) -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(uncertainty.boundary_distance(labels, [2.0]), [4, 2, 0, 0, 2, 2, 0, 0])
    assert np.isinf(uncertainty.boundary_distance(np.zeros((2, 3), dtype=int), [1.0, 1.0])).all()


def test_spearman_is_scipys_rho_with_an_exact_permutation_p_value_for_few_pairs(uncertainty: ModuleType) -> None:
    assert uncertainty.spearman([1, 2, 3, 4], [1, 5, 7, 30]) == {"rho": 1.0, "p": pytest.approx(2 / 24), "n": 4}
    x, y = np.random.default_rng(0).random((2, 20))
    result = uncertainty.spearman([*x, math.nan], [*y, 0.0])  # the non-finite pair is left out
    assert result["n"] == 20 and result["rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert result["p"] == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.05)
    assert math.isnan(uncertainty.spearman([1, 1, 1], [1, 2, 3])["rho"])


def test_each_seed_is_one_single_sample_call_unlike_one_call_with_all_samples(uncertainty: ModuleType) -> None:
    pipe = spread_tiny_pipeline((4, 64, 64))
    pair = SimpleNamespace(fixed=np.random.default_rng(0).random((4, 64, 64), dtype=np.float32),
                           moving=np.random.default_rng(1).random((4, 64, 64), dtype=np.float32))
    fields = uncertainty.sample_fields(pipe, pair, 1, [3, 5])
    single = pipe(pair.fixed, pair.moving, num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(fields[1], single.field)
    assert not np.allclose(fields[0], fields[1])
    joint = pipe(pair.fixed, pair.moving, num_inference_steps=1, output_type="np", num_samples=2,
                 generator=torch.Generator().manual_seed(3))
    assert not np.allclose(joint.field, fields.mean(axis=0))


def test_energy_samples_meet_where_the_image_pins_the_field_and_stay_apart_where_it_is_flat(
        benchmark_script: Callable[[str], ModuleType]) -> None:
    energy_samples = benchmark_script("instance_optimisation").energy_samples
    texture = GaussianFilter(2, 1.5)(torch.rand((1, 1, 64, 40), generator=torch.Generator().manual_seed(0)))
    texture = (texture[..., 4:36] - texture.min()) / (texture.max() - texture.min())
    image = torch.cat([texture, torch.full((1, 1, 64, 32), 0.5)], dim=3)  # textured left half, flat right half
    samples = torch.stack(energy_samples(image, image, torch.zeros(1, 2, 64, 64), [0, 1, 2, 3], (1.0, 1.0),
                                         start_amplitude=1.0, start_sigma=4.0, iterations=60, learning_rate=0.05))
    spread = samples.std(dim=0).norm(dim=1)[0]  # (64, 64) voxels
    textured, flat = spread[8:-8, 4:24].mean(), spread[8:-8, 40:60].mean()
    assert flat > 0.3  # nothing in a flat image pulls the random starts together
    assert textured < 0.3 * flat


@pytest.mark.acdc
def test_one_case_two_seeds_both_directions(uncertainty: ModuleType, acdc_root: Path, tmp_path: Path,
                                            with_teacher: Callable[[Path, Path], Path]) -> None:
    spread_tiny_pipeline((8, 64, 64)).save_pretrained(tmp_path / "bare")
    model = with_teacher(tmp_path / "bare", tmp_path / "model")
    output = tmp_path / "out"
    report = uncertainty.main(["--data", str(acdc_root), "--patients", "10", "--model", str(model),
                               "--output", str(output), "--seeds", "0", "1", "--steps", "1",
                               "--fixed-frames", "ED", "ES", "--energy", "--energy-iterations", "2",
                               "--perturbed", "--perturbed-passes", "1", "--mismatch", "--threads", "1"])

    assert json.loads((output / "summary.json").read_text()) == report
    assert report["settings"]["command"].endswith("--threads 1")
    markdown = (output / "summary.md").read_text()
    for group in ("ED fixed, 1 steps", "ES fixed, 1 steps"):
        assert f"## {group}" in markdown
        (row,) = report["rows"][group]
        assert row["case"] == "patient010" and row["region_voxels"] > 0
        assert 0 < row["wrong_percent"] < 100 and row["field_spread_heart"] > 0
        for score in uncertainty.VOXEL_SCORES:
            assert 0 <= row[f"auroc_{score}"] <= 1
            assert report["summaries"][group]["voxels"]["auroc"][score]["pooled"] == row[f"auroc_{score}"]
        for structure in uncertainty.STRUCTURES:
            assert 0 <= row[f"disagreement_{structure}"] <= 0.5  # 2 samples: at most 1 - 1/2
            assert row[f"error_{structure}"] == pytest.approx(1 - row[f"Dice_{structure}"] / 100)
        pooled = report["summaries"][group]["structures"]["-volume"]["pooled"]
        assert pooled["n"] == 3 and -1 <= pooled["rho"] <= 1
        assert report["summaries"][group]["structures"]["-volume"]["LV"] == {"rho": None, "p": None, "n": 1}
    for comparison in ("energy samples around teacher x3", "teacher x1 on perturbed images",
                       "teacher x3 plus noise scaled by the mismatch"):
        (row,) = report["rows"][f"ED fixed, {comparison}"]
        assert row["case"] == "patient010" and row["sampler"] == comparison and row["field_spread_heart"] > 0
    ed, es = report["rows"]["ED fixed, 1 steps"][0], report["rows"]["ES fixed, 1 steps"][0]
    assert ed["volume_LV"] > es["volume_LV"]  # the fixed frame is ED, then ES: the LV contracts
    for picture in ("voxels.png", "structures.png"):
        assert (output / picture).stat().st_size > 0
