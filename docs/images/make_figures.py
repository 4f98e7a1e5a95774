"""Draw the documentation figures: the cardiac phantom and the method schematic.

Run from the repository root:  python docs/images/make_figures.py
Writes docs/images/phantom.png, method.png and trajectory_untrained.png. No trained model is
needed: the schematic noises an analytic contraction field with the paper's forward process, and
the trajectory example is an untrained test model steered by organ-mask guidance.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from diffusereg.models import DiffuseRegDenoiser
from diffusereg.phantom import cardiac_phantom
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import default_scheduler
from diffusereg.guidance import GuidanceSpec
from diffusereg.registration import RegistrationSettings, register_pair
from diffusereg.spatial import warp

HERE = Path(__file__).resolve().parent
COLOURS = {1: "tab:cyan", 2: "tab:green", 3: "tab:orange"}  # RV, Myo, LV
CROP = (slice(40, 136), slice(40, 136))  # the heart region of the phantom slices


def show(ax, image: np.ndarray, title: str, labels: np.ndarray | None = None) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(image, 99.5))
    if labels is not None:
        for value, colour in COLOURS.items():
            if np.any(labels == value):
                ax.contour(labels == value, levels=[0.5], colors=colour, linewidths=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def phantom_figure() -> None:
    """ED and ES of the phantom at base, mid-ventricle and apex, with the label contours."""
    phantom = cardiac_phantom(seed=0)
    figure = Figure(figsize=(7.5, 5.2), layout="constrained")
    axes = figure.subplots(2, 3)
    for row, (image, labels, phase) in enumerate(((phantom.ed, phantom.ed_labels, "ED (fixed)"),
                                                  (phantom.es, phantom.es_labels, "ES (moving)"))):
        for column, (index, level) in enumerate(((0, "base"), (3, "mid"), (5, "apex"))):
            show(axes[row, column], image.array[index][CROP], f"{phase}, slice {index} ({level})",
                 labels.array[index][CROP])
    figure.suptitle("diffusereg.phantom.cardiac_phantom(seed=0): RV cyan, myocardium green, LV orange", fontsize=9)
    figure.savefig(HERE / "phantom.png", dpi=110)


def contraction_field(shape: tuple[int, int], centre: tuple[float, float], strength: float, width: float) -> torch.Tensor:
    """``(2, H, W)`` pull field (voxels) drawing points towards ``centre`` inside a Gaussian window."""
    rows, cols = torch.meshgrid(torch.arange(shape[0], dtype=torch.float32), torch.arange(shape[1], dtype=torch.float32),
                                indexing="ij")
    offset = torch.stack([rows - centre[0], cols - centre[1]])
    window = torch.exp(-(offset**2).sum(0) / (2 * width**2))
    return -strength * offset * window


def quiver(ax, field: np.ndarray, title: str, every: int = 6) -> None:
    magnitude = np.linalg.norm(field, axis=0)
    ax.imshow(magnitude, cmap="magma", vmin=0, vmax=np.percentile(magnitude, 99))
    rows, cols = np.mgrid[0:field.shape[1]:every, 0:field.shape[2]:every]
    ax.quiver(cols, rows, field[1, ::every, ::every], -field[0, ::every, ::every], color="white", scale=None,
              angles="xy", width=0.006)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def arrow(figure: Figure, start, end, text: str = "") -> None:
    figure.patches.append(FancyArrowPatch(start, end, transform=figure.transFigure, arrowstyle="-|>",
                                          mutation_scale=14, color="0.25", linewidth=1.2))
    if text:
        figure.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.02, text, ha="center", fontsize=8)


def method_figure() -> None:
    """Fixed and moving images condition the denoiser; the field goes from noise to phi_0."""
    phantom = cardiac_phantom(seed=0)
    fixed = phantom.ed.array[3][CROP].astype(np.float32)
    moving = phantom.es.array[3][CROP].astype(np.float32)
    fixed, moving = fixed / fixed.max(), moving / moving.max()
    labels = phantom.ed_labels.array[3][CROP]
    centre = np.argwhere(labels == 3).mean(axis=0)
    clean = contraction_field(fixed.shape, tuple(centre), strength=0.35, width=18.0)  # voxels
    std = float(clean.std())
    scheduler = default_scheduler("ddim")
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = (1999, 1400, 900, 400, 0)

    figure = Figure(figsize=(11.0, 5.0))
    top = [figure.add_axes((0.06 + 0.2 * i, 0.56, 0.16, 0.36)) for i in (0, 1)]
    show(top[0], fixed, "fixed F (ED)", labels)
    show(top[1], moving, "moving M (ES), fixed contours", labels)
    figure.text(0.575, 0.74, "Swin image encoder\n(once per registration)\n\nits features enter every\n"
                "window of the denoiser,\nfused with the field tokens", ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="0.92", edgecolor="0.5"))
    warped = warp(torch.from_numpy(moving)[None, None], clean[None])[0, 0].numpy()
    result = figure.add_axes((0.78, 0.56, 0.16, 0.36))
    show(result, warped, "M(x + phi_0(x)) (illustrative field)", labels)
    arrow(figure, (0.43, 0.74), (0.475, 0.74))
    arrow(figure, (0.68, 0.74), (0.77, 0.74), "warp")

    for i, t in enumerate(timesteps):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        noisy = (alpha_bar**0.5) * clean / std + (1 - alpha_bar) ** 0.5 * noise  # z-scored, as the denoiser sees it
        ax = figure.add_axes((0.03 + 0.195 * i, 0.05, 0.15, 0.34))
        quiver(ax, (noisy * std).numpy(), "phi_T ~ N(0, I)" if t == 1999 else f"phi_t, t = {t}")
        if i < len(timesteps) - 1:
            arrow(figure, (0.185 + 0.195 * i, 0.22), (0.222 + 0.195 * i, 0.22))
    figure.text(0.5, 0.445, "denoising steps: predict the noise, form the clean-field estimate, apply guidance, "
                "scheduler step, callbacks", ha="center", fontsize=9)
    figure.savefig(HERE / "method.png", dpi=110)


def untrained_pipeline() -> DiffuseRegPipeline:
    """The untrained tiny 2D test model (random weights, seed 0) on a 1.5 x 1.5 x 10 mm,
    16 x 96 x 96 model grid: the heart region of the phantom."""
    torch.manual_seed(0)
    denoiser = DiffuseRegDenoiser(spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                  field_mean=[0.0, 0.0], field_std=[0.02, 0.02]).eval()
    return DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim"), model_spacing=(1.5, 1.5, 10.0),
                              model_size=(16, 96, 96))


def trajectory_figure() -> None:
    """The trajectory strip of the phantom registered by an untrained tiny 2D model (the test
    model) with organ-mask guidance on the three structures and smoothness guidance."""
    pipe = untrained_pipeline()
    phantom = cardiac_phantom(seed=0)
    guidance = tuple(GuidanceSpec("organ", 1.0, label) for label in (1, 2, 3)) + (GuidanceSpec("smoothness", 0.3),)
    settings = RegistrationSettings(steps=10, guidance=guidance, save_trajectory=True)
    with tempfile.TemporaryDirectory() as folder:
        register_pair(pipe, phantom.ed, phantom.es, folder, settings, phantom.ed_labels, phantom.es_labels)
        shutil.copy(Path(folder) / "trajectory.png", HERE / "trajectory_untrained.png")


if __name__ == "__main__":
    phantom_figure()
    method_figure()
    trajectory_figure()
