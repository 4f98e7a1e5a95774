"""Register two images, print every sampling step, and stop early with a custom callback.

Run:  python examples/early_stopping.py [--model PATH_OR_HUB_ID]

Without --model the script builds an untrained pipeline so that it runs anywhere; its fields are
then meaningless, but the control flow (per-step printing, stopping) is the same.
"""

from __future__ import annotations

import argparse

import torch

from diffusereg import DiffuseRegDenoiser, DiffuseRegPipeline, default_scheduler


def two_discs(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc (fixed) and a smaller, shifted one (moving), intensities in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fixed = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 4) ** 2).float()
    moving = ((yy - size / 2 - 4) ** 2 + (xx - size / 2 + 3) ** 2 <= (size / 5) ** 2).float()
    return 0.1 + 0.8 * fixed, 0.1 + 0.8 * moving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="directory or Hub id of a trained pipeline")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    if args.model:
        pipe = DiffuseRegPipeline.from_pretrained(args.model)
    else:
        print("no --model given: using an untrained 2D pipeline (fields are not meaningful)")
        pipe = DiffuseRegPipeline(denoiser=DiffuseRegDenoiser(spatial_dims=2), scheduler=default_scheduler())
    fixed, moving = two_discs()

    previous: list[torch.Tensor] = []

    def watch_and_stop(pipe, step, timestep, kwargs):
        x0 = kwargs["x0"]
        change = (x0 - previous[-1]).abs().mean().item() if previous else float("nan")
        previous.append(x0.clone())
        error = (kwargs["warped"] - fixed).abs().mean().item()
        print(f"step {step:3d}  t={int(timestep):4d}  change of field {change:7.4f} vx  |warped - fixed| {error:.4f}")
        if step >= 4 and change < 0.01:
            print("field has settled: stopping")
            pipe.interrupt = True
        return kwargs

    out = pipe(fixed, moving, num_inference_steps=args.steps, callback_on_step_end=watch_and_stop,
               callback_on_step_end_tensor_inputs=["x0", "warped"], generator=torch.Generator().manual_seed(0))
    print(f"ran {out.num_steps_run} of {args.steps} steps; field {tuple(out.field.shape)}, "
          f"max displacement {out.field.abs().max():.2f} voxels")


if __name__ == "__main__":
    main()
