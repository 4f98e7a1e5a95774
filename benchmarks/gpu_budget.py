"""DiffuseReg on one lent GPU within a fixed time budget (the runs behind docs/evaluation.md,
"On a GPU"). ``--phases`` picks, in order, from:

- ``timings_3d``, ``timings_2d``: the 3D denoiser's forward pass (fp32 / bf16 autocast, peak
  memory); the shipped 2D pipeline on the validation volumes (Dice, seconds per case);
- ``teacher_3d``, ``diffusion_3d``, ``evaluate_3d``: the 3D teacher, then the 3D denoiser
  (clean-field prediction) on its fields, both scored on the validation patients;
- ``finetune_2d``, ``evaluate_2d``, ``ddpm_2d``: a 2D denoiser (``--finetune-init``, by default the
  shipped one) fine-tuned as ``configs/finetune_2d_gpu.yaml`` says on the training slices, with
  the shipped pipeline's teacher run on every batch, saved in float16 to ``--out/tuned_2d``;
  shipped and fine-tuned scored at DDIM 1 / 5 / 10; then the better of the two (DDIM 10 Overall)
  sampled with DDPM over all 2000 steps on as many validation patients as the budget allows.

Each training stage runs a short throughput probe, then resumes (``Trainer(resume=True)``, which
stretches the cosine) with the number of steps that fits its share of the budget. Scores:
:func:`diffusereg.evaluation.evaluate` on the validation patients (model grid, 3D Dice over the
volume, Dice in percent).

The data come from ``benchmarks/pack_acdc_3d.py`` (uint8 images, in memory, read by
``benchmarks/packed_acdc.py``): the stages train on
them through :class:`PackedTeacherStage` / :class:`PackedDiffusionStage` and validate on them
(the stages' ``train_dataset`` and ``val_dataset``), so the machine needs neither the ACDC files nor SimpleITK. Results go
to ``--out`` (``results.json``, the stages' ``log.csv``).

    python benchmarks/pack_acdc_3d.py --output .gpu                     # here
    PYTHONPATH=.gpu/stubs:src python benchmarks/gpu_budget.py --data .gpu/acdc3d.xz --out results --budget SECONDS
    # --smoke: a CPU dry run on (32, 64, 64) crops with a few steps per stage
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import Dataset

from diffusereg.evaluation import Registrar, evaluate, pipeline_registrar, summarize, teacher_registrar
from diffusereg.models import DiffuseRegDenoiser, RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import scheduler_of_kind
from diffusereg.training.config import DiffusionConfig, TeacherConfig, load_config
from diffusereg.training.data import WithPhi0
from diffusereg.training.diffusion import DiffusionStage
from diffusereg.training.teacher import TeacherStage
from diffusereg.training.trainer import Trainer
from packed_acdc import Item, PackedCases, PackedData, labelled_slices, load_data

SHIPPED_2D = "diffusereg/acdc-2d"


# ---------------------------------------------------------------- training on the packed data
class PackedTeacherStage(TeacherStage):
    """:class:`~diffusereg.training.teacher.TeacherStage` on the packed training volumes instead of
    the files ``config.data`` names."""

    def __init__(self, config: TeacherConfig, data: PackedData) -> None:
        super().__init__(config)
        self.data = data

    def train_dataset(self) -> Dataset:
        return self.data.dataset("train", self.config.data.spatial_dims)

    def val_dataset(self) -> Dataset:
        return self.data.dataset("val", self.config.data.spatial_dims, self.config.validation.max_pairs)


class PackedDiffusionStage(DiffusionStage):
    """:class:`~diffusereg.training.diffusion.DiffusionStage` on the packed training volumes or
    slices (with the teacher's cached fields when ``phi0_source`` is ``cache``)."""

    def __init__(self, config: DiffusionConfig, data: PackedData) -> None:
        super().__init__(config)
        self.data = data

    def train_dataset(self) -> Dataset:
        dataset = self.data.dataset("train", self.config.data.spatial_dims)
        return dataset if self.config.phi0_source == "teacher" else WithPhi0(dataset, self.source.cache)

    def val_dataset(self) -> Dataset:
        return self.data.dataset("val", self.config.data.spatial_dims, self.config.validation.max_pairs)


PackedStage = PackedTeacherStage | PackedDiffusionStage


def reset_accelerate() -> None:
    """Forget the previous Accelerator's settings (the stages differ in mixed precision)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------- the run
@dataclass
class Harness:
    """What the phases share: the flags, the device, the data, the clock and the results so far."""

    args: argparse.Namespace
    device: torch.device
    data: PackedData
    results: dict[str, Any]
    started: float

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def runs(self) -> Path:
        return Path(self.args.runs)

    def left(self) -> float:
        """Seconds of ``--budget`` left (infinite without one)."""
        return math.inf if self.args.budget is None else self.args.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        """Write ``results.json``."""
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=float))

    def log(self, *parts: Any) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s]", *parts, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def score(harness: Harness, name: str, registrar: Registrar, items: list[Item] | None = None) -> list[dict[str, Any]]:
    """Evaluate ``registrar`` on ``items`` (default: the validation volumes) with
    :func:`diffusereg.evaluation.evaluate`; store rows, summary and seconds under
    ``evaluation/<name>`` of the results and return the rows."""
    rows = evaluate(PackedCases(harness.data.val if items is None else items), registrar, description=name,
                    progress=False)
    summary = summarize(rows)
    seconds = [row["seconds"] for row in rows]
    harness.results.setdefault("evaluation", {})[name] = {
        "summary": summary, "seconds_first": seconds[0], "seconds_median": float(np.median(seconds)), "rows": rows}
    harness.save()
    mean = {column: summary[column]["mean"] for column in summary}
    harness.log(f"{name}: Overall {mean['Overall']:.2f} LV {mean['LV']:.2f} Myo {mean['Myo']:.2f} "
                f"RV {mean['RV']:.2f} NJD {mean['NJD_percent']:.3f} JSD {mean['JSD']:.3f} "
                f"{np.median(seconds):.3f} s/case (median)")
    return rows


def forward_seconds(harness: Harness, model: Callable[..., Any], inputs: Sequence[torch.Tensor], repeats: int,
                    autocast: torch.dtype | None = None) -> float:
    """Mean seconds of ``model(*inputs)`` over ``repeats`` calls after 3 warm-up calls."""
    enabled = autocast is not None and harness.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=autocast, enabled=enabled):
        for _ in range(3):
            model(*inputs)
        harness.sync()
        started = time.perf_counter()
        for _ in range(repeats):
            model(*inputs)
        harness.sync()
    return (time.perf_counter() - started) / repeats


def train_stage(harness: Harness, name: str, stage_cls: type[PackedStage], config: TeacherConfig | DiffusionConfig,
                seconds: float, probe_steps: int) -> float:
    """Probe ``probe_steps`` steps, then resume with the number of steps that fits ``seconds``;
    the stage's record goes to ``training/<name>`` of the results. Returns seconds per step."""
    config.train.max_steps = 10**6
    config.train.checkpoint_every = 10**6
    config.validation.every = 0
    if harness.args.smoke:
        config.data.size = list(harness.data.train[0]["fixed"].shape[1:])
    started = time.monotonic()
    reset_accelerate()
    trainer = Trainer(stage_cls(config, harness.data), resume=False)
    setup_s = time.monotonic() - started
    stamps: dict[int, float] = {}

    def stamp(step: int, batch: dict[str, Any], losses: dict[str, torch.Tensor]) -> None:
        harness.sync()
        stamps[step] = time.monotonic()

    trainer.fit(until_step=probe_steps, on_step=stamp)
    warm = min(5, probe_steps - 2)
    per_step = (stamps[probe_steps] - stamps[warm]) / (probe_steps - warm)
    trainer.close()
    remaining = seconds - (time.monotonic() - started)
    total = max(probe_steps + 10, int(probe_steps + remaining / per_step))
    harness.log(f"{name}: setup {setup_s:.1f} s, {per_step * 1000:.0f} ms/step -> max_steps {total}")
    config.train.max_steps = total
    config.train.checkpoint_every = max(total // 4, 1)
    reset_accelerate()
    trainer = Trainer(stage_cls(config, harness.data), resume=True)
    trained = time.monotonic()
    last = trainer.fit()
    trainer.close()
    harness.results.setdefault("training", {})[name] = {
        "steps": total, "probe_ms_per_step": per_step * 1000, "train_s": time.monotonic() - trained,
        "batch_size": config.data.batch_size, "last_row": last, "mixed_precision": config.train.mixed_precision}
    harness.log(name, harness.results["training"][name])
    return per_step


def copy_log(harness: Harness, config: TeacherConfig | DiffusionConfig, name: str) -> None:
    """The stage's ``log.csv`` as ``--out/<name>_log.csv``."""
    (harness.out / f"{name}_log.csv").write_bytes(Path(config.train.output_dir, "log.csv").read_bytes())


# ---------------------------------------------------------------- 1. timings
def timings_2d(harness: Harness) -> None:
    """The shipped 2D pipeline: denoiser forward on one volume's slices, DDIM 1 / 5 / 10 scores
    (fp32) and DDIM 10 in float16 weights (GPU only)."""
    device, val = harness.device, harness.data.val
    for label, kwargs in (("fp32", {}), ("fp16", {"dtype": torch.float16})):
        if label == "fp16" and device.type != "cuda":
            continue
        pipe = DiffuseRegPipeline.from_pretrained(SHIPPED_2D, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        den = pipe.denoiser
        x = val[0]["fixed"][0].to(device)[:, None].to(den.dtype)  # the volume's slices as one batch
        t = torch.full((x.shape[0],), 500, device=device, dtype=torch.long)
        zero_field = torch.zeros(x.shape[0], 2, *x.shape[2:], device=device, dtype=den.dtype)
        with torch.no_grad():
            cond = den.encode_condition(x, x)
        key = f"shipped2d_{label}_forward_s_per_volume"
        harness.results[key] = forward_seconds(harness, lambda f, s: den(f, s, condition=cond), (zero_field, t),
                                               repeats=harness.args.repeats)
        for steps in ((1, 5, 10) if label == "fp32" else (10,)):
            score(harness, f"shipped2d_{label}_ddim{steps}", pipeline_registrar(pipe, steps))
        harness.log(label, "forward", harness.results[key])


def timings_3d(harness: Harness) -> None:
    """The 3D denoiser of ``configs/diffusion_3d_gpu.yaml``: forward seconds with and without the
    condition encoder, fp32 and bf16 autocast (GPU), peak memory."""
    device, repeats = harness.device, harness.args.repeats
    config = load_config("configs/diffusion_3d_gpu.yaml", DiffusionConfig)
    den = DiffuseRegDenoiser(**config.model).to(device).eval()
    harness.results["denoiser3d_params_M"] = sum(p.numel() for p in den.parameters()) / 1e6
    shape = (1, 1, *harness.data.val[0]["fixed"].shape[1:])
    img = torch.rand(shape, device=device)
    noisy = torch.randn(1, 3, *shape[2:], device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    with torch.no_grad():
        cond = den.encode_condition(img, img)
    timing = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16))[: 2 if device.type == "cuda" else 1]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timing[f"forward_{label}_s"] = forward_seconds(harness, lambda f, s: den(f, s, condition=cond), (noisy, t),
                                                       repeats=repeats, autocast=dtype)
        timing[f"forward_with_encoder_{label}_s"] = forward_seconds(
            harness, lambda f, s: den(f, s, condition=den.encode_condition(img, img)), (noisy, t), repeats=repeats,
            autocast=dtype)
        if device.type == "cuda":
            timing[f"peak_mem_{label}_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    harness.results["denoiser3d_timing"] = timing
    harness.log(timing)


# ---------------------------------------------------------------- 2. the 3D stages
def teacher_3d(harness: Harness) -> None:
    """``configs/teacher_3d_gpu.yaml`` at a higher learning rate for ``--teacher-s``; scored."""
    config = load_config("configs/teacher_3d_gpu.yaml", TeacherConfig)
    config.train.output_dir = str(harness.runs / "teacher_3d")
    config.data.num_workers = 0
    config.optim.lr = 1e-3  # as the 2D teacher; a few minutes, not 30000 steps
    config.data.batch_size = 4
    config.train.mixed_precision = "no"
    config.train.log_every = 50
    train_stage(harness, "teacher_3d", PackedTeacherStage, config, harness.args.teacher_s,
                probe_steps=8 if harness.args.smoke else 25)
    copy_log(harness, config, "teacher_3d")
    model = RegistrationNet.from_pretrained(harness.runs / "teacher_3d" / "teacher").to(harness.device).eval()
    score(harness, "teacher3d", teacher_registrar(model))


def diffusion_3d(harness: Harness) -> None:
    """``configs/diffusion_3d_gpu.yaml`` (clean-field prediction) on the fields of ``teacher_3d``
    for ``--diffusion-s``."""
    config = load_config("configs/diffusion_3d_gpu.yaml", DiffusionConfig)
    config.train.output_dir = str(harness.runs / "diffusion_3d")
    config.teacher = str(harness.runs / "teacher_3d")
    config.data.num_workers = 0
    config.data.batch_size = 2
    config.model["prediction_type"] = "sample"  # as the shipped 2D model (docs/training.md)
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 50
    config.train.mixed_precision = "bf16" if harness.device.type == "cuda" else "no"
    config.train.log_every = 50
    config.validation.num_inference_steps = 10
    train_stage(harness, "diffusion_3d", PackedDiffusionStage, config,
                min(harness.args.diffusion_s, harness.left() - 90), probe_steps=7 if harness.args.smoke else 15)
    copy_log(harness, config, "diffusion_3d")


def evaluate_3d(harness: Harness) -> None:
    """The 3D pipeline of ``diffusion_3d`` at DDIM 1 / 5 / 10, while the budget lasts."""
    pipe = DiffuseRegPipeline.from_pretrained(harness.runs / "diffusion_3d" / "pipeline").to(harness.device)
    harness.results["diffusion3d_params_M"] = sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 5, 10):
        if harness.left() < 25:
            break
        score(harness, f"diffusereg3d_ddim{steps}", pipeline_registrar(pipe, steps))


# ---------------------------------------------------------------- 3. the shipped 2D model, fine-tuned
def finetune_2d(harness: Harness) -> None:
    """``configs/finetune_2d_gpu.yaml`` from ``--finetune-init`` with the shipped pipeline's teacher,
    for the steps that fit ``--finetune-s``; saved in float16 to ``--out/tuned_2d``."""
    args = harness.args
    config = load_config("configs/finetune_2d_gpu.yaml", DiffusionConfig)
    config.init_weights, config.teacher = args.finetune_init, SHIPPED_2D
    config.train.output_dir = str(harness.runs / "finetune_2d")
    config.data.num_workers = 0
    if args.finetune_batch is not None:
        config.data.batch_size = args.finetune_batch
    if harness.device.type != "cuda":
        config.train.mixed_precision = "no"
    harness.results["finetune_2d_slices"] = len(labelled_slices(harness.data.train))
    train_stage(harness, "finetune_2d", PackedDiffusionStage, config, min(args.finetune_s, harness.left() - 150),
                probe_steps=6 if args.smoke else 15)
    copy_log(harness, config, "finetune_2d")
    tuned = DiffuseRegPipeline.from_pretrained(harness.runs / "finetune_2d" / "pipeline")
    tuned.denoiser.to(torch.float16)
    tuned.save_pretrained(harness.out / "tuned_2d")


def pipeline_2d(harness: Harness, name: str) -> DiffuseRegPipeline:
    """The shipped (``"shipped"``) or fine-tuned (``"tuned"``) 2D pipeline in float32 on the device."""
    path = SHIPPED_2D if name == "shipped" else harness.runs / "finetune_2d" / "pipeline"
    pipe = DiffuseRegPipeline.from_pretrained(path).to(harness.device)
    pipe.denoiser.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_2d(harness: Harness) -> None:
    """Fine-tuned and shipped 2D pipelines at DDIM 1 / 5 / 10."""
    for name in ("tuned", "shipped"):
        pipe = pipeline_2d(harness, name)
        for steps in (1, 5, 10):
            score(harness, f"{name}2d_ddim{steps}", pipeline_registrar(pipe, steps))


def ddpm_2d(harness: Harness) -> None:
    """``--ddpm-model`` sampled with DDPM over ``--ddpm-steps``, case by case while the budget lasts."""
    args, device = harness.args, harness.device
    name = args.ddpm_model
    if name == "best":
        evaluation = harness.results.get("evaluation", {})
        if not {"tuned2d_ddim10", "shipped2d_ddim10"} <= set(evaluation):
            raise RuntimeError("--ddpm-model best compares the evaluate_2d scores: run that phase first, "
                               "or name the model (--ddpm-model shipped / tuned)")
        scores = {model: evaluation[f"{model}2d_ddim10"]["summary"]["Overall"]["mean"]
                  for model in ("tuned", "shipped")}
        name = max(scores, key=scores.get)
    pipe = pipeline_2d(harness, name)
    den, x = pipe.denoiser, harness.data.val[0]["fixed"][0].to(device)[:, None]
    t = torch.full((x.shape[0],), 500, device=device, dtype=torch.long)
    with torch.no_grad():
        cond = den.encode_condition(x, x)
    forward_s = forward_seconds(harness, lambda f, s: den(f, s, condition=cond),
                                (torch.zeros(x.shape[0], 2, *x.shape[2:], device=device), t), repeats=args.repeats)
    pipe.scheduler = scheduler_of_kind(pipe.scheduler, "ddpm")
    register = pipeline_registrar(pipe, args.ddpm_steps)
    record = harness.results["ddpm_2d"] = {"model": name, "steps": args.ddpm_steps, "forward_s_per_volume": forward_s,
                                           "rows": []}
    for item in harness.data.val:
        expected = args.ddpm_steps * forward_s * 1.3 + 5
        if harness.left() < expected:
            harness.log(f"ddpm: {harness.left():.0f} s left, a case needs ~{expected:.0f} s: stop")
            break
        record["rows"] += score(harness, f"ddpm_{item['patient']}", register, [item])
        harness.save()


PHASES: dict[str, Callable[[Harness], None]] = {
    "timings_3d": timings_3d, "timings_2d": timings_2d, "teacher_3d": teacher_3d, "diffusion_3d": diffusion_3d,
    "evaluate_3d": evaluate_3d, "finetune_2d": finetune_2d, "evaluate_2d": evaluate_2d, "ddpm_2d": ddpm_2d}


def run_phase(harness: Harness, name: str) -> None:
    """Run one phase; a failure is recorded under ``errors/<name>`` and does not stop the later ones."""
    harness.log(f"== {name} ({harness.left():.0f} s left)")
    try:
        PHASES[name](harness)
    except Exception:  # a failed phase must not cost the later ones
        harness.results.setdefault("errors", {})[name] = traceback.format_exc()
        traceback.print_exc()
    harness.save()


# ---------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_budget", help="folder for results.json, the logs and tuned_2d")
    parser.add_argument("--budget", type=float, help="seconds for the whole script (default: no limit)")
    parser.add_argument("--teacher-s", type=float, default=80.0)
    parser.add_argument("--diffusion-s", type=float, default=240.0)
    parser.add_argument("--val-cases", type=int, default=10)
    parser.add_argument("--data", default=".gpu/acdc3d.xz", help="benchmarks/pack_acdc_3d.py output")
    parser.add_argument("--runs", help="where the stages write checkpoints and models (default: a new temporary "
                                       "folder; later phases in another call need the same --runs)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: cropped (32, 64, 64) volumes, few steps")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--phases", nargs="+", choices=PHASES,
                        default=["timings_3d", "timings_2d", "teacher_3d", "diffusion_3d", "evaluate_3d"])
    parser.add_argument("--finetune-s", type=float, default=240.0)
    parser.add_argument("--finetune-init", default=SHIPPED_2D,
                        help="pipeline finetune_2d starts from (run 3 started from the first release, then the "
                             "shipped model)")
    parser.add_argument("--finetune-batch", type=int, help="override the config's batch size")
    parser.add_argument("--ddpm-steps", type=int, default=2000, help="DDPM sampling steps (2000: the full chain)")
    parser.add_argument("--ddpm-model", choices=("best", "shipped", "tuned"), default="best",
                        help="model sampled by ddpm_2d; best: the higher DDIM 10 Overall of evaluate_2d")
    parser.add_argument("--val-patients", nargs="+", help="only these validation patients (e.g. patient040)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``--phases`` in order; ``results.json`` is rewritten after every step of them."""
    args = parse_args(argv)
    started = time.monotonic()
    if args.runs is None:
        args.runs = tempfile.mkdtemp(prefix="gpu_budget_runs_")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, args.smoke)
    val = [item for item in data.val if args.val_patients is None or item["patient"] in args.val_patients]
    data = PackedData(data.train, val[: args.val_cases])
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "data": {"train_patients": len(data.train), "val_patients": [item["patient"] for item in data.val],
                        "images": "uint8-quantised model-grid volumes (32, 128, 128)"}}
    harness = Harness(args, device, data, results, started)
    harness.log("data", len(data.train), len(data.val), "runs in", args.runs)
    for name in args.phases:
        run_phase(harness, name)
    results["total_s"] = time.monotonic() - started
    harness.save()
    harness.log("done")


if __name__ == "__main__":
    main()
