"""Trajectory pictures: the PNG strip and the animated GIF, from pipeline-shaped trajectories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from diffusereg.visualize import save_trajectory_gif, save_trajectory_strip, trajectory_slice

STEPS = 5


def pipeline_trajectory(ndim: int, items: int, shape: tuple[int, ...]) -> dict:
    """A trajectory like ``DiffuseRegPipelineOutput.trajectory``: a field growing towards a shift."""
    growth = torch.linspace(0.0, 1.0, STEPS).reshape(STEPS, 1, 1, *([1] * len(shape)))
    fields = growth * torch.full((1, items, ndim, *shape), 2.0) + 0.1 * torch.randn(STEPS, items, ndim, *shape)
    return {"steps": list(range(STEPS)), "fields": fields, "warped": torch.rand(STEPS, items, 1, *shape)}


def test_2d_model_on_a_volume_gives_a_strip_and_one_gif_frame_per_step(tmp_path: Path):
    depth, samples, size = 3, 2, 32
    trajectory = pipeline_trajectory(2, depth * samples, (size, size))
    labels = np.zeros((size, size), dtype=np.int64)
    labels[8:20, 8:20], labels[11:17, 11:17] = 2, 3
    shown = trajectory_slice(trajectory, (3.15, 1.5, 1.5), num_steps=STEPS, slice_index=1, num_samples=samples,
                             fixed=np.random.rand(size, size), moving=np.random.rand(size, size), fixed_labels=labels)
    assert shown.field.shape == (STEPS, 2, size, size) and shown.warped.shape == (STEPS, size, size)
    np.testing.assert_allclose(shown.warped, trajectory["warped"][:, 1 * samples, 0].numpy())
    np.testing.assert_allclose(shown.magnitude_mm, 1.5 * np.linalg.norm(shown.field, axis=1), rtol=1e-5)

    assert save_trajectory_strip(shown, tmp_path / "trajectory.png") == STEPS
    assert save_trajectory_strip(shown, tmp_path / "short.png", max_columns=3) == 3
    assert save_trajectory_gif(shown, tmp_path / "trajectory.gif") == STEPS
    with PILImage.open(tmp_path / "trajectory.png") as strip:
        assert strip.format == "PNG" and strip.width > 2 * strip.height
    with PILImage.open(tmp_path / "trajectory.gif") as animation:
        assert animation.format == "GIF" and animation.n_frames == STEPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.png", "trajectory.gif", "trajectory.png"]


@pytest.mark.parametrize("slice_index", [0, 3])
def test_3d_model_shows_a_depth_slice_with_in_plane_grid_and_full_magnitude(tmp_path: Path, slice_index: int):
    trajectory = pipeline_trajectory(3, 1, (4, 16, 16))
    shown = trajectory_slice(trajectory, (3.0, 2.0, 2.0), num_steps=STEPS, slice_index=slice_index)
    field = trajectory["fields"][:, 0, :, slice_index].numpy()
    np.testing.assert_allclose(shown.field, field[:, 1:])
    spacing = np.array([3.0, 2.0, 2.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(shown.magnitude_mm, np.linalg.norm(field * spacing, axis=1), rtol=1e-5)
    assert save_trajectory_gif(shown, tmp_path / "t.gif", frame_ms=100) == STEPS
