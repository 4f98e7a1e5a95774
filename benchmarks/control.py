"""Control you can measure: guidance and early stopping on ACDC validation cases.

Run (from the repository root, ACDC beside the checkout); the defaults are the settings of the
published run, ``benchmarks/results/control_val`` (the shipped model at the library's default steps):

    python benchmarks/control.py

Every case of the validation split (``--patients`` to restrict) is registered once per seed
(``--seeds``) without guidance ("none", ``--steps`` DDIM steps), and every configuration below is
compared with it on the same case and seed (so the same initial noise); registration and scoring
follow the paper's protocol (:mod:`diffusereg.evaluation`, model grid, Dice in percent). Rows
named ``--guidance SPECS`` use exactly the guides ``diffusereg register --guidance SPECS`` builds.

- folds: ``--guidance folds`` (``FoldGuidance``) and ``--guidance smoothness=S`` for each of
  ``--smoothness-scales``: NJD %, JSD, bending energy, Overall Dice.
- similarity: ``--guidance similarity`` and ``--guidance similarity folds``; then
  ``SimilarityGuidance`` with an unsmoothed gradient (``sigma=0``) at ``--raw-similarity-scale``,
  alone and followed by ``FoldGuidance()``, which shows the fold control where there are folds;
  and ``SimilarityGuidance(scale, sigma)`` for each of ``--similarity-settings`` (how the defaults
  were chosen).
- organ: ``OrganMaskGuidance(fixed_mask)`` targeting LV, Myo and RV, the mask taken from the fixed
  labels only (what a user with a segmentation of the fixed image has), at each of
  ``--organ-scales``; and, in separate rows, ``OrganMaskGuidance(fixed_mask, moving_mask)`` for
  ``--organ-both-targets``. The guiding fixed mask is the ground truth that the targeted
  structure's Dice is scored with; the two other structures (``d_others``) and the image
  similarity (``d_SSIM``) are scored with nothing the guide saw.
- direction: ``DirectionGuidance`` asking the mean displacement inside the fixed ``--direction-region``
  to be the unguided one plus ``--direction-offset`` voxels (in-plane, rows and columns); angle
  (degrees) and relative magnitude error of the achieved mean against the prescribed one.
- early-stopping: ``EarlyStopping`` at each of ``--early-stopping-tolerances`` on the ``--steps``
  and ``--early-stopping-steps`` schedules: steps saved (%) and Overall Dice change against the
  full schedule. Each schedule is sampled once in full (``TrajectoryRecorder``) and every rule is
  replayed on the recorded clean-field estimates: DDIM sampling is deterministic and the steps
  before a stop are the same with or without it, so the replay returns exactly the field a
  stopped run returns.

Cost per case and seed, counted in ``--steps``-step single-sample registrations: 1 (none)
+ 1 + smoothness scales + 4 (similarity) + similarity settings + 3 x organ scales + organ-both targets + direction
scales + early-stopping-steps / steps; 14 with the defaults. ``--sections`` picks sections.

The spread of the samples (the ``sample_spread`` output) and whether it flags errors is measured by
``benchmarks/uncertainty.py``; this script's ``uncertainty`` section moved there.

Writes to ``--output``: ``control.json`` (settings, per-case rows, summaries and seconds per
section), ``control.md`` (one table per kind of control, also printed) and one PNG per
kind of control for one slice of one case (``--figure-patient``, ``--figure-slice``).
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from diffusereg import DEFAULT_STEPS
from diffusereg.callbacks import EarlyStopping, TrajectoryRecorder
from diffusereg.data import ACDCDataset, PreprocessedPair
from diffusereg.evaluation import (RegistrationResult, pipeline_registrar, score_case, summarize, summary_markdown,
                                   warp_moving_labels)
from diffusereg.guidance import (DirectionGuidance, FoldGuidance, Guide, GuidanceSpec, OrganMaskGuidance,
                                 SimilarityGuidance, build_guides)
from diffusereg.metrics import ACDC_LABELS, acdc_dice
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import scheduler_of_kind
from diffusereg.losses import gradient_loss, ssim_loss
from diffusereg.spatial import jacobian_determinant, warp
from diffusereg.visualize import LABEL_COLOURS
from reporting import FigureSlice, figure_case_name, new_figure, run_settings, save_figure, write_report

SECTIONS = ("folds", "similarity", "organ", "direction", "early-stopping")
ORGANS = ("LV", "Myo", "RV")

SECTION_COLUMNS: dict[str, tuple[str, ...]] = {
    "folds": ("Overall", "d_Overall", "NJD_percent", "d_NJD_percent", "JSD", "d_JSD", "bending", "d_bending",
              "field_change", "seconds"),
    "similarity": ("Overall", "d_Overall", "NJD_percent", "d_NJD_percent", "SSIM", "d_SSIM", "field_change", "seconds"),
    "organ": ("LV", "Myo", "RV", "Overall", "d_target", "d_others", "d_Overall", "d_SSIM", "NJD_percent",
              "field_change"),
    "direction": ("angle_error_deg", "magnitude_error", "residual_voxels", "Overall", "d_Overall", "NJD_percent",
                  "field_change"),
    "early-stopping": ("steps_run", "steps_saved_percent", "Overall", "d_Overall", "NJD_percent", "field_change"),
}
"""Table columns of each section. ``d_<c>``: the configuration minus its reference on the same case
and seed (none; the full schedule for early stopping). ``field_change``: mean length of the field
difference to that reference inside the fixed heart, voxels. ``bending``: mean squared in-plane
field gradient (voxels^2, :func:`~diffusereg.losses.gradient_loss`). ``SSIM``: SSIM in percent of
the warped moving image and the fixed image (window 9, slice by slice). ``magnitude_error``: |achieved| /
|prescribed| - 1."""

PRECISE_COLUMNS = ("NJD_percent", "d_NJD_percent", "JSD", "d_JSD", "bending", "d_bending", "field_change",
                   "magnitude_error")


@dataclass(frozen=True)
class Case:
    """One registration problem: a preprocessed ACDC pair (model grid ``(D, H, W)``) and the seed of its noise."""

    name: str
    group: str
    seed: int
    pair: PreprocessedPair


@dataclass
class Run:
    """One configuration registered on one case.

    Attributes:
        result: field ``(3, D, H, W)`` in voxels of the model grid, steps run.
        row: the evaluation row (``CASE_COLUMNS``, Dice in %) plus ``config``, ``seed`` and the
            section's own columns.
        trajectory: the clean-field estimate of every step as ``TrajectoryRecorder`` keeps it,
            ``(1, 3, D, H, W)`` (one sample, the call's output layout), voxels, CPU; recorded only
            where a section needs it.
    """

    result: RegistrationResult
    row: dict[str, Any]
    trajectory: list[torch.Tensor] = field(default_factory=list)


Section = Callable[[DiffuseRegPipeline, Case, Run, argparse.Namespace], list[Run]]


# ---------------------------------------------------------------------------------------------- helpers
def label_mask(labels: np.ndarray, structure: str) -> np.ndarray:
    """Float32 0/1 mask ``(D, H, W)`` of one ACDC structure (``"LV"``, ``"Myo"`` or ``"RV"``)."""
    return (labels == ACDC_LABELS[structure]).astype(np.float32)


def scored(case: Case, config: str, result: RegistrationResult, seconds: float) -> Run:
    """Score ``result`` on ``case`` with the evaluation protocol; the row gets ``config``, ``seed``,
    ``SSIM`` (%) and ``bending`` (see :data:`SECTION_COLUMNS`)."""
    row = score_case(case.pair, result, case.name, case.group, seconds)
    field = torch.from_numpy(np.asarray(result.field, dtype=np.float32))[None]  # (1, 3, D, H, W)
    warped = warp(torch.from_numpy(case.pair.moving)[None, None], field)[0].movedim(1, 0)  # (D, 1, H, W)
    fixed = torch.from_numpy(case.pair.fixed)[:, None]
    in_plane = field[0, 1:].movedim(1, 0)  # (D, 2, H, W)
    row.update(config=config, seed=case.seed, SSIM=100.0 * (1.0 - float(ssim_loss(warped, fixed))),
               bending=float(gradient_loss(in_plane)))
    return Run(result, row)


def register(pipe: DiffuseRegPipeline, case: Case, config: str, steps: int, record: bool = False,
             **call_kwargs: Any) -> Run:
    """Register ``case`` with ``steps`` steps and the case's seed, ``call_kwargs`` going to the pipeline
    (``guidance``), and score it; ``record`` keeps the clean-field estimate of every step."""
    recorder = TrajectoryRecorder() if record else None
    if recorder is not None:
        call_kwargs["callback_on_step_end"] = recorder
    started = time.perf_counter()
    result = pipeline_registrar(pipe, steps, seed=case.seed, **call_kwargs)(case.pair.fixed, case.pair.moving)
    run = scored(case, config, result, time.perf_counter() - started)
    if recorder is not None:
        run.trajectory = recorder.fields
    return run


def differences(run: Run, reference: Run, case: Case, columns: Sequence[str]) -> dict[str, float]:
    """``d_<c>`` = run minus reference for each of ``columns``, and ``field_change``: the mean length
    of the field difference inside the fixed heart, voxels."""
    heart = case.pair.fixed_labels > 0
    change = np.linalg.norm(run.result.field - reference.result.field, axis=0)[heart]
    out = {f"d_{column}": run.row[column] - reference.row[column] for column in columns}
    out["field_change"] = float(change.mean()) if change.size else math.nan
    return out


def guided(pipe: DiffuseRegPipeline, case: Case, none: Run, config: str, steps: int, guides: list[Guide],
           columns: Sequence[str]) -> Run:
    """Register ``case`` with ``guides`` (acting in turn) and add its :func:`differences` to the run ``none``."""
    run = register(pipe, case, config, steps, guidance=guides)
    run.row.update(differences(run, none, case, columns))
    return run


def replay_early_stopping(rule: EarlyStopping, trajectory: Sequence[torch.Tensor]) -> int | None:
    """The step at which ``rule`` stops a run whose clean-field estimates were ``trajectory``, or None.

    The rule sees each recorded ``x0`` as it would during sampling; its ``pipe.interrupt = True``
    lands on a stand-in. ``EarlyStopping`` ignores the timestep, passed as -1.
    """
    probe = SimpleNamespace(interrupt=False)
    for step, x0 in enumerate(trajectory):
        rule(probe, step, -1, {"x0": x0})
        if probe.interrupt:
            return step
    return None


def region_mean(displacement: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Mean displacement ``(3,)`` (voxels, array-axis order) of a field ``(3, *S)`` over a boolean region ``(*S)``."""
    return displacement[:, region].mean(axis=1)


def direction_errors(achieved: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Angle (degrees), relative magnitude error (|achieved| / |target| - 1) and distance (voxels)
    of an achieved mean displacement ``(3,)`` against the prescribed one; NaN angle for a zero vector."""
    length, target_length = float(np.linalg.norm(achieved)), float(np.linalg.norm(target))
    if length * target_length > 1e-12:
        angle = math.degrees(math.acos(np.clip(achieved @ target / (length * target_length), -1.0, 1.0)))
    else:
        angle = math.nan
    return {"angle_error_deg": angle,
            "magnitude_error": length / target_length - 1.0 if target_length > 1e-12 else math.nan,
            "residual_voxels": float(np.linalg.norm(achieved - target)),
            "mean_displacement": achieved.tolist(), "target_displacement": target.tolist()}


@contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``seconds[key]``."""
    started = time.perf_counter()
    yield
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- sections
def cli_guides(specs: str) -> list[Guide]:
    """The guides ``diffusereg register --guidance SPECS`` uses (``specs`` space-separated, no labels)."""
    return build_guides([GuidanceSpec.parse(text) for text in specs.split()], None)


def folds_runs(pipe: DiffuseRegPipeline, case: Case, none: Run, args: argparse.Namespace) -> list[Run]:
    """None, the fold control as ``--guidance folds`` gives it, and ``SmoothnessGuidance`` at every scale."""
    columns = ("Overall", "NJD_percent", "JSD", "bending")
    runs = [none, guided(pipe, case, none, "--guidance folds", args.steps, cli_guides("folds"), columns)]
    return runs + [guided(pipe, case, none, f"--guidance smoothness={scale:g}", args.steps,
                          cli_guides(f"smoothness={scale:g}"), columns) for scale in args.smoothness_scales]


def similarity_runs(pipe: DiffuseRegPipeline, case: Case, none: Run, args: argparse.Namespace) -> list[Run]:
    """None; ``--guidance similarity`` without and with ``folds`` (the defaults a user gets); and
    the unsmoothed gradient (``SimilarityGuidance(sigma=0)``) at ``--raw-similarity-scale``, alone
    and followed by the default ``FoldGuidance``: fold control where there are folds to remove."""
    columns = ("Overall", "NJD_percent", "SSIM")
    runs = [none] + [guided(pipe, case, none, f"--guidance {specs}", args.steps, cli_guides(specs), columns)
                     for specs in ("similarity", "similarity folds")]
    raw = SimilarityGuidance(scale=args.raw_similarity_scale, sigma=0.0)
    name = f"SimilarityGuidance(scale={args.raw_similarity_scale:g}, sigma=0)"
    runs.append(guided(pipe, case, none, name, args.steps, [raw], columns))
    runs.append(guided(pipe, case, none, f"{name} + FoldGuidance()", args.steps, [raw, FoldGuidance()], columns))
    for scale, sigma in args.similarity_settings:
        runs.append(guided(pipe, case, none, f"SimilarityGuidance(scale={scale:g}, sigma={sigma:g})", args.steps,
                           [SimilarityGuidance(scale=scale, sigma=sigma)], columns))
    return runs


def organ_runs(pipe: DiffuseRegPipeline, case: Case, none: Run, args: argparse.Namespace) -> list[Run]:
    """None, then ``OrganMaskGuidance`` on the fixed mask of each structure at every scale, then with
    fixed and moving masks for the ``--organ-both-targets``."""
    configs = [(target, scale, False) for target in ORGANS for scale in args.organ_scales]
    configs += [(target, args.organ_both_scale, True) for target in args.organ_both_targets]
    runs = [none]
    for target, scale, both in configs:
        fixed_mask = label_mask(case.pair.fixed_labels, target)
        moving_mask = label_mask(case.pair.moving_labels, target) if both else None
        config = f"{target}: {'fixed+moving masks' if both else 'fixed mask'}, scale {scale:g}"
        run = guided(pipe, case, none, config, args.steps, [OrganMaskGuidance(fixed_mask, moving_mask, scale=scale)],
                     ("Overall", "SSIM", *ORGANS))
        others = [run.row[f"d_{other}"] for other in ORGANS if other != target]
        run.row.update(target=target, d_target=run.row[f"d_{target}"], d_others=float(np.mean(others)))
        runs.append(run)
    return runs


def direction_runs(pipe: DiffuseRegPipeline, case: Case, none: Run, args: argparse.Namespace) -> list[Run]:
    """None and ``DirectionGuidance`` at every scale, each scored against the prescribed mean
    displacement in the region: the unguided mean there plus ``--direction-offset``."""
    region = label_mask(case.pair.fixed_labels, args.direction_region) > 0
    unguided = region_mean(none.result.field, region)
    target = unguided + np.array([0.0, *args.direction_offset])
    runs = [Run(none.result, {**none.row, **direction_errors(unguided, target)})]
    for scale in args.direction_scales:
        guide = DirectionGuidance(target[-pipe.spatial_dims:].tolist(), mask=region.astype(np.float32), scale=scale)
        run = guided(pipe, case, none, f"direction {scale:g}", args.steps, [guide], ("Overall", "NJD_percent"))
        run.row.update(direction_errors(region_mean(run.result.field, region), target))
        runs.append(run)
    return runs


def early_stopping_runs(pipe: DiffuseRegPipeline, case: Case, none: Run, args: argparse.Namespace) -> list[Run]:
    """For each schedule (``--steps``, reusing the unguided run, and ``--early-stopping-steps``): the
    full run, then what ``EarlyStopping`` at each tolerance would have returned (see the module docstring)."""
    runs = []
    for steps in dict.fromkeys((args.steps, args.early_stopping_steps)):
        config = f"{steps} steps, full"
        recorded = none if steps == args.steps else register(pipe, case, config, steps, record=True)
        full = Run(recorded.result, {**recorded.row, "config": config, "schedule_steps": steps, "tolerance": None,
                                     "steps_saved_percent": 0.0}, recorded.trajectory)
        runs.append(full)
        for tolerance in args.early_stopping_tolerances:
            stop = replay_early_stopping(EarlyStopping(tolerance, patience=args.early_stopping_patience),
                                         full.trajectory)
            steps_run = steps if stop is None else stop + 1
            result = RegistrationResult(full.trajectory[steps_run - 1][0].numpy(), steps_run)
            run = scored(case, f"{steps} steps, EarlyStopping({tolerance:g})", result, math.nan)
            run.row.update(differences(run, full, case, ("Overall", "NJD_percent")), schedule_steps=steps,
                           tolerance=tolerance, steps_saved_percent=100.0 * (steps - steps_run) / steps)
            runs.append(run)
    return runs


SECTION_RUNS: dict[str, Section] = {"folds": folds_runs, "similarity": similarity_runs, "organ": organ_runs,
                                    "direction": direction_runs, "early-stopping": early_stopping_runs}


# ---------------------------------------------------------------------------------------------- figures
def jacobian_figure(view: FigureSlice, runs: list[Run], args: argparse.Namespace) -> Figure:
    """Jacobian determinant of each run's field on the slice; folds (det <= 0) outlined in black."""
    figure, axes = new_figure(len(runs), f"{view.name}, slice {view.depth}: Jacobian determinant "
                                         "(blue < 1 < red; black: det <= 0)")
    depth = min(view.depth, view.pair.fixed.shape[0] - 2)  # forward differences drop the last slice
    for ax, run in zip(axes, runs):
        determinant = jacobian_determinant(torch.from_numpy(run.result.field)[None], method="forward")[0].numpy()
        cut = determinant[depth][view.crop]
        shown = ax.imshow(cut, cmap="coolwarm", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=2.0))
        if np.any(cut <= 0):
            ax.contour(cut <= 0, levels=[0.5], colors="black", linewidths=0.6)
        ax.set_title(f"{textwrap.fill(run.row['config'], 30)}\nNJD {run.row['NJD_percent']:.2f} % (volume), Overall "
                     f"{run.row['Overall']:.1f} %", fontsize=8)
        ax.set_axis_off()
    figure.colorbar(shown, ax=axes, shrink=0.7)
    return figure


def organ_figure(view: FigureSlice, runs: list[Run], args: argparse.Namespace) -> Figure:
    """Warped moving label contours over the fixed image, for none and each run targeting the first
    structure; the fixed contour of that structure dashed white."""
    target = ORGANS[0]
    shown = [runs[0]] + [run for run in runs[1:] if run.row["target"] == target]
    figure, axes = new_figure(len(shown), f"{view.name}, slice {view.depth}: warped moving labels "
                                          f"(legend below); fixed {target} dashed white")
    handles = [Line2D([], [], color=colour, label=structure) for structure, colour in LABEL_COLOURS.items()]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8)
    for ax, run in zip(axes, shown):
        warped = view.cut(warp_moving_labels(view.pair, run.result.field))
        view.show_fixed(ax, f"{run.row['config']}\n{target} Dice {run.row[target]:.1f} %, Overall "
                            f"{run.row['Overall']:.1f} %")
        ax.contour(view.cut(view.pair.fixed_labels) == ACDC_LABELS[target], levels=[0.5], colors="white",
                   linewidths=1.0, linestyles="--")
        for structure, colour in LABEL_COLOURS.items():
            if np.any(warped == ACDC_LABELS[structure]):
                ax.contour(warped == ACDC_LABELS[structure], levels=[0.5], colors=colour, linewidths=0.9)
    return figure


def direction_figure(view: FigureSlice, runs: list[Run], args: argparse.Namespace) -> Figure:
    """In-plane field inside the region (arrows, true length) and, from the region's centre, its mean
    displacement (red) and the prescribed one (cyan), both drawn 3x longer."""
    figure, axes = new_figure(len(runs), f"{view.name}, slice {view.depth}: field in the fixed "
                                         f"{args.direction_region} (yellow); mean (red) vs prescribed (cyan), x3")
    region = view.cut(label_mask(view.pair.fixed_labels, args.direction_region)) > 0
    rows, cols = np.nonzero(region)
    every = (rows % 2 == 0) & (cols % 2 == 0)
    centre = (cols.mean(), rows.mean()) if rows.size else (0.0, 0.0)
    for ax, run in zip(axes, runs):
        in_plane = run.result.field[1:, view.depth][(slice(None), *view.crop)]  # (2, h, w): rows, columns
        view.show_fixed(ax, f"{run.row['config']}\nangle error {run.row['angle_error_deg']:.1f} deg, "
                            f"|mean - prescribed| {run.row['residual_voxels']:.2f} vox")
        ax.contour(region, levels=[0.5], colors="white", linewidths=0.6)
        at = (rows[every], cols[every])
        ax.quiver(cols[every], rows[every], in_plane[1][at], in_plane[0][at], color="yellow", angles="xy",
                  scale_units="xy", scale=1.0, width=0.004)
        for vector, colour in ((run.row["mean_displacement"], "red"), (run.row["target_displacement"], "cyan")):
            tip = (centre[0] + 3 * vector[2], centre[1] + 3 * vector[1])
            ax.annotate("", xy=tip, xytext=centre, arrowprops=dict(arrowstyle="->", color=colour, lw=1.8))
    return figure


def early_stopping_figure(view: FigureSlice, runs: list[Run], args: argparse.Namespace) -> Figure:
    """Per schedule: Overall Dice (volume) and the mean change of the clean-field estimate after every
    step, with the tolerances (dotted) and the steps where each rule stops (vertical lines)."""
    full_runs = [run for run in runs if run.trajectory]
    figure, axes = new_figure(len(full_runs), f"{view.name}: EarlyStopping(patience "
                                              f"{args.early_stopping_patience}) on the recorded sampling")
    figure.subplots_adjust(wspace=0.7)  # room for the twin axes' labels
    for ax, full in zip(axes, full_runs):
        steps = full.row["schedule_steps"]
        dice = [100 * acdc_dice(warp_moving_labels(view.pair, x0[0].numpy()), view.pair.fixed_labels)["Overall"]
                for x0 in full.trajectory]
        changes = [float((b - a).abs().mean()) for a, b in zip(full.trajectory, full.trajectory[1:])]
        ax.plot(range(1, steps + 1), dice, "o-", color="tab:blue", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("Overall Dice (%)", color="tab:blue")
        ax.set_title(f"{steps} steps", fontsize=9)
        change_ax = ax.twinx()
        change_ax.semilogy(range(2, steps + 1), changes, "s-", color="tab:red", markersize=3)
        change_ax.set_ylabel("mean |x0 change| (voxels)", color="tab:red")
        stops: dict[int, list[str]] = {}
        for run in runs:
            if run.row["schedule_steps"] == steps and run.row["tolerance"] is not None:
                change_ax.axhline(run.row["tolerance"], color="grey", linestyle=":", linewidth=0.8)
                stops.setdefault(run.row["steps_run"], []).append(f"{run.row['tolerance']:g}")
        for step, tolerances in stops.items():
            ax.axvline(step, color="grey", linewidth=0.8)
            ax.annotate("stop: tol " + ", ".join(tolerances), (step, ax.get_ylim()[0]), fontsize=7, rotation=90,
                        va="bottom", ha="right")
    return figure


FIGURES: dict[str, Callable[[FigureSlice, list[Run], argparse.Namespace], Figure]] = {
    "folds": jacobian_figure, "similarity": jacobian_figure, "organ": organ_figure, "direction": direction_figure,
    "early-stopping": early_stopping_figure}


# ---------------------------------------------------------------------------------------------- main
def scale_and_sigma(text: str) -> tuple[float, float]:
    """``"3:4"`` -> ``(3.0, 4.0)``, a ``SimilarityGuidance`` scale and gradient sigma (voxels)."""
    scale, _, sigma = text.partition(":")
    try:
        return float(scale), float(sigma)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write SCALE:SIGMA, e.g. 3:4") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"), help="ACDC training folder")
    parser.add_argument("--patients", type=int, nargs="+", help="only these validation patient numbers")
    parser.add_argument("--model", default="diffusereg/acdc-2d")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/control_val"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="DDIM steps of every configuration (default: the library's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="initial-noise seeds, the same for all")
    parser.add_argument("--smoothness-scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--raw-similarity-scale", type=float, default=1.0,
                        help="scale of the unsmoothed SimilarityGuidance rows")
    parser.add_argument("--similarity-settings", type=scale_and_sigma, nargs="*", default=[], metavar="SCALE:SIGMA",
                        help="further SimilarityGuidance rows")
    parser.add_argument("--organ-scales", type=float, nargs="+", default=[100.0], help="fixed-mask OrganMaskGuidance")
    parser.add_argument("--organ-both-targets", nargs="*", choices=ORGANS, default=["LV"],
                        help="structures also guided with fixed and moving masks")
    parser.add_argument("--organ-both-scale", type=float, default=1.0)
    parser.add_argument("--direction-region", choices=ORGANS, default="LV")
    parser.add_argument("--direction-offset", type=float, nargs=2, default=[0.0, 2.0], metavar=("ROWS", "COLUMNS"),
                        help="prescribed change of the region's mean displacement, voxels along H and W")
    parser.add_argument("--direction-scales", type=float, nargs="+", default=[0.5])
    parser.add_argument("--early-stopping-steps", type=int, default=10, help="the long schedule")
    parser.add_argument("--early-stopping-tolerances", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                        help="voxels")
    parser.add_argument("--early-stopping-patience", type=int, default=2)
    parser.add_argument("--figure-patient", type=int, help="patient number of the figures (default: the first)")
    parser.add_argument("--figure-slice", type=int, help="model-grid slice of the figures (default: most heart)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``control.json`` holds."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.scheduler = scheduler_of_kind(pipe.scheduler, "ddim")  # deterministic, as the early-stopping replay needs
    pipe.set_progress_bar_config(disable=True)
    dataset = ACDCDataset(args.data, split="val", spatial_dims=3, patients=args.patients,
                          preprocessing=pipe.preprocessing)
    sections = [section for section in SECTIONS if section in args.sections]
    figure_name = figure_case_name(dataset.names, args.figure_patient)

    rows: dict[str, list[dict[str, Any]]] = {section: [] for section in sections}
    seconds: dict[str, float] = {}
    figure_runs: dict[str, list[Run]] = {}
    figure_case = None
    progress = tqdm(list(product(range(len(dataset.names)), args.seeds)), desc="cases x seeds", unit="case")
    for index, seed in progress:
        case = Case(dataset.names[index], dataset.metadata(index)["group"], seed, dataset.preprocessed(index))
        progress.set_postfix_str(f"{case.name} seed {seed}: none")
        with timed(seconds, "none"):
            none = register(pipe, case, "none", args.steps, record="early-stopping" in sections)
        for section in sections:
            progress.set_postfix_str(f"{case.name} seed {seed}: {section}")
            with timed(seconds, section):
                runs = SECTION_RUNS[section](pipe, case, none, args)
            rows[section] += [run.row for run in runs]
            if case.name == figure_name and seed == args.seeds[0]:
                figure_case, figure_runs[section] = case, runs

    args.output.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": {**run_settings(args, argv, __file__), "cases": dataset.names},
                              "seconds": seconds, "sections": {}}
    markdown = [f"# Control benchmark: {args.model}, {len(dataset.names)} cases x {len(args.seeds)} seeds, "
                f"{args.steps} DDIM steps\n",
                "Mean (std) over cases and seeds; d_X is the configuration minus its reference on the same case "
                "and seed (none, or the full schedule for early stopping); field_change in voxels.\n"]
    for section in sections:
        configs = list(dict.fromkeys(row["config"] for row in rows[section]))
        summaries = {config: summarize([row for row in rows[section] if row["config"] == config],
                                       SECTION_COLUMNS[section]) for config in configs}
        report["sections"][section] = {"rows": rows[section], "summary": summaries}
        markdown += [f"## {section}\n", summary_markdown(summaries, SECTION_COLUMNS[section], PRECISE_COLUMNS)]
        markdown.append(f"\n{seconds[section]:.0f} s in this section ({seconds['none']:.0f} s for the unguided "
                        "runs shared by all sections)\n")
    if figure_case is not None:
        view = FigureSlice.around_heart(figure_case.name, figure_case.pair, args.figure_slice)
        for section, runs in tqdm(figure_runs.items(), desc="figures"):
            save_figure(FIGURES[section](view, runs, args), args.output / f"{section}.png")

    return write_report(args.output / "control.json", report, args.output / "control.md", markdown)


if __name__ == "__main__":
    main()
