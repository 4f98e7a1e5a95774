"""ACDC benchmark: identity, ANTs SyN, the teacher network and diffusereg, on the same cases, in one process.

Run (from the repository root, ACDC beside the checkout):

    python benchmarks/acdc.py --data ../shared/data/acdc/training --split val \
        --model diffusereg/acdc-2d --output benchmarks/results/acdc_val

Methods (each on every case of the split, paper protocol, see ``diffusereg.evaluation``):
identity; ANTs SyN (``antspyx``, ``pip install -e ".[baselines]"``; skipped with a message when
absent); the model's teacher component one-shot and applied K times recursively (``--teacher-passes``:
warp the moving image by the field so far, register again, compose); diffusereg with DDIM at
``--ddim-steps``, with and without the ``EarlyStopping`` callback; optionally other models
(``--baseline-models``, e.g. the paper-recipe ``diffusereg/acdc-2d-paper``) at the same steps,
DDPM over the full 2000 steps on the first ``--ddpm-cases`` cases, and DDIM started from the
teacher's field (``--refine-strengths``). ``--bf16`` adds the teacher and DDIM rows again with the
pipeline loaded in bfloat16 (diffusers' ``dtype``: the networks' weights and arithmetic; fields, warps and
composition stay float32 in the pipeline, the teacher's recursion runs in bfloat16). ``--fixed-frames ED ES`` runs every method in both
directions (ED fixed, the paper's, and ES fixed), each row then labelled ``[ED fixed]`` or
``[ES fixed]``; the extras (DDPM, the curve, the forward timing) use the first frame given.

Writes ``cases.csv``, ``summary.json`` and ``summary.md`` to ``--output`` and prints the table,
with, for each diffusion method, the ratio of its sampling time to (steps run x one denoiser
forward on the same batch) and the peak resident memory of the process; with ``--curve-steps
K`` also the Overall Dice after each of K DDIM steps, averaged over the cases (``curve.json``,
``curve.png``).
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusereg.callbacks import EarlyStopping, TrajectoryRecorder
from diffusereg.data import ACDCDataset
from diffusereg.evaluation import (RegistrationResult, Registrar, ants_syn_registrar, evaluate, identity_registrar,
                                   pipeline_registrar, score_case, summary_markdown, teacher_registrar,
                                   write_evaluation)
from diffusereg.io import write_atomically
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import scheduler_of_kind


def denoiser_forward_seconds(pipe: DiffuseRegPipeline, fixed: np.ndarray, moving: np.ndarray, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of one full denoiser forward (image encoder included, as a loop that
    does not reuse image features pays at every step) on the batch the pipeline builds for this pair."""
    batch = pipe.prepare_batch(fixed, moving)
    with torch.no_grad():
        sample = torch.randn(batch.fixed.shape[0], pipe.spatial_dims, *batch.fixed.shape[2:])
        timestep = torch.full((sample.shape[0],), 999)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            pipe.denoiser(sample, timestep, fixed=batch.fixed, moving=batch.moving)
            times.append(time.perf_counter() - started)
    return min(times)


def dice_curve(pipe: DiffuseRegPipeline, dataset: ACDCDataset, steps: int, seed: int, output: Path) -> dict[str, Any]:
    """Overall Dice (and NJD %) of the clean-field estimate after each of ``steps`` DDIM steps, per
    case and averaged over the cases; writes ``curve.png`` into ``output`` and returns the numbers."""
    per_case = []
    for index, name in enumerate(dataset.names):
        pair = dataset.preprocessed(index)
        recorder = TrajectoryRecorder()
        pipe(pair.fixed, pair.moving, num_inference_steps=steps, callback_on_step_end=recorder,
             generator=torch.Generator().manual_seed(seed))
        per_case.append([score_case(pair, RegistrationResult(field[0].numpy()), name, "", 0.0)
                         for field in recorder.fields])
    curve = {"steps": list(range(1, steps + 1)),
             "Overall": [float(np.mean([case[k]["Overall"] for case in per_case])) for k in range(steps)],
             "NJD_percent": [float(np.mean([case[k]["NJD_percent"] for case in per_case])) for k in range(steps)],
             "per_case_Overall": {name: [row["Overall"] for row in case] for name, case in zip(dataset.names, per_case)}}
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.4), layout="tight")
    ax = figure.subplots()
    for name, values in curve["per_case_Overall"].items():
        ax.plot(curve["steps"], values, color="0.75", linewidth=0.8)
    ax.plot(curve["steps"], curve["Overall"], color="tab:blue", linewidth=2, marker="o", label="mean over cases")
    ax.set_xlabel(f"DDIM step (of {steps})")
    ax.set_ylabel("Overall Dice (%)")
    ax.set_title(f"{len(dataset.names)} ACDC cases: Dice after each step")
    ax.legend(loc="lower right")
    output.mkdir(parents=True, exist_ok=True)
    write_atomically(output / "curve.png", lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    return curve


def teacher_name(passes: int) -> str:
    """The benchmark row of the teacher applied ``passes`` times recursively."""
    return "teacher (one-shot)" if passes == 1 else f"teacher x{passes} (recursive)"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"))
    parser.add_argument("--split", choices=("val", "train", "all"), default="val")
    parser.add_argument("--patients", type=int, nargs="+", help="only these patient numbers")
    parser.add_argument("--fixed-frames", nargs="+", choices=("ED", "ES"), default=["ED"],
                        help="register onto these frames (ED: the paper's direction; several: rows per direction)")
    parser.add_argument("--model", default="diffusereg/acdc-2d")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/acdc_val"))
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--early-stopping", type=float, default=0.02, help="EarlyStopping tolerance (voxels)")
    parser.add_argument("--teacher-passes", type=int, nargs="*", default=[1, 2, 3, 4],
                        help="rows of the teacher applied this many times recursively (1: one-shot)")
    parser.add_argument("--baseline-models", nargs="*", default=[], help="other pipelines, at --baseline-steps")
    parser.add_argument("--baseline-steps", type=int, nargs="*", default=[1, 10])
    parser.add_argument("--curve-steps", type=int, default=0, help="record Overall Dice after each of K DDIM steps")
    parser.add_argument("--refine-strengths", type=float, nargs="*", default=[],
                        help="also start DDIM (--refine-steps) from the teacher's field at these strengths")
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--ddpm-cases", type=int, default=0, help="cases for the full-length DDPM run (0: skip)")
    parser.add_argument("--skip", nargs="*", default=[], help="method names to leave out (e.g. 'ANTs SyN')")
    parser.add_argument("--bf16", action="store_true", help="also the teacher and DDIM rows with the pipeline in bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    datasets = {frame: ACDCDataset(args.data, split=args.split, spatial_dims=3, patients=args.patients,
                                   preprocessing=pipe.preprocessing, fixed_frame=frame)
                for frame in dict.fromkeys(args.fixed_frames)}
    dataset = next(iter(datasets.values()))
    spacing = pipe.preprocessing.model_grid(dataset.case(0).fixed.grid).model.axis_spacing

    methods: dict[str, Registrar | None] = {"identity": identity_registrar}
    methods["ANTs SyN"] = None
    if "ANTs SyN" not in args.skip:
        try:
            methods["ANTs SyN"] = ants_syn_registrar(spacing, args.threads)
        except ImportError as error:
            print(f"ANTs SyN skipped: {error}", file=sys.stderr)
    if pipe.teacher is not None:  # a model without a teacher component has no teacher rows
        for passes in args.teacher_passes:
            methods[teacher_name(passes)] = teacher_registrar(pipe.teacher, passes=passes)
        for strength in args.refine_strengths:
            methods[f"teacher + DDIM {args.refine_steps} from strength {strength:g}"] = pipeline_registrar(
                pipe, args.refine_steps, seed=args.seed, init_field="teacher", strength=strength)
    stopper = EarlyStopping(tolerance=args.early_stopping)
    for steps in args.ddim_steps:
        methods[f"DDIM {steps}"] = pipeline_registrar(pipe, steps, seed=args.seed)
        if steps >= 5:
            methods[f"DDIM {steps} + EarlyStopping({args.early_stopping:g})"] = pipeline_registrar(
                pipe, steps, seed=args.seed, callback_on_step_end=stopper)
    if args.bf16:
        half = DiffuseRegPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
        half.set_progress_bar_config(disable=True)
        if half.teacher is not None:
            for passes in args.teacher_passes:
                methods[f"{teacher_name(passes)}, bf16"] = teacher_registrar(half.teacher, passes=passes)
        for steps in args.ddim_steps:
            methods[f"DDIM {steps}, bf16"] = pipeline_registrar(half, steps, seed=args.seed)
    for baseline in args.baseline_models:
        other = DiffuseRegPipeline.from_pretrained(baseline)
        other.set_progress_bar_config(disable=True)
        for steps in args.baseline_steps:
            methods[f"{baseline}: DDIM {steps}"] = pipeline_registrar(other, steps, seed=args.seed)

    rows: dict[str, list[dict[str, Any]]] = {}
    for frame, frame_dataset in datasets.items():
        for name, registrar in methods.items():
            if registrar is None or name in args.skip:
                continue
            row_name = name if len(datasets) == 1 else f"{name} [{frame} fixed]"
            rows[row_name] = evaluate(frame_dataset, registrar, description=row_name)
    if args.ddpm_cases > 0 and "DDPM 2000" not in args.skip:
        subset = ACDCDataset(args.data, split=args.split, spatial_dims=3, patients=dataset.names[:args.ddpm_cases],
                             preprocessing=pipe.preprocessing, fixed_frame=dataset.fixed_frame)
        pipe.scheduler = scheduler_of_kind(pipe.scheduler, "ddpm")
        ddpm = pipeline_registrar(pipe, 2000, seed=args.seed)
        rows[f"DDPM 2000 ({args.ddpm_cases} cases)"] = evaluate(subset, ddpm, description="DDPM 2000")
        pipe.scheduler = scheduler_of_kind(pipe.scheduler, "ddim")

    pair = dataset.preprocessed(0)
    forward = denoiser_forward_seconds(pipe, pair.fixed, pair.moving)
    overhead = {name: float(np.mean([row["seconds"] / (row["steps_run"] * forward) for row in method_rows]))
                for name, method_rows in rows.items() if method_rows[0]["steps_run"]}
    settings = {"data": str(args.data), "split": args.split, "cases": dataset.names, "model": args.model,
                "fixed_frames": list(datasets),
                "seed": args.seed, "threads": args.threads, "denoiser_forward_seconds": forward,
                "sampling_time_over_steps_x_forward": overhead, "peak_rss_mib": peak_rss_mib(),
                "torch": torch.__version__, "command": shlex.join(sys.argv)}
    if args.curve_steps > 0:
        settings["curve"] = dice_curve(pipe, dataset, args.curve_steps, args.seed, args.output)
    summaries = write_evaluation(args.output, rows, settings)
    print(summary_markdown(summaries))
    print(f"one denoiser forward on a case's batch: {forward:.3f} s; peak RSS {peak_rss_mib():.0f} MiB")
    for name, ratio in overhead.items():
        print(f"{name}: sampling time / (steps run x one forward) = {ratio:.3f}")

if __name__ == "__main__":
    main()
