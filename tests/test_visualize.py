"""Trajectory pictures: the PNG strip and the animated GIF, from what a TrajectoryRecorder keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from diffusereg.callbacks import TrajectoryRecorder
from diffusereg.visualize import save_trajectory_gif, save_trajectory_strip, trajectory_slice

STEPS = 5


def recorded(samples: int, shape: tuple[int, ...]) -> TrajectoryRecorder:
    """What a recorder keeps of a call on one volume ``shape`` (a field growing towards a shift):
    per step ``(samples, 3, *shape)`` fields and ``(samples, *shape)`` warped images."""
    recorder = TrajectoryRecorder()
    for step, growth in enumerate(torch.linspace(0.0, 1.0, STEPS)):
        field = growth * torch.full((samples, 3, *shape), 2.0) + 0.1 * torch.randn(samples, 3, *shape)
        recorder(None, step, 0, {"x0": field, "warped": torch.rand(samples, *shape)})
    return recorder


def test_2d_model_on_a_volume_gives_a_strip_and_one_gif_frame_per_step(tmp_path: Path):
    depth, samples, size = 3, 2, 32
    recorder = recorded(samples, (depth, size, size))
    for field in recorder.fields:
        field[:, 0] = 0  # a 2D model: no motion across slices
    labels = np.zeros((size, size), dtype=np.int64)
    labels[8:20, 8:20], labels[11:17, 11:17] = 2, 3
    shown = trajectory_slice(recorder, (3.15, 1.5, 1.5), num_steps=STEPS, slice_index=1,
                             fixed=np.random.rand(size, size), moving=np.random.rand(size, size), fixed_labels=labels)
    assert shown.field.shape == (STEPS, 2, size, size) and shown.warped.shape == (STEPS, size, size)
    np.testing.assert_allclose(shown.warped, torch.stack(recorder.warped)[:, 0, 1].numpy())
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
def test_a_volume_shows_a_depth_slice_with_in_plane_grid_and_full_magnitude(tmp_path: Path, slice_index: int):
    recorder = recorded(1, (4, 16, 16))
    shown = trajectory_slice(recorder, (3.0, 2.0, 2.0), num_steps=STEPS, slice_index=slice_index)
    field = torch.stack(recorder.fields)[:, 0, :, slice_index].numpy()
    np.testing.assert_allclose(shown.field, field[:, 1:])
    spacing = np.array([3.0, 2.0, 2.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(shown.magnitude_mm, np.linalg.norm(field * spacing, axis=1), rtol=1e-5)
    assert save_trajectory_gif(shown, tmp_path / "t.gif", frame_ms=100) == STEPS
