"""Cardiac readout benchmark: ejection fraction from labels carried by registration, in both
directions, with inverse consistency (validation patients); strain by ACDC disease group (all
100 training patients).

Run (from the repository root, ACDC beside the checkout):

    python benchmarks/cardiac.py val --output benchmarks/results/cardiac_val
    python benchmarks/cardiac.py strain --output benchmarks/results/cardiac_strain

``val``: on the 10 validation patients, every method registers both directions on the paper's
model grid (``diffusereg.evaluation``): ES fixed / ED moving carries the ED labels to ES (the
readout given ED labels), ED fixed / ES moving carries the ES labels to ED. LV and RV ejection
fractions computed from one frame's ground-truth labels and the carried ones are compared with the
EF of both frames' ground-truth labels on the same grid (mean absolute error, Bland-Altman
picture); beside them Dice, NJD, time, the strain the readout reports, and the inverse-consistency
residual of the two directions' fields (mm, inside the ED myocardium and heart). Methods: the
model (``--model``, DDIM ``--steps``), its teacher one-shot and applied three times recursively,
ANTs SyN (``antspyx``).

``strain``: every patient of the ACDC training folder (the groups taking turns), one method
(``--method``: the teacher applied three times, or the model), both directions (``--fixed-frames``);
``--groups`` restricts and orders the groups, ``--resume`` keeps the patients an earlier run
wrote; global radial and circumferential strain of the LV myocardium (ES fixed: on the ED labels carried to ES, as the readout does; ED fixed: on the
ED ground-truth labels) per disease group (``Info.cfg``), and the AUROC of each strain for telling
NOR from DCM and NOR from MINF (the sign fixed beforehand: disease means less thickening and
less shortening).

Both write their tables after every patient (``cases.csv``, ``summary.json``, ``summary.md``, the
pictures), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusereg.data import ACDCDataset, PreprocessedPair
from diffusereg.evaluation import (Registrar, ants_syn_registrar, pipeline_registrar, score_case,
                                   teacher_registrar, warp_moving_labels)
from diffusereg.hub import resolve_model
from diffusereg.io import write_atomically
from diffusereg.metrics import ACDC_LABELS, auroc, ejection_fraction, inverse_consistency_mm, label_volume_ml
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.strain import myocardial_strain
from reporting import run_settings, save_figure, write_report

FRAMES = ("ES", "ED")  # the fixed frame: ES carries the ED labels (the readout's usual direction)
CHAMBERS = {"LV": ACDC_LABELS["LV"], "RV": ACDC_LABELS["RV"]}
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")


def ejection_fractions(ed_labels: np.ndarray, es_labels: np.ndarray, axis_spacing: Sequence[float]
                       ) -> dict[str, float]:
    """``LVEF`` and ``RVEF`` (%) of an ED and an ES label map on grids of ``axis_spacing``."""
    return {f"{name}EF": ejection_fraction(label_volume_ml(ed_labels, value, axis_spacing),
                                           label_volume_ml(es_labels, value, axis_spacing))
            for name, value in CHAMBERS.items()}


def readout_row(pair: PreprocessedPair, field: np.ndarray, fixed_frame: str) -> dict[str, float]:
    """What the readout reports for one direction, beside the ground truth: the moving frame's
    labels carried onto the fixed frame by ``field`` stand in for the fixed frame's; EF from them
    and the moving frame's labels (``LVEF``, ``RVEF``), EF of both frames' ground truth on the
    same grid (``*_ref``), their differences (``*_error``), and the strain of the carried
    myocardium (``radial``, ``circumferential``, %)."""
    spacing = pair.grid.model.axis_spacing
    carried = warp_moving_labels(pair, field)
    ed_es = (pair.moving_labels, carried) if fixed_frame == "ES" else (carried, pair.moving_labels)
    reference = (pair.moving_labels, pair.fixed_labels) if fixed_frame == "ES" else (pair.fixed_labels,
                                                                                      pair.moving_labels)
    predicted, truth = ejection_fractions(*ed_es, spacing), ejection_fractions(*reference, spacing)
    strain = myocardial_strain(field, carried, spacing, "moving" if fixed_frame == "ES" else "fixed")
    row = {"radial": strain.radial, "circumferential": strain.circumferential}
    for name in predicted:
        row.update({name: predicted[name], f"{name}_ref": truth[name], f"{name}_error": predicted[name] - truth[name]})
    return row


def agreement(errors: Sequence[float]) -> dict[str, float]:
    """Mean absolute error, bias (mean difference) and Bland-Altman 95 % limits of agreement
    (bias +- 1.96 sample standard deviations) of paired differences."""
    values = np.asarray([e for e in errors if np.isfinite(e)], dtype=np.float64)
    if values.size == 0:
        return {"MAE": float("nan"), "bias": float("nan"), "LoA_low": float("nan"), "LoA_high": float("nan"), "n": 0}
    spread = 1.96 * values.std(ddof=1) if values.size > 1 else 0.0
    return {"MAE": float(np.abs(values).mean()), "bias": float(values.mean()), "LoA_low": float(values.mean() - spread),
            "LoA_high": float(values.mean() + spread), "n": int(values.size)}


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV, the columns in first-seen order, floats with 6 significant digits."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    stream = io.StringIO()
    writer = csv.DictWriter(stream, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})
    return stream.getvalue()


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = csv_text(rows)
    write_atomically(path, lambda temporary: temporary.write_text(text))


def bundle(model: str) -> dict[str, str]:
    """The bundle measured: its name, the commit its model card names, and the checkout's commit."""
    readme = Path(resolve_model(model)) / "README.md"
    found = re.search(r"commit `([0-9a-f]{40})`", readme.read_text()) if readme.is_file() else None
    trained_at = found.group(1) if found else ""
    checkout = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"model": model, "model_card_commit": trained_at, "checkout": checkout}


# ------------------------------------------------------------------ validation: EF, Dice, consistency
def val_methods(pipe: DiffuseRegPipeline, args: argparse.Namespace, spacing: Sequence[float]) -> dict[str, Registrar]:
    """The compared methods, by row name."""
    methods: dict[str, Registrar] = {f"{args.model} (DDIM {args.steps})": pipeline_registrar(pipe, args.steps,
                                                                                             seed=args.seed)}
    methods["teacher (one-shot)"] = teacher_registrar(pipe.teacher, passes=1)
    methods["teacher x3 (recursive)"] = teacher_registrar(pipe.teacher, passes=3)
    if "ANTs SyN" not in args.skip:
        methods["ANTs SyN"] = ants_syn_registrar(spacing, args.threads)
    return {name: method for name, method in methods.items() if name not in args.skip}


def val_summary(rows: Sequence[dict[str, Any]], consistency: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and direction: EF agreement, mean Dice (Overall), NJD, HD95 and time; per
    method: the mean inverse-consistency residual."""
    summary: dict[str, Any] = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        for frame in FRAMES:
            mine = [row for row in rows if row["method"] == method and row["fixed"] == frame]
            if not mine:
                continue
            entry = {f"{name}EF": agreement([row[f"{name}EF_error"] for row in mine]) for name in CHAMBERS}
            for column in ("Overall", "NJD_percent", "HD95", "seconds", "radial", "circumferential"):
                entry[column] = float(np.nanmean([row[column] for row in mine]))
            summary.setdefault(method, {})[f"{frame} fixed"] = entry
        residuals = [row for row in consistency if row["method"] == method]
        if residuals:
            summary[method]["inverse_consistency_mm"] = {
                region: float(np.nanmean([row[f"IC_{region}_mm"] for row in residuals])) for region in ("Myo", "Heart")}
    return summary


def val_markdown(summary: dict[str, Any], patients: int) -> list[str]:
    lines = [f"Validation patients: {patients}. ES fixed carries the ED labels to ES (the readout given ED labels); "
             "ED fixed carries the ES labels to ED. EF error: carried-label EF minus ground-truth EF, percentage "
             "points, model grid.", "",
             "| method | fixed | LVEF MAE | LVEF bias | RVEF MAE | RVEF bias | Overall Dice % | NJD % | HD95 mm | "
             "s/case | radial % | circ. % |", "|---|---|" + "---:|" * 10]
    for method, by_frame in summary.items():
        for frame in FRAMES:
            entry = by_frame.get(f"{frame} fixed")
            if entry is None:
                continue
            lines.append(f"| {method} | {frame} | {entry['LVEF']['MAE']:.1f} | {entry['LVEF']['bias']:+.1f} | "
                         f"{entry['RVEF']['MAE']:.1f} | {entry['RVEF']['bias']:+.1f} | {entry['Overall']:.2f} | "
                         f"{entry['NJD_percent']:.3f} | {entry['HD95']:.2f} | {entry['seconds']:.1f} | "
                         f"{entry['radial']:.1f} | {entry['circumferential']:.1f} |")
    lines += ["", "Inverse consistency (mean residual of the two directions' fields composed, mm):", "",
              "| method | myocardium | heart |", "|---|---:|---:|"]
    for method, by_frame in summary.items():
        if "inverse_consistency_mm" in by_frame:
            residual = by_frame["inverse_consistency_mm"]
            lines.append(f"| {method} | {residual['Myo']:.2f} | {residual['Heart']:.2f} |")
    return lines + [""]


def bland_altman(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """LVEF and RVEF (rows) per method (columns): difference against mean, both directions."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure = Figure(figsize=(3.4 * len(methods), 6.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(methods), squeeze=False, sharey="row")
    colours = {"ES": "tab:red", "ED": "tab:blue"}
    for column, method in enumerate(methods):
        for row_index, name in enumerate(CHAMBERS):
            ax = axes[row_index, column]
            for frame in FRAMES:
                mine = [row for row in rows if row["method"] == method and row["fixed"] == frame]
                mean = [(row[f"{name}EF"] + row[f"{name}EF_ref"]) / 2 for row in mine]
                difference = [row[f"{name}EF_error"] for row in mine]
                stats = agreement(difference)
                label = f"{frame} fixed: bias {stats['bias']:+.1f}, MAE {stats['MAE']:.1f}"
                ax.scatter(mean, difference, s=16, color=colours[frame], label=label)
                for value in (stats["LoA_low"], stats["LoA_high"]):
                    ax.axhline(value, color=colours[frame], linestyle=":", linewidth=0.8)
            ax.axhline(0.0, color="0.4", linewidth=0.8)
            ax.set_title(f"{method}: {name}EF", fontsize=8)
            ax.set_xlabel(f"mean of carried-label and ground-truth {name}EF (%)", fontsize=7)
            ax.set_ylabel("carried - ground truth (EF points)", fontsize=7)
            ax.legend(fontsize=6, loc="lower left")
    figure.suptitle(title, fontsize=8)
    save_figure(figure, path)


def run_val(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    datasets = {frame: ACDCDataset(args.data, split="val", spatial_dims=3, patients=args.patients,
                                   preprocessing=pipe.preprocessing, fixed_frame=frame) for frame in FRAMES}
    names = datasets["ED"].names
    spacing = pipe.preprocessing.model_grid(datasets["ED"].case(0).fixed.grid).model.axis_spacing
    methods = val_methods(pipe, args, spacing)
    rows: list[dict[str, Any]] = []
    consistency: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        pairs = {frame: datasets[frame].preprocessed(index) for frame in FRAMES}
        group = datasets["ED"].metadata(index)["group"]
        one_grid = pairs["ED"].grid.model.same_as(pairs["ES"].grid.model)
        native = datasets["ED"].case(index)
        native_ref = ejection_fractions(native.fixed_labels.array, native.moving_labels.array,
                                        native.fixed_labels.axis_spacing)
        for method, registrar in methods.items():
            fields = {}
            for frame, pair in pairs.items():
                started = time.perf_counter()
                result = registrar(pair.fixed, pair.moving)
                seconds = time.perf_counter() - started
                row = {"method": method, "fixed": frame, **score_case(pair, result, name, group, seconds),
                       **readout_row(pair, result.field, frame),
                       **{f"{key}_native_ref": value for key, value in native_ref.items()}}
                rows.append(row)
                fields[frame] = result.field
                print(f"{name} {method} [{frame} fixed]: LVEF {row['LVEF']:.1f} (truth {row['LVEF_ref']:.1f}), "
                      f"RVEF {row['RVEF']:.1f} ({row['RVEF_ref']:.1f}), Overall {row['Overall']:.1f}, "
                      f"{seconds:.1f} s", flush=True)
            ed_labels = pairs["ED"].fixed_labels
            regions = {"Myo": ed_labels == ACDC_LABELS["Myo"], "Heart": ed_labels > 0}
            consistency.append({"method": method, "case": name, "group": group, "one_grid": one_grid, **{
                f"IC_{region}_mm": inverse_consistency_mm(fields["ED"], fields["ES"], spacing, mask) if one_grid
                else float("nan") for region, mask in regions.items()}})
        summary = val_summary(rows, consistency)
        args.output.mkdir(parents=True, exist_ok=True)
        write_csv(args.output / "cases.csv", rows)
        write_csv(args.output / "consistency.csv", consistency)
        write_report(args.output / "summary.json", {"settings": settings, "patients": names[:index + 1],
                                                     "summary": summary},
                     args.output / "summary.md", [f"# Cardiac readout, validation ({settings['bundle']['model']})", "",
                                                  f"Command: `{settings['command']}`", "",
                                                  *val_markdown(summary, index + 1)])
        bland_altman(rows, args.output / "bland_altman.png",
                     f"{settings['bundle']['model']} and baselines, {index + 1} ACDC validation patients, model grid; "
                     f"{settings['command']}")


# ------------------------------------------------------------------ strain by group
def group_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per direction: mean (std) strain per group and the AUROCs of NOR against DCM and MINF."""
    summary: dict[str, Any] = {}
    for frame in FRAMES:
        mine = [row for row in rows if row["fixed"] == frame]
        if not mine:
            continue
        entry: dict[str, Any] = {"groups": {}, "auroc": {}}
        for group in GROUPS:
            members = [row for row in mine if row["group"] == group]
            if members:
                entry["groups"][group] = {
                    column: {"mean": float(np.mean([row[column] for row in members])),
                             "std": float(np.std([row[column] for row in members], ddof=1)) if len(members) > 1 else 0.0,
                             "min": float(np.min([row[column] for row in members])),
                             "max": float(np.max([row[column] for row in members]))}
                    for column in ("radial", "circumferential", "LVEF_truth")} | {"n": len(members)}
        for disease in ("DCM", "MINF"):
            pair = [row for row in mine if row["group"] in ("NOR", disease)]
            positives = [row["group"] == disease for row in pair]
            # disease: less radial thickening (lower radial), less circumferential shortening (higher)
            entry["auroc"][f"NOR vs {disease}"] = {
                "radial": auroc([-row["radial"] for row in pair], positives),
                "circumferential": auroc([row["circumferential"] for row in pair], positives),
                "LVEF_truth": auroc([-row["LVEF_truth"] for row in pair], positives)}
        summary[f"{frame} fixed"] = entry
    return summary


def strain_markdown(summary: dict[str, Any], method: str, patients: int) -> list[str]:
    lines = [f"Patients: {patients}; method: {method}. Global Lagrangian engineering strain of the LV myocardium "
             "(%, ED reference). ES fixed: strain of the ED labels carried to ES (the readout given ED labels); "
             "ED fixed: strain on the ED ground-truth labels. LVEF_truth: from both frames' ground-truth labels "
             "(context, not a registration output).", ""]
    for frame, entry in summary.items():
        lines += [f"## {frame}", "", "| group | n | radial % | circumferential % | LVEF_truth % |",
                  "|---|---:|---:|---:|---:|"]
        for group, values in entry["groups"].items():
            cells = [f"{values[c]['mean']:.1f} ({values[c]['std']:.1f})" for c in ("radial", "circumferential",
                                                                                   "LVEF_truth")]
            lines.append(f"| {group} | {values['n']} | " + " | ".join(cells) + " |")
        lines += ["", "| AUROC | radial | circumferential | LVEF_truth |", "|---|---:|---:|---:|"]
        for name, values in entry["auroc"].items():
            lines.append(f"| {name} | {values['radial']:.3f} | {values['circumferential']:.3f} | "
                         f"{values['LVEF_truth']:.3f} |")
        lines.append("")
    return lines


def strain_picture(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Global radial and circumferential strain per group (columns: strains; rows: directions)."""
    frames = [frame for frame in FRAMES if any(row["fixed"] == frame for row in rows)]
    figure = Figure(figsize=(9.0, 3.4 * len(frames)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(frames), 2, squeeze=False)
    jitter = np.random.default_rng(0)
    for row_index, frame in enumerate(frames):
        for column, strain in enumerate(("radial", "circumferential")):
            ax = axes[row_index, column]
            for position, group in enumerate(GROUPS):
                values = [row[strain] for row in rows if row["fixed"] == frame and row["group"] == group]
                if values:
                    ax.scatter(position + jitter.uniform(-0.15, 0.15, len(values)), values, s=12, alpha=0.7)
                    ax.hlines(np.mean(values), position - 0.3, position + 0.3, color="k")
            ax.set_xticks(range(len(GROUPS)), GROUPS)
            ax.set_ylabel(f"global {strain} strain (%)", fontsize=8)
            ax.set_title(f"{frame} fixed", fontsize=8)
    figure.suptitle(title, fontsize=8)
    save_figure(figure, path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier run's ``cases.csv`` (numbers as floats), or none."""
    if not path.is_file():
        return []
    with path.open() as stream:
        return [{key: value if key in ("case", "group", "fixed") else float(value) for key, value in row.items()}
                for row in csv.DictReader(stream)]


def group_interleaved(dataset: ACDCDataset, groups: Sequence[str] = GROUPS) -> list[str]:
    """The dataset's patients of ``groups`` with the groups taking turns (the first of each group,
    then the second, ...), so that a run stopped early has measured every group alike."""
    by_group: dict[str, list[str]] = {group: [] for group in groups}
    for index, name in enumerate(dataset.names):
        if dataset.metadata(index)["group"] in by_group:
            by_group[dataset.metadata(index)["group"]].append(name)
    rounds = max((len(members) for members in by_group.values()), default=0)
    return [members[turn] for turn in range(rounds) for members in by_group.values() if turn < len(members)]


def run_strain(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    registrar = (teacher_registrar(pipe.teacher, passes=3) if args.method == "teacher-x3"
                 else pipeline_registrar(pipe, args.steps, seed=args.seed))
    method = "teacher x3 (recursive)" if args.method == "teacher-x3" else f"{args.model} (DDIM {args.steps})"
    rows = read_rows(args.output / "cases.csv") if args.resume else []
    done = {row["case"] for row in rows}
    names = [name for name in group_interleaved(ACDCDataset(args.data, split="all", spatial_dims=3,
                                                            patients=args.patients), args.groups) if name not in done]
    datasets = {frame: ACDCDataset(args.data, split="all", spatial_dims=3, patients=names,
                                   preprocessing=pipe.preprocessing, fixed_frame=frame) for frame in args.fixed_frames}
    for index, name in enumerate(names):
        group = next(iter(datasets.values())).metadata(index)["group"]
        for frame, dataset in datasets.items():
            pair = dataset.preprocessed(index)
            started = time.perf_counter()
            field = registrar(pair.fixed, pair.moving).field
            seconds = time.perf_counter() - started
            spacing = pair.grid.model.axis_spacing
            labels = warp_moving_labels(pair, field) if frame == "ES" else pair.fixed_labels
            strain = myocardial_strain(field, labels, spacing, "moving" if frame == "ES" else "fixed")
            ed, es = (pair.moving_labels, pair.fixed_labels) if frame == "ES" else (pair.fixed_labels, pair.moving_labels)
            rows.append({"case": name, "group": group, "fixed": frame, "radial": strain.radial,
                         "circumferential": strain.circumferential,
                         "LVEF_truth": ejection_fractions(ed, es, spacing)["LVEF"], "seconds": seconds})
            print(f"{name} ({group}) [{frame} fixed]: radial {strain.radial:.1f} %, circumferential "
                  f"{strain.circumferential:.1f} %, {seconds:.1f} s", flush=True)
        summary = group_summary(rows)
        args.output.mkdir(parents=True, exist_ok=True)
        write_csv(args.output / "cases.csv", rows)
        write_report(args.output / "summary.json", {"settings": settings, "method": method, "summary": summary},
                     args.output / "summary.md", [f"# Strain by ACDC group ({settings['bundle']['model']})", "",
                                                  f"Command: `{settings['command']}`", "",
                                                  *strain_markdown(summary, method, len(rows) // len(datasets))])
        strain_picture(rows, args.output / "strain_by_group.png",
                       f"{method} of {settings['bundle']['model']}, {len(rows) // len(datasets)} ACDC training patients; "
                       f"{settings['command']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("val", "strain"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/acdc/training"))
    parser.add_argument("--patients", type=int, nargs="+", help="only these patient numbers")
    parser.add_argument("--model", default="diffusereg/acdc-2d")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps of the model")
    parser.add_argument("--method", choices=("teacher-x3", "model"), default="teacher-x3", help="strain: the method")
    parser.add_argument("--fixed-frames", nargs="+", choices=FRAMES, default=list(FRAMES),
                        help="strain: the directions, by fixed frame")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="strain: only these ACDC groups, taking turns in this order")
    parser.add_argument("--resume", action="store_true", help="strain: keep the patients of OUTPUT/cases.csv")
    parser.add_argument("--skip", nargs="*", default=[], help="val: method names to leave out (e.g. 'ANTs SyN')")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {**run_settings(args, argv, "benchmarks/cardiac.py"), "bundle": bundle(args.model)}
    (run_val if args.part == "val" else run_strain)(args, settings)


if __name__ == "__main__":
    main()
