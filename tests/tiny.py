"""The tiny untrained models every test builds from: one denoiser recipe, one pipeline recipe."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusereg.models import DiffuseRegDenoiser
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import default_scheduler


def tiny_denoiser(spatial_dims: int, **config: object) -> DiffuseRegDenoiser:
    """A randomly initialised DiffuseReg denoiser of the smallest size (seeded), in eval mode, with
    field statistics mean 0 and std 0.02 voxels; ``config`` overrides any constructor argument."""
    torch.manual_seed(0)
    arguments = dict(spatial_dims=spatial_dims, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                     field_mean=[0.0] * spatial_dims, field_std=[0.02] * spatial_dims)
    return DiffuseRegDenoiser(**{**arguments, **config}).eval()


def tiny_pipeline(spatial_dims: int, model_spacing: tuple[float, ...] = (3.0, 3.0, 10.0),
                  model_size: tuple[int, ...] = (16, 64, 64), **denoiser_config: object) -> DiffuseRegPipeline:
    """:func:`tiny_denoiser` with the paper's DDIM schedule on a small model grid (default
    3 x 3 x 10 mm, 16 x 64 x 64), progress bar off."""
    denoiser = tiny_denoiser(spatial_dims, **denoiser_config)
    pipe = DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim", denoiser.config.prediction_type),
                              model_spacing=model_spacing, model_size=model_size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, spatial_dims: int, **grid: tuple) -> Path:
    """:func:`tiny_pipeline` saved into ``folder``; returns ``folder``."""
    tiny_pipeline(spatial_dims, **grid).save_pretrained(folder)
    return folder


def spread_tiny_pipeline(model_size: tuple[int, ...]) -> DiffuseRegPipeline:
    """A tiny 2D pipeline on the paper's spacing whose samples differ by whole voxels: field std 0.5
    voxels and a random output convolution (a fresh one is zero, and so is every sample)."""
    pipe = tiny_pipeline(2, model_spacing=(1.5, 1.5, 3.15), model_size=model_size, field_std=[0.5, 0.5])
    torch.manual_seed(0)
    torch.nn.init.normal_(pipe.denoiser.decoder.out.weight, std=0.05)
    return pipe
