"""DiffuseReg on one lent GPU within a fixed time budget (the runs behind docs/evaluation.md,
"On a GPU"). ``--phases`` picks, in order, from:

- ``timings_3d``, ``timings_2d``: the 3D denoiser's forward pass (fp32 / bf16 autocast, peak
  memory); the shipped 2D pipeline on the validation volumes (Dice, seconds per case);
- ``teacher_3d``, ``diffusion_3d``, ``evaluate_3d``: the 3D teacher, then the 3D denoiser
  (clean-field prediction) on its fields, both scored on the validation patients;
- ``finetune_2d``, ``evaluate_2d``, ``ddpm_2d``: a 2D denoiser (``--finetune-init``, by default the
  shipped one) fine-tuned as ``configs/finetune_2d_gpu.yaml`` says on the training slices, with
  the shipped teacher run on every batch, saved in float16 to ``--out/tuned_2d``; shipped and fine-tuned scored at DDIM 1 / 5 / 10; then the
  better of the two (DDIM 10 Overall) sampled with DDPM over all 2000 steps on as many
  validation patients as the budget allows.

Each training stage runs a short throughput probe, then resumes (``Trainer(resume=True)``, which
stretches the cosine) with the number of steps that fits its share of the budget. Scores: the
validation patients on the model grid, 3D Dice over the volume.

The data come from ``benchmarks/pack_acdc_3d.py`` (uint8 images, in memory; the trainer's
``build_dataset`` is replaced by the in-memory split), so the machine needs neither the ACDC files
nor SimpleITK. Results go to ``--out`` (``results.json``, the stages' ``log.csv``).

    python benchmarks/pack_acdc_3d.py --output .gpu                     # here
    PYTHONPATH=.gpu/stubs:src python benchmarks/gpu_budget.py --data .gpu/acdc3d.xz --out results
    # --smoke: a CPU dry run on (32, 64, 64) crops with a few steps per stage
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch

START = time.monotonic()
parser = argparse.ArgumentParser()
parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
parser.add_argument("--budget", type=float, default=500.0, help="seconds for the whole script")
parser.add_argument("--teacher-s", type=float, default=80.0)
parser.add_argument("--diffusion-s", type=float, default=240.0)
parser.add_argument("--val-cases", type=int, default=10)
parser.add_argument("--data", default=".gpu/acdc3d.xz", help="benchmarks/pack_acdc_3d.py output")
parser.add_argument("--runs", default="/tmp/gpu_runs", help="where the stages write checkpoints and models")
parser.add_argument("--smoke", action="store_true", help="CPU dry run: cropped (32, 64, 64) volumes, few steps")
parser.add_argument("--repeats", type=int, default=10)
parser.add_argument("--phases", nargs="+", default=["timings_3d", "timings_2d", "teacher_3d", "diffusion_3d",
                                                     "evaluate_3d"])
parser.add_argument("--finetune-s", type=float, default=240.0)
parser.add_argument("--finetune-init", default="diffusereg/acdc-2d",
                    help="pipeline finetune_2d starts from (run 3 started from the first release, then the shipped model)")
parser.add_argument("--finetune-batch", type=int, help="override the config's batch size")
parser.add_argument("--ddpm-steps", type=int, default=2000, help="DDPM sampling steps (2000: the full chain)")
parser.add_argument("--ddpm-model", choices=("best", "shipped", "tuned"), default="best",
                    help="model sampled by ddpm_2d; best: the higher DDIM 10 Overall of evaluate_2d")
parser.add_argument("--val-patients", nargs="+", help="only these validation patients (e.g. patient040)")
args = parser.parse_args()
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cudnn.benchmark = True
AXIS_SPACING = (3.15, 1.5, 1.5)


def left() -> float:
    return args.budget - (time.monotonic() - START)


def save() -> None:
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1, default=float))


def log(*parts) -> None:
    print(f"[{time.monotonic() - START:6.1f}s]", *parts, flush=True)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- data
def load_data(path: str):
    with lzma.open(path, "rb") as f:
        names, groups, n_train = np.load(f), np.load(f), int(np.load(f)[0])
        fixed = np.cumsum(np.load(f), axis=1, dtype=np.uint8)
        moving = np.cumsum(np.load(f), axis=1, dtype=np.uint8)
        fixed_labels, moving_labels = np.load(f), np.load(f)
    items = []
    for i in range(len(names)):
        items.append({
            "fixed": torch.from_numpy(fixed[i]).float()[None] / 255.0,
            "moving": torch.from_numpy(moving[i]).float()[None] / 255.0,
            "fixed_labels": torch.from_numpy(fixed_labels[i].astype(np.int64))[None],
            "moving_labels": torch.from_numpy(moving_labels[i].astype(np.int64))[None],
            "patient": str(names[i]), "group": str(groups[i]),
        })
    if args.smoke:
        for item in items:
            for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
                item[key] = item[key][:, :, 32:96, 32:96].contiguous()
    return items[:n_train], items[n_train:]


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


TRAIN, VAL = load_data(args.data)
if args.val_patients:
    VAL = [item for item in VAL if item["patient"] in args.val_patients]
VAL = VAL[: args.val_cases]
RESULTS["data"] = {"train_patients": len(TRAIN), "val_patients": [v["patient"] for v in VAL],
                   "images": "uint8-quantised model-grid volumes (32, 128, 128)"}
log("data", len(TRAIN), len(VAL))

import diffusereg.training.data as tdata  # noqa: E402
import diffusereg.training.diffusion as tdiff  # noqa: E402
import diffusereg.training.teacher as tteach  # noqa: E402
import diffusereg.training.trainer as ttrainer  # noqa: E402
from diffusereg.evaluation import RegistrationResult, pipeline_registrar, teacher_registrar, warp_labels  # noqa: E402
from diffusereg.metrics import acdc_case_metrics  # noqa: E402
from diffusereg.models import DiffuseRegDenoiser, RegistrationNet  # noqa: E402
from diffusereg.pipelines import DiffuseRegPipeline  # noqa: E402
from diffusereg.training.config import DiffusionConfig, TeacherConfig, load_config  # noqa: E402


def labelled_slices(volumes):
    """2D items of the slices where either frame holds a label (``skip_empty_slices``)."""
    items = []
    for item in volumes:
        for d in range(item["fixed"].shape[1]):
            if item["fixed_labels"][0, d].any() or item["moving_labels"][0, d].any():
                items.append({**{key: item[key][:, d] for key in ("fixed", "moving", "fixed_labels", "moving_labels")},
                              "patient": item["patient"], "group": item["group"], "slice": d})
    return items


def in_memory_dataset(data, split, max_items=None):
    chosen = TRAIN if split == "train" else VAL
    if data.spatial_dims == 2:
        chosen = labelled_slices(chosen)
    return Items(chosen if max_items is None else chosen[:max_items])


for module in (tdata, tdiff, tteach, ttrainer):
    module.build_dataset = in_memory_dataset


# ---------------------------------------------------------------- evaluation
def evaluate(name: str, registrar, cases=None) -> dict:
    rows = []
    for item in VAL if cases is None else cases:
        fixed, moving = item["fixed"][0].numpy(), item["moving"][0].numpy()
        sync()
        started = time.perf_counter()
        result: RegistrationResult = registrar(fixed, moving)
        sync()
        seconds = time.perf_counter() - started
        warped_labels = warp_labels(item["moving_labels"][0].numpy(), result.field)
        m = acdc_case_metrics(warped_labels, item["fixed_labels"][0].numpy(), result.field, axis_spacing=AXIS_SPACING)
        rows.append({"case": item["patient"], **{k: float(v) for k, v in m.items()}, "seconds": seconds,
                     "steps_run": result.steps_run})
    summary = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k not in ("case", "steps_run")}
    summary["seconds_first"] = rows[0]["seconds"]
    summary["seconds_median"] = float(np.median([r["seconds"] for r in rows]))
    RESULTS.setdefault("evaluation", {})[name] = {"summary": summary, "rows": rows}
    save()
    log(f"{name}: Overall {100 * summary['Dice_Overall']:.2f} LV {100 * summary['Dice_LV']:.2f} "
        f"Myo {100 * summary['Dice_Myo']:.2f} RV {100 * summary['Dice_RV']:.2f} NJD {summary['NJD_percent']:.3f} "
        f"JSD {summary['JSD']:.3f} {summary['seconds_median']:.3f} s/case (median)")
    return summary


def forward_seconds(model, inputs, repeats=10, autocast=None) -> float:
    with torch.no_grad(), torch.autocast("cuda", dtype=autocast, enabled=autocast is not None and DEVICE.type == "cuda"):
        for _ in range(3):
            model(*inputs)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            model(*inputs)
        sync()
    return (time.perf_counter() - started) / repeats


def phase(name):
    def wrap(fn):
        def run():
            log(f"== {name} ({left():.0f} s left)")
            try:
                fn()
            except Exception:  # a failed phase must not cost the later ones
                RESULTS.setdefault("errors", {})[name] = traceback.format_exc()
                traceback.print_exc()
            save()
        return run
    return wrap


# ---------------------------------------------------------------- 1. timings
@phase("timings_2d_shipped")
def timings_2d():
    for label, kwargs in (("fp32", {}), ("fp16", {"torch_dtype": torch.float16})):
        if label == "fp16" and DEVICE.type != "cuda":
            continue
        pipe = DiffuseRegPipeline.from_pretrained("diffusereg/acdc-2d", **kwargs).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        den = pipe.denoiser
        dtype = next(den.parameters()).dtype
        x = VAL[0]["fixed"][0].to(DEVICE)[:, None].to(dtype)  # the volume's 32 slices as one batch
        t = torch.full((x.shape[0],), 500, device=DEVICE, dtype=torch.long)
        field = torch.zeros(x.shape[0], 2, *x.shape[2:], device=DEVICE, dtype=dtype)
        with torch.no_grad():
            cond = den.encode_condition(x, x)
        RESULTS[f"shipped2d_{label}_forward_s_per_volume"] = forward_seconds(
            lambda f, s: den(f, s, condition=cond), (field, t), repeats=args.repeats)
        for steps in ((1, 5, 10) if label == "fp32" else (10,)):
            evaluate(f"shipped2d_{label}_ddim{steps}", pipeline_registrar(pipe, steps))
        log(label, "forward", RESULTS[f"shipped2d_{label}_forward_s_per_volume"])


@phase("timings_3d_denoiser")
def timings_3d():
    config = load_config("configs/diffusion_3d_gpu.yaml", DiffusionConfig)
    den = DiffuseRegDenoiser(**config.model).to(DEVICE).eval()
    RESULTS["denoiser3d_params_M"] = sum(p.numel() for p in den.parameters()) / 1e6
    shape = (1, 1, *(VAL[0]["fixed"].shape[1:]))
    img = torch.rand(shape, device=DEVICE)
    field = torch.randn(1, 3, *shape[2:], device=DEVICE)
    t = torch.full((1,), 500, device=DEVICE, dtype=torch.long)
    with torch.no_grad():
        cond = den.encode_condition(img, img)
    timing = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16))[: 2 if DEVICE.type == "cuda" else 1]:
        torch.cuda.reset_peak_memory_stats() if DEVICE.type == "cuda" else None
        timing[f"forward_{label}_s"] = forward_seconds(lambda f, s: den(f, s, condition=cond), (field, t),
                                                       repeats=args.repeats, autocast=dtype)
        timing[f"forward_with_encoder_{label}_s"] = forward_seconds(
            lambda f, s: den(f, s, condition=den.encode_condition(img, img)), (field, t), repeats=args.repeats,
            autocast=dtype)
        if DEVICE.type == "cuda":
            timing[f"peak_mem_{label}_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    RESULTS["denoiser3d_timing"] = timing
    log(timing)


# ---------------------------------------------------------------- 2. training
def reset_accelerate() -> None:
    """Forget the previous Accelerator's settings (the stages differ in mixed precision)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_stage(kind, config, seconds: float, probe_steps: int) -> float:
    """Probe ``probe_steps`` steps, then resume with the number of steps that fits ``seconds``."""
    trainer_cls = ttrainer.Trainer
    stage_cls = tteach.TeacherStage if kind is TeacherConfig else tdiff.DiffusionStage
    config.train.max_steps = 10**6
    config.train.checkpoint_every = 10**6
    config.validation.every = 0
    if args.smoke:
        config.data.size = list(TRAIN[0]["fixed"].shape[1:])
    started = time.monotonic()
    reset_accelerate()
    trainer = trainer_cls(stage_cls(config), resume=False)
    setup_s = time.monotonic() - started
    stamps: dict[int, float] = {}

    def stamp(step, batch, losses):
        sync()
        stamps[step] = time.monotonic()

    trainer.fit(until_step=probe_steps, on_step=stamp)
    warm = min(5, probe_steps - 2)
    per_step = (stamps[probe_steps] - stamps[warm]) / (probe_steps - warm)
    trainer.close()
    remaining = seconds - (time.monotonic() - started)
    total = max(probe_steps + 10, int(probe_steps + remaining / per_step))
    log(f"{kind.__name__}: setup {setup_s:.1f} s, {per_step * 1000:.0f} ms/step -> max_steps {total}")
    config.train.max_steps = total
    config.train.checkpoint_every = max(total // 4, 1)
    reset_accelerate()
    trainer = trainer_cls(stage_cls(config), resume=True)
    t1 = time.monotonic()
    last = trainer.fit()
    trainer.close()
    RESULTS.setdefault("training", {})[kind.__name__] = {
        "steps": total, "probe_ms_per_step": per_step * 1000,
        "train_s": time.monotonic() - t1, "batch_size": config.data.batch_size,
        "last_row": last, "mixed_precision": config.train.mixed_precision}
    log(kind.__name__, RESULTS["training"][kind.__name__])
    return per_step


@phase("teacher_3d")
def teacher_3d():
    config = load_config("configs/teacher_3d_gpu.yaml", TeacherConfig)
    config.train.output_dir = f"{args.runs}/teacher_3d"
    config.data.num_workers = 0
    config.optim.lr = 1e-3  # as the 2D teacher; a few minutes, not 30000 steps
    config.data.batch_size = 4
    config.train.mixed_precision = "no"
    config.train.log_every = 50
    train_stage(TeacherConfig, config, args.teacher_s, probe_steps=8 if args.smoke else 25)
    (OUT / "teacher_3d_log.csv").write_bytes(Path(config.train.output_dir, "log.csv").read_bytes())
    model = RegistrationNet.from_pretrained(f"{args.runs}/teacher_3d/teacher").to(DEVICE).eval()
    evaluate("teacher3d", teacher_registrar(model))


@phase("diffusion_3d")
def diffusion_3d():
    config = load_config("configs/diffusion_3d_gpu.yaml", DiffusionConfig)
    config.train.output_dir = f"{args.runs}/diffusion_3d"
    config.teacher = f"{args.runs}/teacher_3d"
    config.data.num_workers = 0
    config.data.batch_size = 2
    config.model["prediction_type"] = "sample"  # as the shipped 2D model (docs/training.md)
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 50
    config.train.mixed_precision = "bf16" if DEVICE.type == "cuda" else "no"
    config.train.log_every = 50
    config.validation.num_inference_steps = 10
    train_stage(DiffusionConfig, config, min(args.diffusion_s, left() - 90), probe_steps=7 if args.smoke else 15)
    (OUT / "diffusion_3d_log.csv").write_bytes(Path(config.train.output_dir, "log.csv").read_bytes())


@phase("evaluate_3d")
def evaluate_3d():
    pipe = DiffuseRegPipeline.from_pretrained(f"{args.runs}/diffusion_3d/pipeline").to(DEVICE)
    RESULTS["diffusion3d_params_M"] = sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 5, 10):
        if left() < 25:
            break
        evaluate(f"diffusereg3d_ddim{steps}", pipeline_registrar(pipe, steps))


# ---------------------------------------------------------------- 4. the shipped 2D model, fine-tuned
SHIPPED_2D = "diffusereg/acdc-2d"


@phase("finetune_2d")
def finetune_2d():
    """``configs/finetune_2d_gpu.yaml`` from ``--finetune-init``, for the steps that fit the budget."""
    from diffusereg.hub import resolve_model
    teacher_dir = Path(args.runs) / "teacher_2d"  # the shipped teacher in a stage-1 layout
    teacher_dir.mkdir(parents=True, exist_ok=True)
    shipped_teacher = Path(resolve_model(SHIPPED_2D)) / "teacher"
    (teacher_dir / "field_stats.json").write_bytes((shipped_teacher / "field_stats.json").read_bytes())
    if not (teacher_dir / "teacher").exists():
        (teacher_dir / "teacher").symlink_to(shipped_teacher.resolve())
    config = load_config("configs/finetune_2d_gpu.yaml", DiffusionConfig)
    config.init_weights, config.teacher = args.finetune_init, str(teacher_dir)
    config.train.output_dir = f"{args.runs}/finetune_2d"
    config.data.num_workers = 0
    if args.finetune_batch is not None:
        config.data.batch_size = args.finetune_batch
    if DEVICE.type != "cuda":
        config.train.mixed_precision = "no"
    RESULTS["finetune_2d_slices"] = len(labelled_slices(TRAIN))
    train_stage(DiffusionConfig, config, min(args.finetune_s, left() - 150), probe_steps=6 if args.smoke else 15)
    (OUT / "finetune_2d_log.csv").write_bytes(Path(config.train.output_dir, "log.csv").read_bytes())
    tuned = DiffuseRegPipeline.from_pretrained(f"{args.runs}/finetune_2d/pipeline")
    tuned.denoiser.to(torch.float16)
    tuned.save_pretrained(OUT / "tuned_2d")


def pipeline_2d(name: str) -> DiffuseRegPipeline:
    path = SHIPPED_2D if name == "shipped" else f"{args.runs}/finetune_2d/pipeline"
    pipe = DiffuseRegPipeline.from_pretrained(path).to(DEVICE)
    pipe.denoiser.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@phase("evaluate_2d")
def evaluate_2d():
    for name in ("tuned", "shipped"):
        pipe = pipeline_2d(name)
        for steps in (1, 5, 10):
            evaluate(f"{name}2d_ddim{steps}", pipeline_registrar(pipe, steps))


@phase("ddpm_2d")
def ddpm_2d():
    name = args.ddpm_model
    if name == "best":
        evaluation = RESULTS.get("evaluation", {})
        if not {"tuned2d_ddim10", "shipped2d_ddim10"} <= set(evaluation):
            raise RuntimeError("--ddpm-model best compares the evaluate_2d scores: run that phase first, "
                               "or name the model (--ddpm-model shipped / tuned)")
        scores = {name: evaluation[f"{name}2d_ddim10"]["summary"]["Dice_Overall"] for name in ("tuned", "shipped")}
        name = max(scores, key=scores.get)
    pipe = pipeline_2d(name)
    den, x = pipe.denoiser, VAL[0]["fixed"][0].to(DEVICE)[:, None]
    t = torch.full((x.shape[0],), 500, device=DEVICE, dtype=torch.long)
    with torch.no_grad():
        cond = den.encode_condition(x, x)
    forward_s = forward_seconds(lambda f, s: den(f, s, condition=cond),
                                (torch.zeros(x.shape[0], 2, *x.shape[2:], device=DEVICE), t), repeats=args.repeats)
    register = pipeline_registrar(pipe, args.ddpm_steps, scheduler="ddpm")
    record = RESULTS["ddpm_2d"] = {"model": name, "steps": args.ddpm_steps, "forward_s_per_volume": forward_s,
                                   "rows": []}
    for item in VAL:
        expected = args.ddpm_steps * forward_s * 1.3 + 5
        if left() < expected:
            log(f"ddpm: {left():.0f} s left, a case needs ~{expected:.0f} s: stop")
            break
        record["rows"].append({"case": item["patient"], **evaluate(f"ddpm_{item['patient']}", register, [item])})
        save()


PHASES = {"timings_3d": timings_3d, "timings_2d": timings_2d, "teacher_3d": teacher_3d,
          "diffusion_3d": diffusion_3d, "evaluate_3d": evaluate_3d, "finetune_2d": finetune_2d,
          "evaluate_2d": evaluate_2d, "ddpm_2d": ddpm_2d}
for name in args.phases:
    PHASES[name]()
RESULTS["total_s"] = time.monotonic() - START
save()
log("done")
