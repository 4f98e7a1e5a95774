"""benchmarks/bundle_model.py: the model card's section on what the spread of the samples means."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def report(groups: dict[str, tuple[str, float, float, float, float]]) -> dict[str, Any]:
    """A ``benchmarks/uncertainty.py`` report with ``group: (sampler, disagreement AUROC, boundary
    AUROC, spread rho, volume rho)``, the model sampled at 3 steps."""
    def summary(disagreement: float, distance: float, spread: float, volume: float) -> dict[str, Any]:
        return {"voxels": {"auroc": {"disagreement": {"pooled": disagreement}, "-boundary_distance": {"pooled": distance}}},
                "structures": {"field_spread": {"pooled": {"rho": spread}}, "-volume": {"pooled": {"rho": volume}}}}

    return {"settings": {"steps": [3], "cases": ["patient010", "patient020"], "seeds": [0, 1], "command": "uncertainty.py"},
            "summaries": {group: summary(*numbers) for group, (_, *numbers) in groups.items()},
            "rows": {group: [{"sampler": sampler}] for group, (sampler, *_) in groups.items()}}


@pytest.fixture(scope="module")
def spread_section(benchmark_script: Callable[[str], ModuleType]) -> Callable[[list[dict[str, Any]]], str]:
    return benchmark_script("bundle_model").spread_section


def test_the_verdict_is_the_models_own_spread_against_both_baselines(spread_section: Callable) -> None:
    beats = report({"ED fixed, 3 steps": ("3 steps", 0.8, 0.7, 0.6, 0.5)})
    assert spread_section([beats]).startswith("The samples disagree where the registration is wrong")
    for numbers in ((0.6, 0.7, 0.6, 0.5), (0.8, 0.7, 0.45, 0.3), (0.8, 0.7, 0.6, 0.65)):  # each baseline, and rho < 0.5
        text = spread_section([report({"ED fixed, 3 steps": ("3 steps", *numbers)})])
        assert text.startswith("The spread of this model's samples is not an uncertainty estimate")


def test_comparison_groups_are_shown_but_do_not_decide(spread_section: Callable) -> None:
    own = report({"ED fixed, 3 steps": ("3 steps", 0.5, 0.7, 0.3, 0.6)})
    oracle = report({"ED fixed, energy": ("energy", 0.9, 0.7, 0.9, 0.6)})
    text = spread_section([own, oracle])
    assert text.startswith("The spread of this model's samples is not an uncertainty estimate")
    assert "| this model, ED fixed, 3 steps | 0.500 | 0.700 | 0.300 | 0.600 |" in text
    assert "| ED fixed, energy (not this model: a candidate training target) | 0.900 |" in text
    with pytest.raises(ValueError, match="no group of the pipeline's own samples"):
        spread_section([oracle])
    assert spread_section([]).startswith("Not measured")
