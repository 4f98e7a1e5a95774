"""Bundle a trained pipeline into the package as a short-named model, with the records that made it.

Run (from the repository root, after training and benchmarking it):

    python benchmarks/bundle_model.py --run runs/refine_2d --benchmark benchmarks/results/acdc_val \
        --name diffusereg/acdc-2d --output src/diffusereg/pretrained/acdc-2d

``--teacher runs/teacher_2d`` ships the pipeline with that teacher run's network as its teacher
component (the denoiser unchanged, not trained further), and bundles that run's records; a
``--run`` folder made from an earlier bundle (its ``pipeline/``, ``config.yaml`` = its
``training/diffusion_config.yaml``, ``log.csv``, ``provenance.json``) keeps that bundle's commands
and commit for the denoiser.

Writes a ``save_pretrained`` folder: the denoiser in float16 (``--dtype float32`` keeps full
precision), the pipeline's teacher component (float32), and ``training/`` with the exact configs
and logs of the diffusion run and of its teacher's run (where the teacher is a run, not a saved
pipeline) and ``provenance.json`` (the commit, the
commands). The model card ``README.md`` is generated from those files and from the benchmark's
``summary.json``: the recipe, the validation during training, and the benchmark table with its
command, and from ``--uncertainty`` folders of ``benchmarks/uncertainty.py`` (what the spread of
the samples means). ``docs/model_card_<folder>.md`` gets the same card. Prints the sizes and the
largest difference between the bundled (upcast) and the trained denoiser weights.

``--refresh-card`` writes the card of the bundle in ``--output`` again from its own ``training/``
records and the given reports, leaving its weights alone (no ``--run``):

    python benchmarks/bundle_model.py --refresh-card --output src/diffusereg/pretrained/acdc-2d \
        --name diffusereg/acdc-2d --benchmark benchmarks/results/acdc_val_both \
        --uncertainty benchmarks/results/uncertainty_val benchmarks/results/uncertainty_val_perturbed \
        benchmarks/results/uncertainty_val_mismatch_small
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open

from diffusereg.evaluation import summary_markdown
from diffusereg.io import write_atomically
from diffusereg.models import RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline

CARD_METHODS = ("identity", "ANTs SyN", "teacher (one-shot)")
"""Benchmark rows every card shows first: no registration and the two baselines."""


def folder_mib(folder: Path) -> float:
    """Total size of the files under ``folder``, MiB."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], capture_output=True, text=True, check=True).stdout.strip()


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def validation_table(log: list[dict[str, str]]) -> str:
    """The rows of a training log with validation metrics, as a Markdown table (Dice in %)."""
    names = ("LV", "Myo", "LVepi", "RV", "Heart", "Overall")
    lines = ["| step | " + " | ".join(names) + " | NJD % |", "|---:|" + "---:|" * (len(names) + 1)]
    for row in log:
        if row.get("val_Dice_Overall"):
            dice = " | ".join(f"{100 * float(row[f'val_Dice_{name}']):.1f}" for name in names)
            lines.append(f"| {row['step']} | {dice} | {float(row['val_NJD_percent']):.3f} |")
    return "\n".join(lines)


def teacher_line(diffusion: dict[str, Any], teacher: dict[str, Any] | None,
                 teacher_log: list[dict[str, str]] | None, swapped: bool) -> str:
    """Where the teacher came from: a teacher run (its config and log are bundled) or a saved pipeline;
    ``swapped``: this teacher replaced the one the denoiser was trained with (``diffusion["teacher"]``)."""
    if teacher is None or teacher_log is None:
        return (f"1. Teacher: the teacher component of `{diffusion['teacher']}`, unchanged (its model card "
                f"describes its training).")
    minutes = float(teacher_log[-1]["elapsed_s"]) / 60
    swap = (f" The denoiser below was trained with the teacher of `{diffusion['teacher']}`; this teacher "
            f"replaced it afterwards, without training the denoiser further (the benchmark measures the "
            f"pair as shipped).") if swapped else ""
    network = ", ".join(f"{key} {value}" for key, value in teacher["model"].items())
    return (f"1. Teacher (`training/teacher_config.yaml`): `RegistrationNet` ({network}) for {teacher['train']['max_steps']} "
            f"steps of batch {teacher['data']['batch_size']}, loss {teacher['loss']['similarity']} (window "
            f"{teacher['loss']['similarity_window']}) + {teacher['loss']['smoothness_weight']} x smoothness, AdamW "
            f"{teacher['optim']['lr']}, {minutes:.0f} minutes, {direction_share(teacher['data'])}; training slices: "
            f"`skip_empty_slices: {str(teacher['data']['skip_empty_slices']).lower()}`.{swap}")


def own_starts(loss: dict[str, Any]) -> str:
    """What the rest of the training starts are: the model's own estimates, or the sampler's own states."""
    schedules = loss.get("own_schedules") or []
    if not schedules:
        return "own estimates the rest"
    return (f"the rest the DDIM sampler's own state after the first k steps of a {' or '.join(map(str, schedules))}"
            f"-step schedule, trained at its next step")


def direction_share(data: dict[str, Any], loss: dict[str, Any] | None = None) -> str:
    """Which way round the training pairs were registered (``data.reverse_share``; configs before it
    said ``loss.swap_prob``)."""
    share = data.get("reverse_share") or (loss or {}).get("swap_prob") or 0.0
    return "ED fixed / ES moving only" if not share else f"a share {share:g} of the pairs ES fixed / ED moving"


def recipe(diffusion: dict[str, Any], teacher: dict[str, Any] | None, diffusion_log: list[dict[str, str]],
           teacher_log: list[dict[str, str]] | None, swapped: bool) -> str:
    """The training recipe, read from the configs and logs."""
    data, loss, optim, train = diffusion["data"], diffusion["loss"], diffusion["optim"], diffusion["train"]
    minutes = float(diffusion_log[-1]["elapsed_s"]) / 60
    return "\n".join([
        teacher_line(diffusion, teacher, teacher_log, swapped),
        f"2. Denoiser (`training/diffusion_config.yaml`): recipe `{loss['recipe']}`, "
        f"{train['max_steps']} steps of batch {data['batch_size']} ({minutes:.0f} minutes), starting from "
        f"`{diffusion['init_weights'] or 'fresh weights'}` with `model: {diffusion['model']}`; target: the teacher "
        f"applied recursively {' or '.join(map(str, np.atleast_1d(loss['target_passes'])))} times (drawn per pair), noised to the "
        f"step's timestep as the sampler's state, weight {loss['target_weight']} -> "
        f"{loss['target_weight_final']}; {loss['similarity_weight']} x (1 - SSIM, window {loss['ssim_window']}) + "
        f"{loss['smoothness_weight']} x smoothness of the refined estimate; starts: zero {loss['zero_start']}, "
        f"teacher field {loss['teacher_start']}, another pair's {loss['other_start']}, {own_starts(loss)}; "
        f"{direction_share(data, loss)}; AdamW {optim['lr']} (weight decay "
        f"{optim['weight_decay']}, {optim['warmup_steps']} warm-up steps, cosine to {optim['min_lr']}), EMA "
        f"{optim['ema_decay']}; training slices: `skip_empty_slices: {str(data['skip_empty_slices']).lower()}`. "
        f"This stage reads no label except to score validation; the networks it starts from keep their own "
        f"slice choice (their cards).",
    ])


def spread_section(reports: list[dict[str, Any]]) -> str:
    """What the spread of the model's samples means, from ``benchmarks/uncertainty.py`` reports:
    a row per group (the pipeline's own samples, and the comparison groups of target distributions)
    with the voxel AUROC of the samples' label disagreement against the boundary-distance baseline
    and the structures' Spearman rho of the field spread against the volume baseline, and one
    sentence saying whether the model's own spread beat both baselines."""
    if not reports:
        return "Not measured for this model (`benchmarks/uncertainty.py`)."
    lines = ["| samples of | wrong voxels: AUROC of the samples' label disagreement | baseline: boundary distance "
             "| structures: Spearman of the field spread with 1 - Dice | baseline: volume |", "|---|---:|---:|---:|---:|"]
    beaten, commands = [], []
    for report in reports:
        own = {f"{steps} steps" for steps in report["settings"]["steps"]}
        commands.append(f"`{report['settings']['command']}`")
        for group, summary in report["summaries"].items():
            auroc, rho = summary["voxels"]["auroc"], summary["structures"]
            disagreement, distance = auroc["disagreement"]["pooled"], auroc["-boundary_distance"]["pooled"]
            spread, volume = rho["field_spread"]["pooled"]["rho"], rho["-volume"]["pooled"]["rho"]
            is_own = report["rows"][group][0]["sampler"] in own
            name = f"this model, {group}" if is_own else f"{group} (not this model: a candidate training target)"
            lines.append(f"| {name} | {disagreement:.3f} | {distance:.3f} | {spread:.3f} | {volume:.3f} |")
            if is_own:
                beaten.append(disagreement > distance and spread >= 0.5 and spread > volume)
    if not beaten:
        raise ValueError("the uncertainty reports hold no group of the pipeline's own samples")
    settings = reports[0]["settings"]
    verdict = ("The samples disagree where the registration is wrong: their spread ranks the wrong voxels "
               "above the distance to the label boundary and the structures' Dice errors above their volume."
               if all(beaten) else
               "The spread of this model's samples is not an uncertainty estimate: it does not point at the "
               "voxels or structures the registration gets wrong better than the distance to the warped "
               "label boundary or the structure's size does, so read it as the sampler's variability, not "
               "as a confidence.")
    return "\n".join([verdict, "", f"{len(settings['cases'])} validation patients x {len(settings['seeds'])} seeds, "
                      f"{', '.join(commands)} (AUROC 0.5: chance):", "", *lines])


def card(name: str, pipe: DiffuseRegPipeline, diffusion: dict[str, Any], teacher: dict[str, Any] | None,
         diffusion_log: list[dict[str, str]], teacher_log: list[dict[str, str]] | None, benchmark: dict[str, Any],
         provenance: dict[str, Any], uncertainty: list[dict[str, Any]]) -> str:
    """The model card, from the bundle's own records and the benchmark reports."""
    swapped = Path(provenance["teacher"]) != Path(diffusion["teacher"])
    config = pipe.denoiser.config
    summaries = benchmark["summary"]
    ordered = {method: summaries[method] for method in (*CARD_METHODS, *summaries) if method in summaries}
    settings = benchmark["settings"]
    parameters = sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6
    earlier = provenance.get("denoiser")
    denoiser_commit = f"; the denoiser was trained at commit `{earlier['commit']}`" if earlier else ""
    return f"""# Model card: `{name}`

Generated by `benchmarks/bundle_model.py` from the configs, logs and benchmark stored with the
model (`training/`; commit `{provenance['commit']}`{denoiser_commit}). It registers 2D slices (a volume
`(D, H, W)` slice by slice: its field has a zero channel 0) of cardiac cine MR ({direction_share(diffusion['data'], diffusion['loss'])}
in its training data), and loads offline:

```python
from diffusereg import DiffuseRegPipeline
pipe = DiffuseRegPipeline.from_pretrained("{name}")
```

## What it is

| | |
|---|---|
| input | fixed and moving images on the model grid: {pipe.config.model_spacing[0]} x {pipe.config.model_spacing[1]} mm in plane ({pipe.config.model_spacing[2]} mm between slices), {' x '.join(map(str, pipe.config.model_size))}, intensities in [0, 1]; `diffusereg register` does this for files in any geometry and maps the result back |
| output | displacement field, voxels, channels first in array-axis order |
| denoiser | `{type(pipe.denoiser).__name__}`, {config.spatial_dims}D, feature size {config.feature_size}, depths {config.depths}, heads {config.num_heads}, window {config.window_size}, {config.fusion} fusion; `prediction_type="{config.prediction_type}"`{' (every step refines the current estimate: it sees the moving image warped by it and predicts a diffeomorphic increment, ' + str(config.integration_steps) + ' scaling-and-squaring steps)' if config.prediction_type == 'increment' else ''}{'; the step is the velocity of the frozen teacher (the `teacher/` component, `proposal`) on the fixed and the warped moving image plus the Swin network as a residual' if config.proposal else ''}{'; self-conditioned: the network reads the noisy field and the previous step estimate' if config.get('self_conditioning') else ''}{'; each of N sampling steps applies min(1, ' + format(config.increment_passes, 'g') + ' / N) of its increment (`increment_passes`)' if config.get('increment_passes') else ''}; {parameters:.1f} M parameters stored in {pipe.denoiser.dtype} |
| scheduler | `{type(pipe.scheduler).__name__}` (DDPM on request), linear betas {pipe.scheduler.config.beta_start:g} .. {pipe.scheduler.config.beta_end:g} over {pipe.scheduler.config.num_train_timesteps} steps |
| teacher | `teacher/`: the one-shot `RegistrationNet` whose fields, applied recursively, were the training target; the one-shot baseline below, and a start (`init_field="teacher"`) |

## Data

ACDC training set (Bernard et al., IEEE TMI 2018): the 90 patients outside the validation split
(patients 010, 020, ..., 100, two per disease group), ED frame = fixed, ES frame = moving, and the
other way round as the recipe below says. The numbers below are on the 10 validation patients, which neither
stage trained on; choices made by looking at them (the recipe, the number of sampling steps) make
them validation numbers, not test numbers.

## Training

{recipe(diffusion, teacher, diffusion_log, teacher_log, swapped)}

Reproduce: `{' && '.join(provenance['commands'])}` (from the repository root, ACDC at
`../shared/data/acdc/training`).

Validation during training (the first {diffusion['validation']['max_pairs']} validation slices, DDIM
{diffusion['validation']['num_inference_steps']} steps, EMA weights; Dice per patient over its
stacked slices, %):

{validation_table(diffusion_log)}

## Results

The 10 validation patients, whole volumes on the model grid (3D Dice over the stacked slices,
paper protocol), seed 0, {settings['threads']} CPU threads, `{settings['command']}`. Mean (std)
over patients; Dice %, NJD % of voxels, HD95 mm, seconds per case.

{summary_markdown(ordered)}
Rows named after a model (`name: DDIM k`) are that model as it was when the benchmark ran; where
the name is this model's own, they are the release this one replaced.

## What the spread of its samples means

{spread_section(uncertainty)}

## Intended use and limits

Research on image registration; not for clinical decisions. Trained on ACDC cine MR only:
other sequences, organs or resolutions need fine-tuning (the documentation's page "Train on your
own data"). 2D: no through-plane motion.
"""


def docs_card(bundle: Path) -> Path:
    """The documentation's copy of a bundle's model card."""
    return Path("docs", f"model_card_{bundle.name.replace('-', '_')}.md")


def refresh_card(bundle: Path, name: str, benchmark: dict[str, Any], uncertainty: list[dict[str, Any]]) -> None:
    """Write the card of an existing bundle again from its own ``training/`` records and the given
    benchmark reports (``README.md`` and the documentation's copy); the weights stay as they are."""
    records = bundle / "training"
    pipe = DiffuseRegPipeline.from_pretrained(bundle)
    with safe_open(bundle / "denoiser" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        pipe.denoiser.to(weights.get_tensor(next(iter(weights.keys()))).dtype)  # the card names the stored dtype
    diffusion = yaml.safe_load((records / "diffusion_config.yaml").read_text())
    teacher_config, teacher_log = records / "teacher_config.yaml", records / "teacher_log.csv"
    teacher = yaml.safe_load(teacher_config.read_text()) if teacher_config.is_file() else None
    text = card(name, pipe, diffusion, teacher, read_log(records / "diffusion_log.csv"),
                read_log(teacher_log) if teacher_log.is_file() else None, benchmark,
                json.loads((records / "provenance.json").read_text()), uncertainty)
    for path in (bundle / "README.md", docs_card(bundle)):
        write_atomically(path, lambda temporary: temporary.write_text(text))
    print(f"{bundle}/README.md and {docs_card(bundle)} written")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="diffusion output folder (pipeline/, config.yaml, log.csv)")
    parser.add_argument("--benchmark", type=Path, required=True, help="benchmarks/acdc.py output folder (summary.json)")
    parser.add_argument("--uncertainty", type=Path, nargs="*", default=[],
                        help="benchmarks/uncertainty.py output folders (summary.json)")
    parser.add_argument("--name", required=True, help="the model's short name, e.g. diffusereg/acdc-2d")
    parser.add_argument("--output", type=Path, required=True, help="the bundle folder")
    parser.add_argument("--refresh-card", action="store_true",
                        help="only write the card of the bundle in --output again (no --run)")
    parser.add_argument("--teacher", type=Path, help="a teacher run folder whose network replaces the pipeline's teacher")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()
    if (args.run is None) != args.refresh_card:
        parser.error("give --run to bundle a run, or --refresh-card to rewrite the card of --output")
    benchmark = json.loads((args.benchmark / "summary.json").read_text())
    uncertainty = [json.loads((folder / "summary.json").read_text()) for folder in args.uncertainty]
    if args.refresh_card:
        refresh_card(args.output, args.name, benchmark, uncertainty)
        return

    pipe = DiffuseRegPipeline.from_pretrained(args.run / "pipeline")
    if pipe.teacher is None:
        raise SystemExit(f"{args.run}/pipeline: the pipeline has no teacher component (train it with diffusereg train)")
    diffusion = yaml.safe_load((args.run / "config.yaml").read_text())
    if args.teacher is not None:
        pipe.teacher = RegistrationNet.from_pretrained(args.teacher / "teacher").eval()
    teacher_run = args.teacher or Path(diffusion["teacher"])
    teacher_is_run = (teacher_run / "log.csv").is_file()  # else a saved pipeline, e.g. diffusereg/acdc-2d-paper
    teacher = yaml.safe_load((teacher_run / "config.yaml").read_text()) if teacher_is_run else None
    teacher_log = read_log(teacher_run / "log.csv") if teacher_is_run else None
    diffusion_log = read_log(args.run / "log.csv")
    earlier = args.run / "provenance.json"  # a run folder made from an earlier bundle keeps its records
    denoiser_provenance = json.loads(earlier.read_text()) if earlier.is_file() else None
    commands = ([f"(at commit {denoiser_provenance['commit'][:7]}) {command}"
                 for command in denoiser_provenance["commands"] if "train teacher" not in command]
                if denoiser_provenance else [f"diffusereg train diffusion --config configs/{args.run.name}_cpu.yaml"])
    if teacher_is_run:
        commands.insert(0, f"diffusereg train teacher --config configs/{teacher_run.name}_cpu.yaml")
    provenance = {
        "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
        "teacher": str(teacher_run), "commands": commands, "benchmark": benchmark["settings"]["command"],
    }
    if denoiser_provenance is not None:
        provenance["denoiser"] = denoiser_provenance
    original = {name: tensor.clone() for name, tensor in pipe.denoiser.state_dict().items()}
    temporary = args.output.with_name(f".{args.output.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    pipe.denoiser.to(getattr(torch, args.dtype))
    text = card(args.name, pipe, diffusion, teacher, diffusion_log, teacher_log, benchmark, provenance, uncertainty)
    pipe.save_pretrained(temporary, model_card=text)
    for config_file in temporary.rglob("*.json"):  # no path of this machine in a shipped config
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    records = temporary / "training"
    records.mkdir()
    shutil.copy(args.run / "config.yaml", records / "diffusion_config.yaml")
    shutil.copy(args.run / "log.csv", records / "diffusion_log.csv")
    if teacher_is_run:
        shutil.copy(teacher_run / "config.yaml", records / "teacher_config.yaml")
        shutil.copy(teacher_run / "log.csv", records / "teacher_log.csv")
    (records / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if args.output.exists():
        shutil.rmtree(args.output)
    temporary.rename(args.output)
    write_atomically(docs_card(args.output), lambda temporary: temporary.write_text(text))

    bundled = DiffuseRegPipeline.from_pretrained(args.output).denoiser.state_dict()
    error = max(float((bundled[name].float() - tensor.float()).abs().max()) for name, tensor in original.items())
    print(f"{args.output}: {folder_mib(args.output):.1f} MiB; denoiser {args.dtype}, "
          f"largest weight change {error:.2e}")


if __name__ == "__main__":
    main()
