"""Sampling cost of DiffuseRegPipeline against its denoiser, and what computing image features once saves.

Run:  python benchmarks/pipeline_overhead.py [--size 128] [--steps 10] [--threads 2]

Prints, for the default 2D denoiser (random weights: speed does not depend on training):
the time of ``encode_condition``, of one denoiser step given precomputed features, of one step
that re-encodes the images (what a loop without feature reuse pays), of a whole pipeline call,
and the ratio of the call to ``steps x`` one full forward.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusereg.models import DiffuseRegDenoiser
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import default_scheduler


def best_of(repeats: int, fn) -> float:
    """Smallest wall time of ``repeats`` runs of ``fn``, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    denoiser = DiffuseRegDenoiser(spatial_dims=2).eval()
    pipe = DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, args.size, args.size, generator=generator)
    moving = torch.rand(1, 1, args.size, args.size, generator=generator)
    field = torch.randn(1, 2, args.size, args.size, generator=generator)
    timestep = torch.tensor([999])

    with torch.no_grad():
        condition = denoiser.encode_condition(fixed, moving)
        encode = best_of(args.repeats, lambda: denoiser.encode_condition(fixed, moving))
        step_reuse = best_of(args.repeats, lambda: denoiser(field, timestep, condition=condition))
        step_full = best_of(args.repeats, lambda: denoiser(field, timestep, fixed=fixed, moving=moving))
    call = best_of(args.repeats, lambda: pipe(fixed[0, 0], moving[0, 0], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)))

    print(f"2D default denoiser, {args.size}x{args.size}, {args.steps} DDIM steps, {args.threads} threads")
    print("| quantity | seconds |")
    print("|---|---|")
    print(f"| encode_condition (image encoder, once per call) | {encode:.4f} |")
    print(f"| one step, features reused | {step_reuse:.4f} |")
    print(f"| one step, images re-encoded | {step_full:.4f} |")
    print(f"| pipeline call, {args.steps} steps | {call:.4f} |")
    print(f"| {args.steps} x one full forward | {args.steps * step_full:.4f} |")
    print(f"| ratio call / ({args.steps} x full forward) | {call / (args.steps * step_full):.3f} |")
    print(f"| saved by reusing features over {args.steps} steps | {(args.steps - 1) * encode:.4f} |")


if __name__ == "__main__":
    main()
