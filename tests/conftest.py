"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    """The ACDC training folder, expected at ``../shared/data/acdc/training`` beside the checkout."""
    root = Path(__file__).resolve().parents[1].parent / "shared/data/acdc/training"
    if not root.is_dir():
        pytest.skip(
            f"ACDC training data not found at {root}; real-data tests need ../shared/data/acdc beside the checkout"
        )
    return root
