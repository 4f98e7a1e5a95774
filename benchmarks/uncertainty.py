"""Does the sampler's random state mean anything? Seed-to-seed spread against registration error on ACDC.

Run (from the repository root, ACDC beside the checkout):

    python benchmarks/uncertainty.py                                  # 8 seeds, default steps, ED fixed
    python benchmarks/uncertainty.py --steps 3 10 --fixed-frames ED ES

Every validation case (``--patients`` to restrict; the paper's protocol on the model's grid, as in
:mod:`diffusereg.evaluation`, ``--fixed-frames`` as in ``benchmarks/acdc.py``) is registered once
per seed of ``--seeds`` at each of ``--steps``: one pipeline call with ``num_samples=1`` and its own
``torch.Generator().manual_seed(seed)`` per seed, with the model's own scheduler. (One call with
``num_samples=K`` is not the same: it draws every sample's initial noise from one generator, so
its samples are other draws than these seeds'.) The mean field is the voxel-wise mean of the K
fields, as ``num_samples=K`` returns it.

Three other ways of drawing K fields per pair, each a group of its own, ask whether a
distribution a model could learn to sample would carry the information (a model can only learn a
spread its targets have): ``--energy``, minimisers of the registration energy (1 - SSIM + lambda x
squared gradient) from random smooth starts around the teacher applied three times, lambda drawn
per seed (``instance_optimisation.energy_samples``); ``--perturbed``, the teacher applied three
times to both images under a random gamma and noise per seed; ``--mismatch``, the teacher applied
three times plus smooth noise scaled by how unlike the fixed and the warped moving image stay.
``--steps`` without a number leaves the pipeline's own samples out.

Per voxel, inside the heart region (fixed labels or the mean field's warped labels > 0, dilated
in-plane by ``--margin`` voxels):

- wrong: the moving labels warped by the mean field (nearest neighbour) differ from the fixed labels;
- ``disagreement``: 1 - the share of the majority label among the K warped label maps of the
  samples (0 where all agree, at most 1 - 1/K);
- ``field_spread``: the length of the per-axis standard deviation of the displacement over the
  samples, voxels (the length of the pipeline's ``sample_spread`` output);
- ``-boundary_distance``, the baseline: minus the distance (mm) to the nearest boundary voxel of the
  mean field's warped labels (one with a differently labelled face neighbour).

Each score's AUROC for ranking the wrong voxels first (0.5: chance), pooled over the cases' voxels
and per case (mean, min, max). Per case and structure (LV, Myo, RV; inside the fixed structure):
the mean ``field_spread`` and the mean ``disagreement`` against the Dice error 1 - Dice of the mean
field's warped labels, and the baseline ``-volume`` (fixed voxel count; positive rho: smaller
structures err more); Spearman pooled over structures and cases, and per structure, with
permutation p-values. Dice (%) of
the mean field and the mean of the single samples' Dice show what averaging does.

Writes to ``--output``: ``summary.json`` (settings with the command, per-case rows, one summary per
fixed frame and step count), ``summary.md`` (also printed), ``voxels.png`` (one slice of one case:
fixed image, wrong voxels, disagreement, boundary distance) and ``structures.png`` (per-case spread
against 1 - Dice).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.networks.layers import GaussianFilter
from scipy import ndimage, stats
from tqdm.auto import tqdm

from diffusereg import DEFAULT_STEPS
from diffusereg.data import ACDCDataset, PreprocessedPair
from diffusereg.evaluation import pipeline_registrar, summarize, summary_markdown, warp_moving_labels
from diffusereg.metrics import ACDC_LABELS, acdc_dice, auroc
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.spatial import warp
from diffusereg.visualize import LABEL_COLOURS
from instance_optimisation import energy_samples, smooth_noise
from reporting import FigureSlice, figure_case_name, new_figure, run_settings, save_figure, write_report

STRUCTURES = ("LV", "Myo", "RV")
VOXEL_SCORES = ("disagreement", "field_spread", "-boundary_distance")
"""Per-voxel scores of a wrong voxel (higher: more likely wrong); the last is the baseline."""
STRUCTURE_SCORES = ("field_spread", "disagreement", "-volume")
"""Per-structure scores of the Dice error; the last is the baseline."""
DICE_COLUMNS = tuple(f"Dice_{name}{kind}" for name in ("Overall", *STRUCTURES) for kind in ("", "_samples"))
"""``Dice_<s>``: Dice (%) of the mean field; ``Dice_<s>_samples``: mean over samples of each sample's Dice."""
CASE_COLUMNS = (*DICE_COLUMNS, "averaging_gain", "wrong_percent", "field_spread_heart", "seconds")
"""Summarised per-case columns; ``averaging_gain``: ``Dice_Overall - Dice_Overall_samples``."""


@dataclass(frozen=True)
class VoxelMaps:
    """Per-voxel maps ``(D, H, W)`` of one case registered once per seed (see the module docstring)."""

    region: np.ndarray  # bool, the dilated heart
    wrong: np.ndarray  # bool, mean field's warped labels != fixed labels
    disagreement: np.ndarray  # 1 - majority share over the samples' warped labels
    spread: np.ndarray  # voxels
    distance: np.ndarray  # mm to the nearest boundary of the mean field's warped labels

    def scores(self) -> dict[str, np.ndarray]:
        """Each of :data:`VOXEL_SCORES` at the region's voxels ``(n,)``."""
        return {"disagreement": self.disagreement[self.region], "field_spread": self.spread[self.region],
                "-boundary_distance": -self.distance[self.region]}


def sample_fields(pipe: DiffuseRegPipeline, pair: PreprocessedPair, steps: int, seeds: Sequence[int]) -> np.ndarray:
    """One field per seed ``(K, 3, D, H, W)``, voxels: a ``num_samples=1`` call with the seed's own generator each."""
    return np.stack([pipeline_registrar(pipe, steps, seed=seed)(pair.fixed, pair.moving).field for seed in seeds])


def teacher_batch(pipe: DiffuseRegPipeline, pair: PreprocessedPair) -> tuple[torch.nn.Module, ModelGridBatch]:
    """The pipeline's teacher (eval mode) and the pair as its batch of model-grid slices."""
    teacher = pipe.teacher.eval()
    return teacher, ModelGridBatch.from_arrays(pair.fixed, pair.moving, None, teacher.config.spatial_dims,
                                               teacher.size_multiple)


def perturbed(image: torch.Tensor, noise: float, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """``image`` (intensities in ``[0, 1]``) under a random gamma drawn log-uniformly from
    ``[1 / gamma, gamma]`` plus Gaussian noise of std ``noise``, clipped to ``[0, 1]``."""
    exponent = gamma ** (2 * torch.rand((), generator=generator).item() - 1)
    return (image.clamp_min(0) ** exponent + noise * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def sample_perturbed_teacher(pipe: DiffuseRegPipeline, pair: PreprocessedPair, seeds: Sequence[int],
                             args: argparse.Namespace) -> np.ndarray:
    """The pipeline's teacher applied ``--perturbed-passes`` times to the pair with both images
    :func:`perturbed` anew per seed (``--perturbed-noise``, ``--perturbed-gamma``): ``(K, 3, D, H, W)``,
    voxels. Its spread is how much the teacher's answer depends on what the images do not pin down."""
    teacher, batch = teacher_batch(pipe, pair)
    fields = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        fixed, moving = (perturbed(image, args.perturbed_noise, args.perturbed_gamma, generator)
                         for image in (batch.fixed, batch.moving))
        with torch.no_grad():
            field = teacher.recursive(fixed, moving, args.perturbed_passes)[-1]
        fields.append(batch.to_output(field, is_field=True).numpy())
    return np.stack(fields)


def sample_mismatch(pipe: DiffuseRegPipeline, pair: PreprocessedPair, seeds: Sequence[int], args: argparse.Namespace
                    ) -> np.ndarray:
    """The teacher applied three times plus, per seed, a smooth random displacement whose size
    follows the images' mismatch after it: ``(K, 3, D, H, W)``, voxels. The mismatch is the absolute
    difference of the fixed and the warped moving image blurred in-plane (``--mismatch-sigma``
    voxels), divided by its mean over the slices; the displacement is
    :func:`instance_optimisation.smooth_noise` (``--mismatch-amplitude`` voxels rms, blur 4 voxels)
    times it: a spread large where the registration left the images unlike."""
    teacher, batch = teacher_batch(pipe, pair)
    with torch.no_grad():
        field = teacher.recursive(batch.fixed, batch.moving, 3)[-1]
        difference = GaussianFilter(2, args.mismatch_sigma)((batch.fixed - warp(batch.moving, field)).abs())
    scale = difference / difference.mean().clamp_min(1e-8)
    fields = [field + scale * smooth_noise(field.shape, args.mismatch_amplitude, 4.0,
                                           torch.Generator().manual_seed(seed)) for seed in seeds]
    return np.stack([batch.to_output(sample, is_field=True).numpy() for sample in fields])


def sample_energy(pipe: DiffuseRegPipeline, pair: PreprocessedPair, seeds: Sequence[int], args: argparse.Namespace
                  ) -> np.ndarray:
    """One minimiser of the registration energy per seed ``(K, 3, D, H, W)``, voxels, drawn around
    the pipeline's teacher applied ``--energy-passes`` times (:func:`instance_optimisation.energy_samples`)."""
    teacher, batch = teacher_batch(pipe, pair)
    with torch.no_grad():
        start = teacher.recursive(batch.fixed, batch.moving, args.energy_passes)[-1]
    fields = energy_samples(batch.fixed, batch.moving, start, list(seeds), tuple(args.energy_smoothness),
                            args.energy_amplitude, args.energy_sigma, args.energy_iterations, args.energy_learning_rate)
    return np.stack([batch.to_output(field, is_field=True).numpy() for field in fields])


def label_disagreement(labels: np.ndarray) -> np.ndarray:
    """1 - the share of the majority label at each voxel of K label maps ``(K, *S)`` -> ``(*S)``."""
    counts = np.stack([(labels == value).sum(axis=0) for value in np.unique(labels)])
    return 1.0 - counts.max(axis=0) / labels.shape[0]


def boundary_distance(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel of a label map ``(*S)`` to the nearest boundary voxel (one with a
    differently labelled face neighbour; 0 on it), ``spacing`` in mm per axis; inf without a boundary."""
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    boundary = (ndimage.grey_dilation(labels, footprint=cross) != labels) | (
        ndimage.grey_erosion(labels, footprint=cross) != labels)
    if not boundary.any():
        return np.full(labels.shape, np.inf)
    return ndimage.distance_transform_edt(~boundary, sampling=spacing)


def heart_region(fixed_labels: np.ndarray, warped_labels: np.ndarray, margin: int) -> np.ndarray:
    """Voxels ``(D, H, W)`` where the fixed or the warped moving labels are heart, dilated in-plane by ``margin``."""
    heart = (fixed_labels > 0) | (warped_labels > 0)
    if margin == 0:
        return heart
    return ndimage.binary_dilation(heart, structure=np.ones((1, 3, 3), dtype=bool), iterations=margin)


def analyse(pair: PreprocessedPair, fields: np.ndarray, margin: int) -> tuple[dict[str, float], VoxelMaps]:
    """The per-case numbers (the columns of :data:`CASE_COLUMNS` but ``seconds``, ``auroc_<score>``,
    and per structure ``field_spread_<s>``, ``disagreement_<s>``, ``volume_<s>``, ``error_<s>``) and
    the voxel maps of ``pair`` registered once per sample of ``fields`` ``(K, 3, D, H, W)``."""
    fixed = pair.fixed_labels
    warped = warp_moving_labels(pair, fields.mean(axis=0))
    samples = np.stack([warp_moving_labels(pair, sample) for sample in fields])  # (K, D, H, W)
    maps = VoxelMaps(region=heart_region(fixed, warped, margin), wrong=warped != fixed,
                     disagreement=label_disagreement(samples),
                     spread=np.linalg.norm(fields.std(axis=0, ddof=1), axis=0),
                     distance=boundary_distance(warped, pair.grid.model.axis_spacing))
    wrong = maps.wrong[maps.region]
    row = {f"auroc_{name}": auroc(score, wrong) for name, score in maps.scores().items()}
    row.update(wrong_percent=100.0 * float(wrong.mean()), region_voxels=int(wrong.size),
               field_spread_heart=float(maps.spread[maps.region].mean()))
    mean_dice = acdc_dice(warped, fixed)
    sample_dice = [acdc_dice(sample, fixed) for sample in samples]
    for name in ("Overall", *STRUCTURES):
        row[f"Dice_{name}"] = 100.0 * mean_dice[name]
        row[f"Dice_{name}_samples"] = 100.0 * float(np.mean([dice[name] for dice in sample_dice]))
    row["averaging_gain"] = row["Dice_Overall"] - row["Dice_Overall_samples"]
    for name in STRUCTURES:
        inside = fixed == ACDC_LABELS[name]
        row.update({f"field_spread_{name}": float(maps.spread[inside].mean()),
                    f"disagreement_{name}": float(maps.disagreement[inside].mean()),
                    f"volume_{name}": int(inside.sum()), f"error_{name}": 1.0 - mean_dice[name]})
    return row, maps


# ---------------------------------------------------------------------------------------------- summaries
def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rho over the finite pairs and its two-sided permutation p-value (every pairing up
    to 7 pairs, else 9999 random ones, seeded); NaN with fewer than 3 pairs or a constant side."""
    pairs = np.array([(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]).reshape(-1, 2)
    ranks_x, ranks_y = stats.rankdata(pairs[:, 0]), stats.rankdata(pairs[:, 1])
    if len(pairs) < 3 or np.ptp(ranks_x) == 0 or np.ptp(ranks_y) == 0:
        return {"rho": math.nan, "p": math.nan, "n": len(pairs)}
    centred_y = ranks_y - ranks_y.mean()

    def rho(ranks: np.ndarray, axis: int = -1) -> np.ndarray:  # Pearson's r of the ranks
        centred = ranks - ranks.mean(axis=axis, keepdims=True)
        return (centred * centred_y).sum(axis=axis) / np.sqrt((centred ** 2).sum(axis=axis) * (centred_y ** 2).sum())

    result = stats.permutation_test((ranks_x,), rho, permutation_type="pairings", vectorized=True,
                                    rng=np.random.default_rng(0))
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(pairs)}


def structure_score(row: dict[str, Any], score: str, structure: str) -> float:
    """One of :data:`STRUCTURE_SCORES` of a structure in a per-case row."""
    return -float(row[f"volume_{structure}"]) if score == "-volume" else row[f"{score}_{structure}"]


def summarize_group(rows: Sequence[dict[str, Any]], voxels: Sequence[tuple[dict[str, np.ndarray], np.ndarray]]
                    ) -> dict[str, Any]:
    """Summary of one fixed frame and step count: the voxel AUROCs (pooled over ``voxels``, the
    (scores, wrong) of each case's region, and per case), the structure-level Spearman
    correlations (pooled over structures and cases, and per structure) and the per-case columns."""
    wrong = np.concatenate([case_wrong for _, case_wrong in voxels])
    voxel: dict[str, Any] = {}
    for score in VOXEL_SCORES:
        per_case = np.array([row[f"auroc_{score}"] for row in rows], dtype=np.float64)
        per_case = per_case[np.isfinite(per_case)]
        voxel[score] = {"pooled": auroc(np.concatenate([scores[score] for scores, _ in voxels]), wrong),
                        "mean": float(per_case.mean()) if per_case.size else math.nan,
                        "min": float(per_case.min()) if per_case.size else math.nan,
                        "max": float(per_case.max()) if per_case.size else math.nan, "n": int(per_case.size)}

    def correlation(score: str, structures: Sequence[str]) -> dict[str, float]:
        pairs = [(structure_score(row, score, s), row[f"error_{s}"]) for row in rows for s in structures]
        return spearman([x for x, _ in pairs], [error for _, error in pairs])

    structure = {score: {"pooled": correlation(score, STRUCTURES), **{s: correlation(score, (s,)) for s in STRUCTURES}}
                 for score in STRUCTURE_SCORES}
    return {"voxels": {"count": int(wrong.size), "wrong_percent": 100.0 * float(wrong.mean()) if wrong.size else None,
                       "auroc": voxel},
            "structures": structure, "cases": summarize(rows, CASE_COLUMNS)}


def group_markdown(title: str, summary: dict[str, Any], margin: int) -> str:
    """One group's summary as Markdown: voxel AUROCs, structure correlations, Dice."""
    voxels = summary["voxels"]
    lines = [f"## {title}\n",
             f"Voxels: {voxels['count']} in the heart region (dilated {margin} voxels in-plane), "
             f"{voxels['wrong_percent']:.2f} % wrong with the mean field. AUROC for ranking wrong voxels first:\n",
             "| score | pooled | per case mean [min, max] | cases |", "|---|---:|---:|---:|"]
    for score, result in voxels["auroc"].items():
        lines.append(f"| {score} | {result['pooled']:.3f} | {result['mean']:.3f} [{result['min']:.3f}, "
                     f"{result['max']:.3f}] | {result['n']} |")
    lines += ["\nStructures: Spearman rho (p, n) against 1 - Dice of the mean field:\n",
              "| score | pooled | " + " | ".join(STRUCTURES) + " |", "|---|" + "---:|" * (1 + len(STRUCTURES))]
    for score, results in summary["structures"].items():
        cells = [f"{r['rho']:.3f} ({r['p']:.3g}, {r['n']})" for r in (results["pooled"], *(results[s] for s in STRUCTURES))]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    lines += ["\nPer case, mean (std): Dice (%) of the mean field and of single samples; field spread in voxels; "
              "seconds of sampling all seeds:\n", summary_markdown({"cases": summary["cases"]}, CASE_COLUMNS,
                                                          ("field_spread_heart", "averaging_gain"))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures
def voxel_figure(view: FigureSlice, maps: VoxelMaps, title: str) -> Figure:
    """The fixed image, the wrong voxels, the disagreement and the boundary distance on one slice,
    the heart region outlined."""
    figure, axes = new_figure(4, f"{view.name}, slice {view.depth}, {title}: heart region outlined")
    region = view.cut(maps.region)
    view.show_fixed(axes[0], "fixed image, fixed labels")
    for structure, colour in LABEL_COLOURS.items():
        axes[0].contour(view.cut(view.pair.fixed_labels) == ACDC_LABELS[structure], levels=[0.5], colors=colour,
                        linewidths=0.8)
    view.show_fixed(axes[1], "wrong voxels (mean field)")
    wrong = region & view.cut(maps.wrong)
    axes[1].imshow(np.ma.masked_where(~wrong, wrong), cmap="autumn", alpha=0.8)
    for ax, volume, name, colours in ((axes[2], maps.disagreement, "disagreement", "magma"),
                                      (axes[3], maps.distance, "baseline: boundary distance (mm)", "viridis_r")):
        view.show_fixed(ax, name)
        shown = ax.imshow(np.where(region, view.cut(volume), np.nan), cmap=colours, alpha=0.85)
        figure.colorbar(shown, ax=ax, shrink=0.7)
    for ax in axes:
        ax.contour(region, levels=[0.5], colors="white", linewidths=0.6)
    return figure


def structure_figure(groups: dict[str, list[dict[str, Any]]], summaries: dict[str, dict[str, Any]]) -> Figure:
    """Per group: each case's mean field spread inside each structure against its 1 - Dice."""
    figure, axes = new_figure(len(groups), "per case and structure: mean field spread inside vs 1 - Dice")
    figure.subplots_adjust(top=0.8)  # room for the title above the panels' own
    for ax, (title, rows) in zip(axes, groups.items()):
        for structure in STRUCTURES:
            ax.scatter([row[f"field_spread_{structure}"] for row in rows], [row[f"error_{structure}"] for row in rows],
                       color=LABEL_COLOURS[structure], label=structure, s=14)
        pooled = summaries[title]["structures"]["field_spread"]["pooled"]
        ax.set_title(f"{title}\nSpearman pooled {pooled['rho']:.3f} (p {pooled['p']:.2g}, n {pooled['n']})",
                     fontsize=8)
        ax.set_xlabel("mean field spread inside (voxels)")
        ax.set_ylabel("1 - Dice")
        ax.legend(fontsize=7)
    return figure


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"), help="ACDC training folder")
    parser.add_argument("--patients", type=int, nargs="+", help="only these validation patient numbers")
    parser.add_argument("--fixed-frames", nargs="+", choices=("ED", "ES"), default=["ED"],
                        help="register onto these frames (ED: the paper's direction)")
    parser.add_argument("--model", default="diffusereg/acdc-2d")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/uncertainty_val"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="one sample per seed (2 or more)")
    parser.add_argument("--steps", type=int, nargs="*", default=[DEFAULT_STEPS],
                        help="sampling steps; several: one summary each (default: the library's)")
    parser.add_argument("--margin", type=int, default=3, help="in-plane dilation of the heart region, voxels")
    parser.add_argument("--figure-patient", type=int, help="patient number of the voxel figure (default: the first)")
    parser.add_argument("--figure-slice", type=int, help="model-grid slice of the voxel figure (default: most heart)")
    parser.add_argument("--energy", action="store_true",
                        help="also one group of registration-energy minimisers per seed (see --energy-*)")
    parser.add_argument("--energy-passes", type=int, default=3, help="teacher passes of the energy samples' centre")
    parser.add_argument("--energy-smoothness", type=float, nargs=2, default=[0.1, 3.0],
                        help="range of the smoothness weight, drawn log-uniformly per seed")
    parser.add_argument("--energy-amplitude", type=float, default=1.0, help="random start's rms displacement, voxels")
    parser.add_argument("--energy-sigma", type=float, default=4.0, help="random start's in-plane blur, voxels")
    parser.add_argument("--energy-iterations", type=int, default=50, help="Adam steps per energy sample")
    parser.add_argument("--energy-learning-rate", type=float, default=0.05, help="Adam step, voxels")
    parser.add_argument("--perturbed", action="store_true",
                        help="also one group of the teacher on randomly perturbed images per seed (see --perturbed-*)")
    parser.add_argument("--perturbed-passes", type=int, default=3, help="teacher passes of the perturbed samples")
    parser.add_argument("--perturbed-noise", type=float, default=0.03, help="image noise std (intensities in [0, 1])")
    parser.add_argument("--perturbed-gamma", type=float, default=1.25, help="gamma drawn from [1 / g, g]")
    parser.add_argument("--mismatch", action="store_true",
                        help="also one group of teacher x3 plus noise scaled by the images' mismatch (see --mismatch-*)")
    parser.add_argument("--mismatch-amplitude", type=float, default=1.0, help="noise rms where the mismatch is average, voxels")
    parser.add_argument("--mismatch-sigma", type=float, default=2.0, help="in-plane blur of the mismatch, voxels")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 2 or len(set(args.seeds)) < len(args.seeds):
        parser.error("--seeds: give 2 or more different seeds")
    if not (args.steps or args.energy or args.perturbed or args.mismatch):
        parser.error("nothing to sample: give --steps, --energy, --perturbed or --mismatch")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``summary.json`` holds."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    datasets = {frame: ACDCDataset(args.data, split="val", spatial_dims=3, patients=args.patients,
                                   preprocessing=pipe.preprocessing, fixed_frame=frame)
                for frame in dict.fromkeys(args.fixed_frames)}
    names = next(iter(datasets.values())).names
    figure_name = figure_case_name(names, args.figure_patient)
    samplers = {f"{steps} steps": partial(sample_fields, pipe, steps=steps) for steps in args.steps}
    if args.energy:
        samplers[f"energy samples around teacher x{args.energy_passes}"] = partial(sample_energy, pipe, args=args)
    if args.mismatch:
        samplers["teacher x3 plus noise scaled by the mismatch"] = partial(sample_mismatch, pipe, args=args)
    if args.perturbed:
        samplers[f"teacher x{args.perturbed_passes} on perturbed images"] = partial(sample_perturbed_teacher, pipe,
                                                                                      args=args)
    title = {(frame, label): f"{frame} fixed, {label}" for frame in datasets for label in samplers}
    rows: dict[str, list[dict[str, Any]]] = {text: [] for text in title.values()}
    voxels: dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]] = {text: [] for text in title.values()}
    figure_maps = None
    progress = tqdm(total=len(title) * len(names), desc="cases x frames x steps", unit="case")
    for frame, dataset in datasets.items():
        for index, name in enumerate(dataset.names):
            pair = dataset.preprocessed(index)
            for label, sampler in samplers.items():
                group = title[frame, label]
                progress.set_postfix_str(f"{name}, {group}")
                sampled = time.perf_counter()
                fields = sampler(pair, seeds=args.seeds)
                seconds = time.perf_counter() - sampled
                row, maps = analyse(pair, fields, args.margin)
                rows[group].append({"case": name, "group": dataset.metadata(index)["group"], "fixed_frame": frame,
                                    "sampler": label, "seconds": seconds, **row})
                voxels[group].append((maps.scores(), maps.wrong[maps.region]))
                if name == figure_name and figure_maps is None:
                    figure_maps = (group, FigureSlice.around_heart(name, pair, args.figure_slice), maps)
                progress.update()
    progress.close()

    summaries = {group: summarize_group(rows[group], voxels[group]) for group in rows}
    args.output.mkdir(parents=True, exist_ok=True)
    group, view, maps = figure_maps
    save_figure(voxel_figure(view, maps, group), args.output / "voxels.png")
    save_figure(structure_figure(rows, summaries), args.output / "structures.png")
    seconds = time.perf_counter() - started
    settings = {**run_settings(args, argv, __file__), "cases": names,
                "scheduler": type(pipe.scheduler).__name__, "seconds": seconds}
    report = {"settings": settings, "summaries": summaries, "rows": rows}
    markdown = [f"# Sampler spread against error: {args.model}, {len(names)} cases x {len(args.seeds)} seeds "
                f"({type(pipe.scheduler).__name__}), {seconds:.0f} s\n",
                "Scores: higher means more likely wrong; `-boundary_distance` and `-volume` are the baselines. "
                "See the docstring of benchmarks/uncertainty.py for the definitions.\n"]
    markdown += [group_markdown(group, summary, args.margin) for group, summary in summaries.items()]
    return write_report(args.output / "summary.json", report, args.output / "summary.md", markdown)


if __name__ == "__main__":
    main()
