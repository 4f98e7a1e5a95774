"""Instance optimisation from the teacher's field: is the registration energy's optimum better than the teacher?

For each ACDC validation patient (paper protocol, model grid), start from the bundled teacher
applied ``--passes`` times recursively and minimise the teacher's own training energy per pair,
``1 - SSIM(fixed, moving o u) + lambda * mean|grad u|^2`` (``diffusereg.losses``), with Adam over
a displacement added to the start, slice by slice for a 2D teacher. Dice, NJD and SSIM are
recorded after each of ``--checkpoints`` iterations, for each ``--lambdas``. A target better than
the teacher for training the denoiser, or room for similarity guidance, exists only if the
optimum of this energy beats its start in Dice.

    python benchmarks/instance_optimisation.py --lambdas 1.0 0.3 --checkpoints 0 30 100

Writes ``summary.json`` and ``summary.md`` to ``--output`` (default
``benchmarks/results/instance_optimisation_val``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from diffusereg import DiffuseRegPipeline
from diffusereg.data import ACDCDataset, PaperPreprocessing
from diffusereg.evaluation import RegistrationResult, score_case, summarize, summary_markdown
from diffusereg.io import write_atomically
from diffusereg.losses import gradient_loss, ssim_loss
from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.spatial import warp


def optimise(fixed: torch.Tensor, moving: torch.Tensor, start: torch.Tensor, smoothness: float, checkpoints: list[int],
             learning_rate: float) -> dict[int, torch.Tensor]:
    """The field ``start + delta`` (voxels, ``(N, ndim, *S)``) after each of ``checkpoints`` Adam
    iterations on ``1 - SSIM(fixed, warp(moving, start + delta)) + smoothness * gradient_loss``."""
    delta = torch.zeros_like(start, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=learning_rate)
    fields = {}
    for iteration in range(max(checkpoints) + 1):
        if iteration in checkpoints:
            fields[iteration] = (start + delta).detach().clone()
        if iteration == max(checkpoints):
            break
        field = start + delta
        loss = ssim_loss(fixed, warp(moving, field)) + smoothness * gradient_loss(field)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return fields


def smooth_noise(shape: torch.Size, amplitude: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise ``(N, C, H, W)`` blurred in-plane by a Gaussian of ``sigma`` voxels (MONAI's
    :class:`~monai.networks.layers.GaussianFilter`), scaled to a root mean square of ``amplitude``
    voxels per slice and channel."""
    noise = GaussianFilter(spatial_dims=2, sigma=sigma)(torch.randn(shape, generator=generator))
    return amplitude * noise / noise.square().mean(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-8)


def energy_samples(fixed: torch.Tensor, moving: torch.Tensor, start: torch.Tensor, seeds: list[int],
                   smoothness_range: tuple[float, float], start_amplitude: float, start_sigma: float,
                   iterations: int, learning_rate: float) -> list[torch.Tensor]:
    """Several minimisers of the registration energy per pair, one per seed: each seed draws a
    smoothness weight log-uniformly from ``smoothness_range`` and an in-plane smooth displacement of
    ``start_amplitude`` voxels (blur ``start_sigma`` voxels) added to ``start``, then runs
    ``iterations`` Adam steps of :func:`optimise` from there. Where the images pin the field the
    samples meet again; where they leave it open the random start and weight survive.

    Args:
        fixed, moving: ``(N, 1, H, W)`` slices on the model grid, intensities in ``[0, 1]``.
        start: ``(N, 2, H, W)`` the field the samples are drawn around, voxels.
    Returns:
        One field ``(N, 2, H, W)`` (voxels) per seed.
    """
    samples = []
    low, high = np.log(smoothness_range[0]), np.log(smoothness_range[1])
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        smoothness = float(np.exp(low + (high - low) * torch.rand((), generator=generator).item()))
        begin = start + smooth_noise(start.shape, start_amplitude, start_sigma, generator)
        samples.append(optimise(fixed, moving, begin, smoothness, [iterations], learning_rate)[iterations])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"))
    parser.add_argument("--patients", type=int, nargs="+", help="only these validation patient numbers")
    parser.add_argument("--model", default="diffusereg/acdc-2d", help="the pipeline whose teacher starts")
    parser.add_argument("--passes", type=int, default=3, help="teacher passes of the start (1: one-shot)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.3], help="smoothness weights")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 30, 100], help="Adam iterations")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="Adam step, voxels")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/instance_optimisation_val"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    teacher = pipe.teacher.eval()
    dataset = ACDCDataset(args.data, split="val", spatial_dims=3, patients=args.patients,
                          preprocessing=PaperPreprocessing())
    rows: dict[str, list[dict[str, Any]]] = {}
    for index, name in enumerate(dataset.names):
        pair = dataset.preprocessed(index)
        batch = ModelGridBatch.from_arrays(pair.fixed, pair.moving, None, teacher.config.spatial_dims,
                                           teacher.size_multiple)
        with torch.no_grad():
            start = teacher.recursive(batch.fixed, batch.moving, args.passes)[-1]
        for smoothness in args.lambdas:
            began = time.perf_counter()
            fields = optimise(batch.fixed, batch.moving, start, smoothness, args.checkpoints, args.learning_rate)
            seconds = time.perf_counter() - began
            for iteration, field in fields.items():
                with torch.no_grad():
                    similarity = 1 - ssim_loss(batch.fixed, warp(batch.moving, field)).item()
                result = RegistrationResult(batch.to_output(field, is_field=True).numpy())
                row = score_case(pair, result, name, dataset.metadata(index)["group"], seconds)
                row["SSIM"] = similarity
                rows.setdefault(f"teacher x{args.passes} + {iteration} Adam steps, lambda {smoothness:g}", []).append(row)
        print(name, {method: round(method_rows[-1]["Overall"], 2) for method, method_rows in rows.items()}, flush=True)

    columns = ("LV", "Myo", "RV", "Overall", "NJD_percent", "SSIM")
    summaries = {method: summarize(method_rows, columns) for method, method_rows in rows.items()}
    settings = {"command": shlex.join(sys.argv), "model": args.model, "cases": dataset.names,
                "threads": args.threads, "torch": torch.__version__}
    args.output.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(summaries, columns, precise=("NJD_percent", "SSIM"))
    write_atomically(args.output / "summary.md", lambda temporary: temporary.write_text(text))
    payload = json.dumps({"settings": settings, "summary": summaries, "cases": rows}, indent=2, default=float)
    write_atomically(args.output / "summary.json", lambda temporary: temporary.write_text(payload + "\n"))
    print(text)


if __name__ == "__main__":
    main()
