"""Reliability under load: a long ``--pairs`` batch (resident memory), a killed batch resumed, a full
disk, and two processes writing into one output folder.

Run:  python benchmarks/reliability_load.py [--pairs 200] [--resume-pairs 60] [--work /tmp/reliability-load]

Every registration goes through the command line as a user runs it (``python -m diffusereg.cli
register``), in a child process. The pairs are small cardiac phantoms (2 slices of 64 x 64,
``diffusereg.phantom``), the model a small denoiser with random weights on a 2 x 32 x 32 model grid
(memory use and fault handling do not depend on training; a trained model only makes each pair
slower). Prints one section per check, the figures ``docs/reliability.md`` quotes.

- memory: resident set size (RSS) of the batch process, sampled every 0.2 s, against the number
  of finished pairs (folders holding ``metrics.json``);
- kill and resume: a batch of the first ``--resume-pairs`` pairs, SIGKILL once a third of them
  are finished, then the same command again;
- full disk: a 64 KiB tmpfs as the output folder (needs root and ``mount``; skipped otherwise);
- two processes: both started at once into one folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from diffusereg.models import DiffuseRegDenoiser
from diffusereg.phantom import write_phantom
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import default_scheduler

PHANTOM_SHAPE = (2, 64, 64)


def small_model(folder: Path) -> Path:
    """A 2D pipeline with a small random denoiser on a 3 x 3 x 10 mm, 2 x 32 x 32 model grid."""
    torch.manual_seed(0)
    denoiser = DiffuseRegDenoiser(spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                  field_mean=[0.0, 0.0], field_std=[0.02, 0.02]).eval()
    pipe = DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim", denoiser.config.prediction_type),
                              model_spacing=(3.0, 3.0, 10.0), model_size=(2, 32, 32))
    pipe.save_pretrained(folder)
    return folder


def pair_list(folder: Path, count: int) -> Path:
    """``count`` phantom pairs (seeds 0..count-1) and their list ``pairs_COUNT.csv``."""
    rows = ["name,fixed,moving"]
    for seed in range(count):
        name = f"pair{seed:03d}"
        if not (folder / name / "moving.nii.gz").is_file():
            write_phantom(folder / name, seed=seed, shape=PHANTOM_SHAPE)
        rows.append(f"{name},{name}/fixed.nii.gz,{name}/moving.nii.gz")
    (folder / f"pairs_{count}.csv").write_text("\n".join(rows) + "\n")
    return folder / f"pairs_{count}.csv"


def register_command(*arguments: str | Path) -> list[str]:
    return [sys.executable, "-m", "diffusereg.cli", "register", *map(str, arguments), "--steps", "1",
            "--device", "cpu"]


def finished(output: Path) -> int:
    return sum(1 for _ in output.glob("*/metrics.json"))


def memory(pairs: Path, model: Path, output: Path) -> None:
    """RSS of one batch process against finished pairs."""
    started = time.monotonic()
    process = subprocess.Popen(register_command("--pairs", pairs, "-o", output, "--model", model),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = psutil.Process(process.pid)
    samples: list[tuple[int, float]] = []  # (finished pairs, RSS MiB)
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        if rss > 0:  # an exited process not yet reaped reads 0
            samples.append((finished(output), rss))
        time.sleep(0.2)
    total = finished(output)
    print(f"## memory: {total} pairs in {time.monotonic() - started:.0f} s, exit code {process.returncode}")

    def peak_until(pairs_done: int) -> float:
        return max(rss for done, rss in samples if done <= pairs_done)

    for mark in (1, 10, 20, 50, 100, 150, total):
        if mark <= total:
            print(f"peak RSS until {mark:>3} pairs finished: {peak_until(mark):7.1f} MiB")
    after = [rss for done, rss in samples if done >= 20]
    if after:
        print(f"RSS from pair 20 to the end: {min(after):.1f} .. {max(after):.1f} MiB "
              f"(growth {max(after) - after[0]:+.1f} MiB over {total - 20} pairs)")


def kill_and_resume(pairs: Path, model: Path, output: Path, count: int) -> None:
    """SIGKILL the batch once a third of the pairs are done, then run the same command again."""
    process = subprocess.Popen(register_command("--pairs", pairs, "-o", output, "--model", model),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while finished(output) < count // 3 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = finished(output)
    started = [folder for folder in output.iterdir() if folder.is_dir()]
    partial = [folder.name for folder in started if not (folder / "metrics.json").is_file()]
    print(f"## kill and resume: killed with {done} of {count} pairs finished; unfinished folders left: "
          f"{partial or 'none'} (files: {[p.name for f in partial for p in (output / f).iterdir()]})")
    result = subprocess.run(register_command("--pairs", pairs, "-o", output, "--model", model), capture_output=True,
                            text=True)
    print(f"resumed: exit code {result.returncode}: {result.stdout.strip()}")
    complete = all(sorted(p.name for p in folder.iterdir()) == sorted(json.loads(
        (folder / "metrics.json").read_text())["outputs"]) for folder in output.iterdir() if folder.is_dir())
    print(f"after resuming: {finished(output)} of {count} pairs finished, every folder exactly its outputs: {complete}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def full_disk(pairs_folder: Path, model: Path, mount_point: Path) -> None:
    """One registration into a tmpfs too small for its outputs."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        print(f"## full disk: skipped, cannot mount a tmpfs ({mounted.stderr.strip()})")
        return
    try:
        fixed, moving = pairs_folder / "pair000" / "fixed.nii.gz", pairs_folder / "pair000" / "moving.nii.gz"
        before = {path: digest(path) for path in (fixed, moving)}
        result = subprocess.run(register_command(fixed, moving, "-o", mount_point / "out", "--model", model),
                                capture_output=True, text=True)
        left = sorted(str(p.relative_to(mount_point)) for p in mount_point.rglob("*"))
        print(f"## full disk (64 KiB tmpfs): exit code {result.returncode}; "
              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no message'}")
        print(f"left in the output folder: {left}; inputs unchanged: {before == {p: digest(p) for p in before}}")
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def two_processes(pairs_folder: Path, model: Path, output: Path) -> None:
    """Two registrations (other seeds) started at once into one folder."""
    fixed, moving = pairs_folder / "pair001" / "fixed.nii.gz", pairs_folder / "pair001" / "moving.nii.gz"
    processes = [subprocess.Popen(register_command(fixed, moving, "-o", output, "--model", model, "--seed", str(seed)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(process.wait(), process.stderr.read().strip().splitlines()) for process in processes]
    print("## two processes, one folder: " + "; ".join(
        f"exit code {code}" + (f" ({lines[-1]})" if code else "") for code, lines in results))
    metrics = json.loads((output / "metrics.json").read_text())
    files = sorted(p.name for p in output.iterdir())
    print(f"folder holds exactly the outputs of the seed-{metrics['seed']} run: {files == sorted(metrics['outputs'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs in the memory batch (default: 200)")
    parser.add_argument("--resume-pairs", type=int, default=60, help="pairs in the killed batch (default: 60)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reliability-load"), help="scratch folder")
    args = parser.parse_args()
    for name in ("memory", "resume", "shared"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = small_model(args.work / "model")
    pairs = pair_list(args.work / "pairs", args.pairs)
    print(f"{args.pairs} phantom pairs of {' x '.join(map(str, PHANTOM_SHAPE))} voxels, {os.cpu_count()} CPUs")
    memory(pairs, model, args.work / "memory")
    kill_and_resume(pair_list(args.work / "pairs", args.resume_pairs), model, args.work / "resume", args.resume_pairs)
    full_disk(args.work / "pairs", model, args.work / "tmpfs")
    two_processes(args.work / "pairs", model, args.work / "shared")


if __name__ == "__main__":
    main()
