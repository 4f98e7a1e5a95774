"""benchmarks/cardiac.py: its agreement statistics, the ejection fractions it compares, the
patient order of the strain run and the direction of its AUROCs."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cardiac(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("cardiac")


def test_agreement_is_mae_bias_and_limits_of_agreement(cardiac: ModuleType) -> None:
    stats = cardiac.agreement([-2.0, 4.0, float("nan"), 1.0])
    assert stats["MAE"] == pytest.approx(7 / 3) and stats["bias"] == pytest.approx(1.0) and stats["n"] == 3
    assert stats["LoA_high"] - stats["bias"] == pytest.approx(1.96 * np.std([-2.0, 4.0, 1.0], ddof=1))


def test_ejection_fractions_of_both_chambers(cardiac: ModuleType) -> None:
    ed = np.zeros((2, 4, 4), dtype=np.uint8)
    es = ed.copy()
    ed[0] = 3  # LV: 16 voxels at ED, 4 at ES
    es[0, :2, :2] = 3
    ed[1, :2] = 1  # RV: 8 voxels at ED, 6 at ES
    es[1, :2, :3] = 1
    fractions = cardiac.ejection_fractions(ed, es, (5.0, 1.0, 1.0))
    assert fractions == {"LVEF": pytest.approx(75.0), "RVEF": pytest.approx(25.0)}


def test_strain_patients_take_turns_by_group(cardiac: ModuleType) -> None:
    class Groups:
        names = ["p1", "p2", "p3", "p4", "p5"]

        def metadata(self, index: int) -> dict[str, str]:
            return {"group": ["DCM", "DCM", "DCM", "NOR", "NOR"][index]}

    assert cardiac.group_interleaved(Groups()) == ["p4", "p1", "p5", "p2", "p3"]
    assert cardiac.group_interleaved(Groups(), ["DCM"]) == ["p1", "p2", "p3"]


def test_disease_with_less_strain_scores_an_auroc_of_one(cardiac: ModuleType) -> None:
    rows = [{"fixed": "ED", "group": group, "radial": radial, "circumferential": -radial / 2, "LVEF_truth": radial}
            for group, radial in (("NOR", 40.0), ("NOR", 35.0), ("DCM", 15.0), ("DCM", 20.0), ("MINF", 30.0))]
    summary = cardiac.group_summary(rows)["ED fixed"]
    assert summary["auroc"]["NOR vs DCM"] == {"radial": 1.0, "circumferential": 1.0, "LVEF_truth": 1.0}
    assert summary["groups"]["NOR"]["radial"]["mean"] == pytest.approx(37.5) and summary["groups"]["NOR"]["n"] == 2
    assert "ES fixed" not in cardiac.group_summary(rows)
