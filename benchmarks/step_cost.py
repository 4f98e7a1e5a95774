"""Where the time of a sampling step goes, and what each lever of its cost saves.

For each ``--models`` pipeline, on the model-grid volumes of ACDC validation patients (the paper's
grid: 32 slices of 128 x 128, a 2D model takes them as a batch of slices), the best of
``--repeats`` wall times of:

- the parts of one cascade step: the moving image's encoder (run again on the warped image), the
  Swin network (backbone and decoder), the teacher's velocity (the proposal), integrating and
  composing the increment;
- the teacher's one-shot pass, and the whole pipeline call at each of ``--steps``;
- the same call on the slices that hold image data only (the padding of the paper's grid
  removed): the share a skip of padded slices would save;
- the step's parts under bfloat16 autocast on the CPU.

    python benchmarks/step_cost.py --models diffusereg/acdc-2d --steps 1 2 3

Writes ``summary.json`` and ``summary.md`` to ``--output`` (default ``benchmarks/results/step_cost_val``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusereg.data import ACDCDataset, PaperPreprocessing
from diffusereg.io import write_atomically
from diffusereg.pipelines import DiffuseRegPipeline, ModelGridBatch
from diffusereg.spatial import compose, integrate_velocity, warp


def best_of(repeats: int, run: Callable[[], Any]) -> float:
    """Smallest wall time of ``repeats`` runs of ``run`` after one warm-up, seconds."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.no_grad()
def step_parts(pipe: DiffuseRegPipeline, fixed: torch.Tensor, moving: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds of each part of one sampling step on the batch of slices ``(N, 1, H, W)``."""
    denoiser, teacher = pipe.denoiser, pipe.teacher
    condition = denoiser.encode_condition(fixed, moving)
    field = torch.zeros(fixed.shape[0], 2, *fixed.shape[2:])
    timestep = torch.full((fixed.shape[0],), 500)
    parts = {
        "moving encoder": best_of(repeats, lambda: denoiser.with_moving(condition, moving)),
        "Swin network": best_of(repeats, lambda: denoiser(field, timestep, condition=condition)),
        "integrate and compose": best_of(repeats, lambda: compose(field, integrate_velocity(field, 7))),
        "warp": best_of(repeats, lambda: warp(moving, field)),
    }
    if teacher is not None:
        parts["teacher velocity"] = best_of(repeats, lambda: teacher.velocity(fixed, moving))
        parts["teacher pass"] = best_of(repeats, lambda: teacher(fixed, moving))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts["Swin network, bf16"] = best_of(repeats, lambda: denoiser(field, timestep, condition=condition))
        if teacher is not None:
            parts["teacher velocity, bf16"] = best_of(repeats, lambda: teacher.velocity(fixed, moving))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"))
    parser.add_argument("--patients", type=int, nargs="+", default=[10, 50, 90], help="validation patient numbers")
    parser.add_argument("--models", nargs="+", default=["diffusereg/acdc-2d"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/step_cost_val"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = ACDCDataset(args.data, split="val", spatial_dims=3, patients=args.patients,
                          preprocessing=PaperPreprocessing())
    pairs = [dataset.preprocessed(index) for index in range(len(dataset.names))]
    results: dict[str, Any] = {}
    for name in args.models:
        pipe = DiffuseRegPipeline.from_pretrained(name)
        pipe.set_progress_bar_config(disable=True)
        rows: dict[str, list[float]] = {}
        for pair in pairs:
            batch = ModelGridBatch.from_arrays(pair.fixed, pair.moving, None, 2, pipe.denoiser.size_multiple)
            blank = (batch.fixed.amax(dim=(1, 2, 3)) == 0) & (batch.moving.amax(dim=(1, 2, 3)) == 0)
            rows.setdefault("padded slices (share)", []).append(float(blank.float().mean()))
            for part, seconds in step_parts(pipe, batch.fixed, batch.moving, args.repeats).items():
                rows.setdefault(f"step part: {part}", []).append(seconds)
            for steps in args.steps:
                for label, fixed, moving in (("all slices", pair.fixed, pair.moving),
                                             ("data slices", pair.fixed[~blank.numpy()], pair.moving[~blank.numpy()])):
                    seconds = best_of(args.repeats, lambda: pipe(fixed, moving, num_inference_steps=steps,
                                                                 generator=torch.Generator().manual_seed(0)))
                    rows.setdefault(f"DDIM {steps}, {label}", []).append(seconds)
            if pipe.teacher is not None:
                for passes in (1, 3):
                    seconds = best_of(args.repeats, lambda: pipe.teacher.recursive(batch.fixed, batch.moving, passes))
                    rows.setdefault(f"teacher x{passes}", []).append(seconds)
        results[name] = {row: float(np.mean(values)) for row, values in rows.items()}
        print(name, json.dumps(results[name], indent=1), flush=True)

    lines = ["| seconds (mean over patients) | " + " | ".join(args.models) + " |", "|---|" + "---:|" * len(args.models)]
    for row in dict.fromkeys(row for model in results.values() for row in model):
        lines.append(f"| {row} | " + " | ".join(f"{results[m].get(row, float('nan')):.3f}" for m in args.models) + " |")
    text = "\n".join(lines) + "\n"
    settings = {"command": shlex.join(sys.argv), "cases": dataset.names, "threads": args.threads,
                "repeats": args.repeats, "torch": torch.__version__}
    args.output.mkdir(parents=True, exist_ok=True)
    write_atomically(args.output / "summary.md", lambda temporary: temporary.write_text(text))
    payload = json.dumps({"settings": settings, "seconds": results}, indent=2)
    write_atomically(args.output / "summary.json", lambda temporary: temporary.write_text(payload + "\n"))
    print(text)


if __name__ == "__main__":
    main()
