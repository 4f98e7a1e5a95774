"""Parameters, forward time, forward+backward time and peak memory of the diffusereg networks on CPU.

Usage::

    python benchmarks/denoiser.py            # all cases, markdown table on stdout
    python benchmarks/denoiser.py --repeats 5 --threads 2

Each case runs in its own subprocess so that the peak resident memory (``ru_maxrss``) belongs to
that case alone. "peak RSS" is the whole process (Python + torch + model + activations);
"train step memory" is the growth of RSS from the built model and inputs to the peak of a
forward+backward pass. Times are the best of ``--repeats`` runs after one warm-up (the minimum is
the least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

CASES: dict[str, tuple[str, int, tuple[int, ...], int]] = {
    # name: (model, spatial_dims, spatial shape, batch)
    "DiffuseReg 2D": ("diffusereg", 2, (128, 128), 1),
    "DiffuseReg 2D b8": ("diffusereg", 2, (128, 128), 8),
    "DiffuseReg 3D": ("diffusereg", 3, (32, 128, 128), 1),
    "UNet 2D": ("unet", 2, (128, 128), 1),
    "UNet 2D b8": ("unet", 2, (128, 128), 8),
    "UNet 3D": ("unet", 3, (32, 128, 128), 1),
    "Teacher 2D": ("teacher", 2, (128, 128), 1),
    "Teacher 2D b8": ("teacher", 2, (128, 128), 8),
    "Teacher 3D": ("teacher", 3, (32, 128, 128), 1),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(name: str, repeats: int, threads: int) -> dict[str, float | str]:
    """Build one model with its defaults and time it; returns the table row."""
    from diffusereg.models import ConditionalUNetDenoiser, DiffuseRegDenoiser, RegistrationNet

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    kind, spatial_dims, shape, batch = CASES[name]
    torch.manual_seed(0)
    model = {"diffusereg": DiffuseRegDenoiser, "unet": ConditionalUNetDenoiser, "teacher": RegistrationNet}[kind](
        spatial_dims=spatial_dims
    )
    fixed, moving = torch.rand(batch, 1, *shape), torch.rand(batch, 1, *shape)
    sample, timestep = torch.randn(batch, spatial_dims, *shape), torch.randint(0, 1000, (batch,))

    def forward() -> torch.Tensor:
        if kind == "teacher":
            return model(fixed, moving)
        return model(sample, timestep, fixed, moving).sample

    def timed(step: object) -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            step()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times[1:])

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        forward().square().mean().backward()

    with torch.no_grad():
        forward_s = timed(forward)
    rss_built = _rss_mib()
    train_s = timed(train_step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": name,
        "input": f"{batch} x {'x'.join(map(str, shape))}",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_s": forward_s,
        "train_step_s": train_s,
        "peak_rss_MiB": peak,
        "train_mem_MiB": peak - rss_built,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case and print it as JSON")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats, args.threads)))
        return
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats} after 1 warm-up, load {load:.1f}\n")
    print(
        "| model | input (B x S) | params (M) | forward (s) | forward+backward (s) | peak RSS (MiB) "
        "| train step memory (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in CASES:
        command = [sys.executable, __file__, "--case", name, "--repeats", str(args.repeats)]
        result = subprocess.run([*command, "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {row['case']} | {row['input']} | {row['params_M']:.2f} | {row['forward_s']:.3f} | "
            f"{row['train_step_s']:.3f} | {row['peak_rss_MiB']:.0f} | {row['train_mem_MiB']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
