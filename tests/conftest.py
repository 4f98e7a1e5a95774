"""Shared pytest fixtures: the ACDC data folder, and tiny untrained pipelines saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusereg.models import DiffuseRegDenoiser
from diffusereg.pipelines import DiffuseRegPipeline, default_scheduler


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    """The ACDC training folder, expected at ``../shared/data/acdc/training`` beside the checkout."""
    root = Path(__file__).resolve().parents[1].parent / "shared/data/acdc/training"
    if not root.is_dir():
        pytest.skip(
            f"ACDC training data not found at {root}; real-data tests need ../shared/data/acdc beside the checkout"
        )
    return root


def _save_tiny_pipeline(folder: Path, spatial_dims: int, model_spacing: tuple[float, ...] = (3.0, 3.0, 10.0),
                        model_size: tuple[int, ...] = (16, 64, 64)) -> Path:
    """Save an untrained pipeline with a tiny ``spatial_dims``-D denoiser on a small model grid
    (default 3 x 3 x 10 mm, 16 x 64 x 64) into ``folder``; returns ``folder``."""
    torch.manual_seed(0)
    denoiser = DiffuseRegDenoiser(spatial_dims=spatial_dims, feature_size=12, depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 1, 1), field_mean=[0.0] * spatial_dims,
                                  field_std=[0.02] * spatial_dims).eval()
    pipe = DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim"), model_spacing=model_spacing,
                              model_size=model_size)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved untrained 2D pipeline (registers 2D images, and volumes slice by slice)."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny", spatial_dims=2)


@pytest.fixture(scope="session")
def tiny_model_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved untrained 3D pipeline (registers volumes only)."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny3d", spatial_dims=3)


@pytest.fixture(scope="session")
def coarse_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2D pipeline on a coarse model grid (8 x 8 x 10 mm, 8 x 32 x 32), where the whole
    cardiac phantom fits and a sampling step takes about 0.1 s on a CPU."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("model") / "coarse", spatial_dims=2,
                               model_spacing=(8.0, 8.0, 10.0), model_size=(8, 32, 32))


@pytest.fixture(scope="session")
def coarse_tiny_model_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 3D pipeline on a coarse model grid (8 x 8 x 2.5 mm, 32 x 32 x 32: a 3D model
    needs sizes that are multiples of 32), where the whole cardiac phantom fits."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("model") / "coarse3d", spatial_dims=3,
                               model_spacing=(8.0, 8.0, 2.5), model_size=(32, 32, 32))
