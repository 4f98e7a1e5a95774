"""Training: configs, objectives, both stages on two ACDC patients, exact resume, two processes.

Tiny models on coarse slices (32 x 32 at 6 mm in-plane) keep the file fast on a CPU.
"""

from __future__ import annotations

import csv
import math
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from diffusereg.models import DenoiserOutput, DiffuseRegDenoiser, RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import FieldNormalizer, default_scheduler, increment_fraction
from diffusereg.spatial import compose, integrate_velocity, warp
from diffusereg.training import (
    CascadeStage,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    DiffusionLossConfig,
    DiffusionStage,
    FieldStatistics,
    LoopConfig,
    OptimConfig,
    Stage,
    TeacherConfig,
    TeacherStage,
    Trainer,
    ValidationConfig,
    diffusion_loss,
    load_config,
    registration_loss,
    train_diffusion,
)
from diffusereg.training.objective import refinement_loss
from diffusereg.cli import build_parser
from diffusereg.training.cli import apply_overrides, report
from diffusereg.training.config import AugmentConfig, config_to_dict
from diffusereg.training.trainer import cosine_schedule, stretch_cosine
from diffusereg.training.data import augment_batch, build_augmentation, build_dataset, pair_ids
from tiny import tiny_denoiser
from test_models import perturb

REPO = Path(__file__).resolve().parents[1]
PATIENTS = ["patient001", "patient002"]
TINY_TEACHER = {"channels": [8, 8, 8, 8], "unet_out_channels": 8, "final_conv_channels": [8], "integration_steps": 0}
TINY_DENOISER = {"feature_size": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "share_image_encoder": True}
TINY_INCREMENT = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                  "prediction_type": "increment", "integration_steps": 7}


def tiny_data(acdc_root: Path, batch_size: int = 2) -> DataConfig:
    """Two training patients and one validation patient, 2D slices of 32 x 32 at 6 mm."""
    return DataConfig(spatial_dims=2, spacing=[6.0, 6.0, 3.15], size=[32, 32, 32], acdc_root=str(acdc_root),
                      train_patients=PATIENTS, val_patients=["patient010"], batch_size=batch_size)


def tiny_teacher_config(acdc_root: Path, output: Path, max_steps: int = 6, batch_size: int = 16) -> TeacherConfig:
    return TeacherConfig(
        data=tiny_data(acdc_root, batch_size), model=dict(TINY_TEACHER), optim=OptimConfig(lr=1e-3),
        train=LoopConfig(output_dir=str(output), max_steps=max_steps, log_every=1, checkpoint_every=100),
        validation=ValidationConfig(every=0, max_pairs=4, batch_size=4),
    )


def tiny_diffusion_config(acdc_root: Path, teacher: Path, output: Path, max_steps: int = 6,
                          batch_size: int = 16) -> DiffusionConfig:
    return DiffusionConfig(
        data=tiny_data(acdc_root, batch_size), model=dict(TINY_DENOISER), teacher=str(teacher),
        optim=OptimConfig(lr=1e-3, ema_decay=0.9),
        train=LoopConfig(output_dir=str(output), max_steps=max_steps, log_every=1, checkpoint_every=100),
        validation=ValidationConfig(every=0, max_pairs=4, batch_size=4, num_inference_steps=2),
    )


@dataclass
class ResumeRuns:
    """A 6-step run straight (``straight``) and the same run stopped at step 3 and resumed
    (``split``), with the pair ids each saw in order, and their trainers at the end."""

    straight: Path
    split: Path
    straight_seen: list[str]
    split_seen: list[str]
    reference: Trainer
    resumed: Trainer


def straight_and_resumed(make_stage: Callable[[Path], Stage], root: Path) -> ResumeRuns:
    """Run ``make_stage(output)`` for 6 steps straight, and 3 steps + resume + 3 steps."""

    def run(trainer: Trainer, seen: list[str], until: int | None = None) -> Trainer:
        trainer.fit(until_step=until, on_step=lambda step, batch, losses: seen.extend(pair_ids(batch)))
        return trainer

    straight, split = root / "straight", root / "split"
    straight_seen, split_seen = [], []
    reference = run(Trainer(make_stage(straight)), straight_seen)
    run(Trainer(make_stage(split)), split_seen, until=3)
    resumed = Trainer(make_stage(split), resume=True)
    assert resumed.step == 3
    run(resumed, split_seen)
    return ResumeRuns(straight, split, straight_seen, split_seen, reference, resumed)


@pytest.fixture(scope="module")
def teacher_runs(acdc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumeRuns:
    """Teacher runs on two patients (60 slices, batches of 16: 4-step epochs)."""
    return straight_and_resumed(lambda output: TeacherStage(tiny_teacher_config(acdc_root, output)),
                                tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def teacher_dir(teacher_runs: ResumeRuns) -> Path:
    """Output of the straight teacher run (model, phi0 cache, field_stats.json)."""
    return teacher_runs.straight


@pytest.fixture(scope="module")
def diffusion_runs(acdc_root: Path, teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumeRuns:
    """Diffusion runs on the teacher's cache, with EMA."""
    return straight_and_resumed(
        lambda output: DiffusionStage(tiny_diffusion_config(acdc_root, teacher_dir, output)),
        tmp_path_factory.mktemp("diffusion"))


def read_log(output: Path) -> list[dict[str, str]]:
    with (output / "log.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


# ---------------------------------------------------------------- configs and CLI


def test_repository_configs_load() -> None:
    names = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
    assert "acdc_2d_cpu" in names and "teacher_2d_cpu" in names
    for name in names:
        kind = TeacherConfig if name.startswith("teacher") else DiffusionConfig
        config = load_config(REPO / "configs" / f"{name}.yaml", kind)
        assert config.data.spatial_dims == (2 if "2d" in name else 3)
        assert isinstance(config.optim.lr, float)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml", TeacherConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"train\.max_step.*allowed.*max_steps"):
        load_config(bad, TeacherConfig)
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"optim\.lr must be float"):
        load_config(bad, TeacherConfig)
    bad.write_text("data:\n  augment:\n    enabled: true\n")
    with pytest.raises(ConfigError, match="phi0_source: teacher"):
        load_config(bad, DiffusionConfig)
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 1e-3\ndata:\n  spatial_dims: 3\n")  # YAML reads 1e-3 as a string
    config = load_config(good, DiffusionConfig)
    assert config.optim.lr == 1e-3 and config.data.spatial_dims == 3


def test_cli_overrides(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "diffusion", "--config", "c.yaml", "--data", str(tmp_path),
                              "--output", "out", "--max-steps", "7", "--teacher", "t"])
    config = DiffusionConfig()
    apply_overrides(config, args)
    assert (config.data.acdc_root, config.train.output_dir, config.train.max_steps, config.teacher) == (
        str(tmp_path), "out", 7, "t")
    args = parser.parse_args(["train", "teacher", "--config", str(tmp_path / "none.yaml")])
    assert args.handler(args) == 2  # missing config file: an error message, exit code 2


# ---------------------------------------------------------------- objectives


@pytest.mark.acdc
def test_objectives_decrease_on_a_fixed_batch(acdc_root: Path) -> None:
    """A few optimizer steps on one ACDC batch with fixed noise and timestep lower each loss."""
    dataset = build_dataset(tiny_data(acdc_root), "train")
    batch = {k: torch.stack([dataset[i][k] for i in (5, 40)]) for k in ("fixed", "moving")}
    torch.manual_seed(0)
    teacher = RegistrationNet(spatial_dims=2, **TINY_TEACHER)
    denoiser = DiffuseRegDenoiser(spatial_dims=2, **TINY_DENOISER)
    scheduler = default_scheduler("ddpm")
    phi0 = torch.nn.functional.avg_pool2d(torch.randn(2, 2, 32, 32), 9, 1, 4) * 3

    def teacher_loss() -> torch.Tensor:
        return registration_loss(teacher(batch["fixed"], batch["moving"]), batch["fixed"], batch["moving"]).total

    def denoiser_loss() -> torch.Tensor:
        return diffusion_loss(denoiser, scheduler, batch["fixed"], batch["moving"], phi0, [0.0, 0.0], [1.0, 1.0],
                              generator=torch.Generator().manual_seed(0), timesteps=torch.tensor([100, 300])).total

    for model, loss_fn, lr in [(teacher, teacher_loss, 3e-3), (denoiser, denoiser_loss, 1e-3)]:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        losses = []
        for _ in range(8):
            loss = loss_fn()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert sum(losses[-2:]) < sum(losses[:2]), losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_diffusion_loss_denormalises_phi0_hat(prediction_type: str) -> None:
    """Given the true noise (or clean field), phi0_hat is phi0 in voxels again (the z-scoring is undone)."""
    phi0 = torch.randn(1, 2, 32, 32) * 2 + 1
    mean, std = torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1), torch.tensor([2.0, 0.5]).reshape(1, 2, 1, 1)
    noise = torch.randn(phi0.shape, generator=torch.Generator().manual_seed(3))  # what diffusion_loss draws
    target = noise if prediction_type == "epsilon" else (phi0 - mean) / std

    class Oracle(torch.nn.Module):
        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, fixed: torch.Tensor,
                    moving: torch.Tensor) -> DenoiserOutput:
            return DenoiserOutput(sample=target)

    images = torch.rand(1, 1, 32, 32)
    out = diffusion_loss(Oracle(), default_scheduler("ddpm"), images, images, phi0, [1.0, -0.5], [2.0, 0.5],
                         generator=torch.Generator().manual_seed(3), timesteps=torch.tensor([1500]),
                         prediction_type=prediction_type)
    assert out.noise.item() == 0.0
    torch.testing.assert_close(out.phi0_hat, phi0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.smoothness, torch.stack([phi0.diff(dim=d).square().mean() for d in (2, 3)]).mean())


# ---------------------------------------------------------------- the two stages


@pytest.mark.slow
@pytest.mark.acdc
def test_teacher_writes_model_cache_and_statistics(teacher_dir: Path, acdc_root: Path) -> None:
    stats = FieldStatistics.load(teacher_dir / "field_stats.json")
    dataset = build_dataset(tiny_data(acdc_root), "train")
    assert stats.num_fields == len(dataset) == len(list((teacher_dir / "phi0").glob("*.safetensors")))
    assert len(stats.mean) == len(stats.std) == 2 and all(s > 0 for s in stats.std)
    assert stats.cache_dtype == "float16" and stats.cache_max_abs_error < 1e-2
    teacher = RegistrationNet.from_pretrained(teacher_dir / "teacher")
    assert teacher.config.channels == TINY_TEACHER["channels"]
    rows = read_log(teacher_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[-1]["val_Dice_Overall"]) > 0.5 and rows[-1]["val_NJD_percent"] != ""


@pytest.mark.slow
@pytest.mark.acdc
def test_diffusion_saves_a_loadable_pipeline(diffusion_runs: ResumeRuns, teacher_dir: Path) -> None:
    rows = read_log(diffusion_runs.straight)
    assert {"noise", "similarity", "smoothness", "val_Dice_Overall"} <= set(rows[-1])
    assert rows[-1]["step"] == "6" and rows[-1]["val_Dice_Overall"] != ""
    pipe = DiffuseRegPipeline.from_pretrained(diffusion_runs.straight / "pipeline")
    stats = FieldStatistics.load(teacher_dir / "field_stats.json")
    assert pipe.denoiser.config.field_mean == stats.mean and pipe.denoiser.config.field_std == stats.std
    ema_weights = dict(zip(diffusion_runs.reference.unwrapped.state_dict(), diffusion_runs.reference.ema.shadow_params))
    torch.testing.assert_close(pipe.denoiser.state_dict()["time_embedding.linear_1.weight"],
                               ema_weights["time_embedding.linear_1.weight"])  # the EMA weights are exported
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 1, 1, 32, 32)
    out = pipe(images[0], images[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.field.shape == (1, 2, 32, 32)
    card = (diffusion_runs.straight / "pipeline" / "README.md").read_text()  # issue 32: "not recorded" before
    assert "not recorded" not in card and "Training data: ACDC " in card and "6 optimizer steps" in card
    assert f"val_Dice_Overall {float(rows[-1]['val_Dice_Overall']):.4g}" in card


@pytest.mark.slow
@pytest.mark.acdc
def test_fine_tuning_starts_from_the_given_pipeline(diffusion_runs: ResumeRuns, teacher_dir: Path, acdc_root: Path,
                                                    tmp_path: Path) -> None:
    pretrained = diffusion_runs.straight / "pipeline"
    config = tiny_diffusion_config(acdc_root, teacher_dir, tmp_path / "tuned", max_steps=2)
    config.model, config.init_weights = {}, str(pretrained)
    trainer = Trainer(DiffusionStage(config))
    start = {name: tensor.clone() for name, tensor in trainer.unwrapped.state_dict().items()}
    torch.testing.assert_close(start, DiffuseRegPipeline.from_pretrained(pretrained).denoiser.state_dict())
    trainer.fit()
    trainer.close()
    tuned = DiffuseRegPipeline.from_pretrained(tmp_path / "tuned" / "pipeline").denoiser.state_dict()
    assert any(not torch.equal(tuned[name], start[name]) for name in start)  # it trained

    with pytest.raises(ConfigError, match="brings its own architecture"):
        DiffusionConfig(model=dict(TINY_DENOISER), init_weights=str(pretrained))
    other_stats = tmp_path / "other_teacher"
    other_stats.mkdir()
    stats = FieldStatistics.load(teacher_dir / "field_stats.json")
    FieldStatistics(**{**stats.__dict__, "std": [s * 2 for s in stats.std]}).save(other_stats / "field_stats.json")
    config.teacher, config.train.output_dir = str(other_stats), str(tmp_path / "mismatched")
    with pytest.raises(ValueError, match="field_std"):
        Trainer(DiffusionStage(config))


@pytest.mark.slow
@pytest.mark.acdc
def test_the_refine_recipe_trains_a_refining_denoiser_and_ships_its_teacher(teacher_dir: Path, acdc_root: Path,
                                                                             tmp_path: Path) -> None:
    """``loss.recipe: refine``: the denoiser predicts increments of its estimate; its losses are
    logged; the exported pipeline holds the teacher and hands its scheduler the clean field."""
    config = tiny_diffusion_config(acdc_root, teacher_dir, tmp_path / "refine", max_steps=3, batch_size=8)
    config.model["prediction_type"] = "increment"
    config.phi0_source = "teacher"
    config.loss = DiffusionLossConfig(recipe="refine", target_passes=[2], target_weight=1.0, target_weight_final=0.5,
                                      zero_start=0.25, teacher_start=0.25, other_start=0.25)
    config.data.reverse_share = 0.5
    row = train_diffusion(config)
    assert {"target", "similarity", "smoothness"} <= set(row) and all(math.isfinite(row[k]) for k in ("loss", "target"))
    pipe = DiffuseRegPipeline.from_pretrained(tmp_path / "refine" / "pipeline")
    assert isinstance(pipe.teacher, RegistrationNet) and pipe.denoiser.config.prediction_type == "increment"
    assert pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 1, 1, 32, 32)
    out = pipe(images[0], images[1], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.field.shape == (1, 2, 32, 32) and torch.isfinite(out.field).all()
    with pytest.raises(ConfigError, match="set phi0_source: teacher"):
        DiffusionConfig(loss=DiffusionLossConfig(recipe="refine"))


@pytest.mark.slow
@pytest.mark.acdc
@pytest.mark.parametrize("stage", ["teacher", "diffusion"])
def test_resume_repeats_a_straight_run(stage: str, request: pytest.FixtureRequest) -> None:
    """6 steps straight == 3 steps, stop, resume, 3 more: same data order, weights, EMA, LR and
    logged losses. 60 slices in batches of 16 make 4-step epochs, so the resumed half starts
    mid-epoch and crosses into the next one."""
    runs: ResumeRuns = request.getfixturevalue(f"{stage}_runs")
    slices = len(runs.reference.train_dataset)
    assert runs.split_seen == runs.straight_seen and len(runs.straight_seen) == slices + 2 * 16
    assert len(set(runs.straight_seen[:slices])) == slices  # the first epoch sees every slice once
    assert runs.reference.lr_scheduler.get_last_lr() == runs.resumed.lr_scheduler.get_last_lr()
    reference, resumed = runs.reference.unwrapped.state_dict(), runs.resumed.unwrapped.state_dict()
    for name, weights in reference.items():
        assert torch.equal(weights, resumed[name]), name
    if runs.reference.ema is not None:
        assert all(torch.equal(a, b) for a, b in zip(runs.reference.ema.shadow_params, runs.resumed.ema.shadow_params))
    assert [r["loss"] for r in read_log(runs.split)] == [r["loss"] for r in read_log(runs.straight)]


SHARD_SCRIPT = """
import json, sys
from pathlib import Path
from typing import Any
from diffusereg.training import DiffusionConfig, DiffusionStage, Trainer, load_config
from diffusereg.training.data import pair_ids

trainer = Trainer(DiffusionStage(load_config(sys.argv[1], DiffusionConfig)))
seen = []
trainer.fit(until_step=3, on_step=lambda step, batch, losses: seen.extend(pair_ids(batch)))
record = {"seen": seen, "world": trainer.accelerator.num_processes}
Path(sys.argv[2] + str(trainer.accelerator.process_index) + ".json").write_text(json.dumps(record))
trainer.close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.acdc
def test_two_processes_train_on_disjoint_shards(teacher_dir: Path, acdc_root: Path, tmp_path: Path) -> None:
    """Two CPU processes (torchrun + gloo; Accelerate's ``launch --cpu`` starts only one): each
    rank trains on its own shard of the data, and both save their RNG state in the checkpoint."""
    config = tiny_diffusion_config(acdc_root, teacher_dir, tmp_path / "run", batch_size=2)
    config_file, script = tmp_path / "config.yaml", tmp_path / "shards.py"
    config_file.write_text(yaml.safe_dump(config_to_dict(config)))
    script.write_text(SHARD_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(config_file), str(tmp_path / "rank")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world"] == 2 and len(r["seen"]) == 3 * 2 for r in records)
    assert not set(records[0]["seen"]) & set(records[1]["seen"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-00000003" / "random_states_1.pkl").is_file()


def test_augmentation_is_seeded_and_keeps_labels_integer() -> None:
    transform = build_augmentation(AugmentConfig(enabled=True, affine_prob=1.0, elastic_prob=1.0, flip_prob=0.5), 2)
    labels = torch.zeros(2, 1, 32, 32, dtype=torch.int64)
    labels[:, :, 8:24, 10:20] = 3
    batch = {"fixed": torch.rand(2, 1, 32, 32), "moving": torch.rand(2, 1, 32, 32),
             "fixed_labels": labels, "moving_labels": labels.clone(), "patient": ["a", "b"]}
    first, again = augment_batch(batch, transform, seed=7), augment_batch(batch, transform, seed=7)
    assert first["fixed_labels"].dtype == torch.int64 and first["fixed"].shape == (2, 1, 32, 32)
    assert torch.equal(first["fixed"], again["fixed"]) and not torch.equal(first["fixed"], batch["fixed"])
    assert torch.equal(first["fixed_labels"], first["moving_labels"])  # one transform for the whole pair
    assert set(first["fixed_labels"].unique().tolist()) <= {0, 3}


def test_resumed_schedule_with_more_steps_ends_at_the_new_length() -> None:
    """A resume with a larger ``max_steps`` continues the cosine from the saved learning rate
    (no jump) and reaches ``min_lr`` at the new end, not at the length it was saved with."""
    optim = OptimConfig(lr=1e-3, min_lr=1e-6, warmup_steps=10)

    def schedule_of(max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
        return optimizer, cosine_schedule(optimizer, optim, max_steps)

    optimizer, schedule = schedule_of(100)
    for _ in range(50):
        optimizer.step()
        schedule.step()
    saved_lr, state = schedule.get_last_lr()[0], schedule.state_dict()

    optimizer, schedule = schedule_of(200)
    schedule.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = saved_lr  # what loading the optimizer state restores
    stretch_cosine(schedule, optim, 200)
    lrs = []
    for _ in range(150):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert abs(lrs[0] - saved_lr) < 0.05 * saved_lr
    assert lrs[49] > 10 * optim.min_lr  # step 100: the saved length would have ended here
    assert lrs[-1] == pytest.approx(optim.min_lr, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("increment_passes", [None, 2.0])
def test_rollouts_are_the_samplers_own_state(increment_passes: float | None) -> None:
    """``loss.own_schedules``: a rollout start is what the DDIM sampler holds after its first k
    steps (estimate and carried noise), and the step trained is its next one; with
    ``increment_passes`` the rollout takes the sampler's partial steps too."""
    config = DiffusionConfig(teacher="diffusereg/acdc-2d", phi0_source="teacher",
                             model={**TINY_INCREMENT, "increment_passes": increment_passes},
                             loss=DiffusionLossConfig(recipe="refine", own_schedules=[4]))
    stage = CascadeStage(config)
    model = stage.build_model().eval()
    images = torch.rand(2, 1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        estimate, timesteps, noise = stage._rollouts(model, images[0], images[1], torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    torch.randint(1, (1,), generator=replay)  # the schedule drawn from own_schedules
    count = int(torch.randint(1, 4, (1,), generator=replay))
    assert count == 3  # this seed rolls out 3 of the 4 steps: the carried noise matters
    states = []

    def record(pipe: DiffuseRegPipeline, step: int, timestep: torch.Tensor, kwargs: dict) -> dict:
        states.append(kwargs["x0"])
        pipe.interrupt = step + 1 == count
        return kwargs

    pipe = stage.pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe(images[0], images[1], num_inference_steps=4, generator=replay, callback_on_step_end=record)
    assert len(states) == count
    torch.testing.assert_close(estimate, states[-1][0], atol=1e-5, rtol=0)  # (samples, *field)
    assert timesteps.tolist() == [int(pipe.scheduler.timesteps[count])]
    assert noise.shape == estimate.shape and torch.isfinite(noise).all()
    with pytest.raises(ConfigError, match="own_schedules"):
        DiffusionConfig(loss=DiffusionLossConfig(own_schedules=[1]))


def untrained_cascade(**model: Any) -> tuple[CascadeStage, DiffuseRegDenoiser, DiffuseRegPipeline, torch.Tensor,
                                              torch.Tensor]:
    """A denoiser with the teacher built in (``model: proposal: teacher`` and ``model``'s further
    settings) before any training, its stage and pipeline, and a smooth 64 x 64 pair shifted by 3
    voxels: ``(stage, model, pipe, fixed, moving)``."""
    config = DiffusionConfig(teacher="diffusereg/acdc-2d", phi0_source="teacher",
                             model={**TINY_INCREMENT, "proposal": "teacher", **model},
                             loss=DiffusionLossConfig(recipe="refine"))
    stage = CascadeStage(config)
    denoiser = stage.build_model().eval()
    blur = torch.nn.AvgPool2d(9, stride=1, padding=4)
    fixed = blur(torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    pipe = stage.pipeline(denoiser, stage.frozen_teacher())
    pipe.set_progress_bar_config(disable=True)
    return stage, denoiser, pipe, fixed, fixed.roll(3, dims=-1)


INNER = (..., slice(16, -16), slice(16, -16))
"""Away from the border, where the pipeline's and the teacher's integrators pad differently."""


def test_a_teacher_proposal_starts_as_the_recursive_teacher(tmp_path: Path) -> None:
    """``model: proposal: teacher``: before training, K sampling steps are the teacher applied K
    times recursively (away from the border, where the two integrators pad differently); the
    teacher is the pipeline's component, stored once: the denoiser holds none of its weights."""
    stage, model, pipe, fixed, moving = untrained_cascade()
    field = pipe(fixed, moving, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).field
    with torch.no_grad():
        recursive = stage.frozen_teacher().recursive(fixed, moving, 3)[-1]
    assert recursive[INNER].abs().max() > 1.0  # a real displacement
    torch.testing.assert_close(field[INNER], recursive[INNER], atol=5e-3, rtol=0)
    without = DiffuseRegDenoiser(**{**dict(model.config), "proposal": None})
    assert model.state_dict().keys() == without.state_dict().keys()  # no teacher weights inside
    pipe.save_pretrained(tmp_path / "cascade")
    loaded = DiffuseRegPipeline.from_pretrained(tmp_path / "cascade")
    assert loaded.proposal is loaded.teacher and loaded.denoiser.config.proposal == "teacher"
    with pytest.raises(ValueError, match="teacher component"):
        DiffuseRegPipeline(denoiser=model, scheduler=pipe.scheduler)(fixed, moving)
    with pytest.raises(ConfigError, match="proposal"):
        DiffusionConfig(model={"proposal": "ants"})


def test_increment_passes_share_the_teacher_passes_out_over_the_steps() -> None:
    """``model: increment_passes: 2``: before training, each of 4 sampling steps is half a pass of
    the teacher (its velocity halved) on the moving image warped so far, and one step is a whole
    pass; the fraction is the config's passes over the steps, at most 1."""
    stage, model, pipe, fixed, moving = untrained_cascade(increment_passes=2)
    assert [increment_fraction(model.config, steps) for steps in (1, 2, 4)] == [1.0, 1.0, 0.5]
    assert increment_fraction({"prediction_type": "increment"}, 10) == 1.0  # a config saved before the setting
    teacher = stage.frozen_teacher()
    with torch.no_grad():
        halves = torch.zeros(1, 2, 64, 64)
        for _ in range(4):
            velocity = teacher.velocity(fixed, warp(moving, halves))
            halves = compose(halves, integrate_velocity(0.5 * velocity, teacher.config.integration_steps))
        one_shot = teacher(fixed, moving)
    field = pipe(fixed, moving, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).field
    torch.testing.assert_close(field[INNER], halves[INNER], atol=5e-3, rtol=0)
    assert (halves - teacher.recursive(fixed, moving, 4)[-1])[INNER].abs().max() > 0.05  # not four whole passes
    field = pipe(fixed, moving, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).field
    torch.testing.assert_close(field[INNER], one_shot[INNER], atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="increment_passes"):
        DiffuseRegDenoiser(spatial_dims=2, prediction_type="epsilon", increment_passes=2)


def test_the_refine_recipe_noises_the_target_into_the_state_the_network_reads() -> None:
    """The refine loss's state is the target noised to the timestep: at a low timestep another
    target gives another estimate (the loss reaches what the network reads), the start held fixed."""
    model = perturb(tiny_denoiser(2, prediction_type="increment", self_conditioning=True)).eval()
    scheduler = default_scheduler("ddpm")
    normalizer = FieldNormalizer.from_config(model.config)
    images = torch.rand(2, 2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    start = torch.zeros(2, 2, 32, 32)
    timesteps, noise = torch.tensor([20, 20]), torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))

    def estimate(target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return refinement_loss(model, model.config, scheduler, normalizer, images[0], images[1], start, target,
                                   timesteps=timesteps, noise=noise).x0_hat

    first, second = (0.02 * torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    assert not torch.allclose(estimate(first), estimate(second), atol=1e-5)


def test_the_end_of_training_says_where_the_result_went_and_how_to_use_it(tmp_path: Path) -> None:
    """A run ended silently (issue 32)."""
    config = DiffusionConfig()
    config.train.output_dir = str(tmp_path / "run")
    shown = report("diffusion", config, {"step": 40, "loss": 0.1, "val_Dice_Overall": 0.8123, "val_NJD_percent": 0.0})
    lines = shown.splitlines()
    assert lines[0] == f"diffusereg train diffusion: pipeline written to {tmp_path / 'run' / 'pipeline'} (its README.md " \
                       "records the data and these numbers)"
    assert lines[1] == "final validation (step 40): Dice_Overall 0.8123, NJD_percent 0"
    assert lines[2] == f"use it: diffusereg register FIXED MOVING --model {tmp_path / 'run' / 'pipeline'} -o OUTDIR"
    teacher_config = TeacherConfig()
    teacher_config.train.output_dir = str(tmp_path / "teacher")
    teacher = report("teacher", teacher_config, {"step": 5, "loss": 0.3})
    assert "final validation (step 5): none (no validation set)" in teacher and "--teacher" in teacher


def test_the_model_card_records_the_training_data_and_final_metrics(tmp_path: Path) -> None:
    from tiny import tiny_pipeline

    tiny_pipeline(2).save_pretrained(tmp_path / "pipeline", training={
        "data": "pairs.csv, 12 training items", "steps": 30, "val_Dice_Overall": 0.75, "val_NJD_percent": 0.01})
    card = (tmp_path / "pipeline" / "README.md").read_text()
    assert "Training data: pairs.csv, 12 training items; 30 optimizer steps." in card
    assert "Final validation metrics: val_Dice_Overall 0.75, val_NJD_percent 0.01." in card
    tiny_pipeline(2).save_pretrained(tmp_path / "unrecorded")
    assert "not recorded" in (tmp_path / "unrecorded" / "README.md").read_text()
