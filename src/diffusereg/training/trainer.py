"""The training loop both stages share, on Hugging Face Accelerate.

:class:`Trainer` runs a :class:`Stage` (what the teacher and the diffusion stage add: model,
dataset, loss, one-shot field prediction for validation, export) with:

- Accelerate: the same code on one CPU, one GPU, several GPUs or nodes (``accelerate launch``),
  mixed precision from the config; every process draws ``data.batch_size`` pairs per step from
  its own shard of a seeded, epoch-wise shuffle;
- AdamW and a cosine learning-rate decay to ``optim.min_lr`` at ``train.max_steps``; optional
  EMA weights (:class:`diffusers.training_utils.EMAModel`), used for validation and export;
- randomness of step ``s`` (noise, timesteps, augmentation) from a generator seeded by
  ``(seed, s, process)``, so a resumed run repeats a straight run exactly;
- atomic checkpoints every ``train.checkpoint_every`` steps and at the end (see
  :mod:`diffusereg.training.checkpoint`); ``resume=True`` continues from the newest one;
- validation every ``validation.every`` steps on the main process (Dice per ACDC structure on
  the moving labels warped by the predicted field, NJD %, JSD), logged with the training loss
  to ``log.csv`` (and TensorBoard when installed); a tqdm bar on the main process.
"""

from __future__ import annotations

import csv
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import is_tensorboard_available, set_seed
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusereg.metrics import ACDC_STRUCTURES, acdc_dice, jacobian_std, njd_percent
from diffusereg.spatial import warp
from diffusereg.training.checkpoint import TrainingProgress, latest_checkpoint, save_checkpoint
from diffusereg.training.config import ConfigError, DiffusionConfig, OptimConfig, TeacherConfig, config_to_dict
from diffusereg.training.data import augment_batch, build_augmentation, build_dataset, case_names, reverse_directions

__all__ = ["VALIDATION_COLUMNS", "Stage", "Trainer", "cosine_schedule", "resolve_mixed_precision", "step_seed"]

#: Validation columns of ``log.csv``: Dice (fraction) per ACDC structure, computed per case
#: (2D slices stacked back into their volume) and averaged over cases; NJD (% of voxels with
#: det J <= 0) and JSD (std of det J), averaged over validation items.
VALIDATION_COLUMNS = (*(f"val_Dice_{name}" for name in (*ACDC_STRUCTURES, "Overall")), "val_NJD_percent", "val_JSD")

StepCallback = Callable[[int, dict[str, Any], dict[str, Tensor]], None]


class Stage(ABC):
    """What a training stage adds to the shared :class:`Trainer` loop.

    Attributes:
        name: ``"teacher"`` or ``"diffusion"`` (progress bar, TensorBoard run name).
        loss_names: the loss terms logged besides the total ``loss``.
        config: the stage's configuration.
    """

    name: str
    loss_names: tuple[str, ...]

    def __init__(self, config: TeacherConfig | DiffusionConfig) -> None:
        self.config = config

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network to train (freshly initialised)."""

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """The training pairs (items as in :mod:`diffusereg.training.data`)."""

    def val_dataset(self) -> Dataset | None:
        """The validation pairs, or None for no validation: by default those ``config.data``
        names (the first ``validation.max_pairs``)."""
        return build_dataset(self.config.data, "val", self.config.validation.max_pairs)

    def setup(self, accelerator: Accelerator) -> None:
        """Move auxiliary state (e.g. a frozen teacher) to ``accelerator.device``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator,
             progress: float) -> dict[str, Tensor]:
        """Scalar loss terms of one batch: ``"loss"`` (minimised) and each of ``loss_names``;
        ``progress`` is the fraction of ``train.max_steps`` done."""

    @abstractmethod
    def predict_field(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator) -> Tensor:
        """Field ``(B, ndim, *S)`` (voxels) registering ``moving`` to ``fixed`` ``(B, 1, *S)``."""

    @abstractmethod
    def export(self, model: nn.Module, train_dataset: Dataset, output_dir: Path, metrics: dict[str, float]) -> None:
        """Write the stage's result (unwrapped model with EMA weights, eval mode) to ``output_dir``;
        ``metrics`` is the last logged row (with the final validation metrics, if any)."""


def resolve_mixed_precision(setting: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU that supports it, else ``"no"``; others unchanged."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def cosine_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> LRScheduler:
    """Cosine decay from ``optim.lr`` to ``optim.min_lr`` over ``max_steps`` steps, after an
    optional linear warm-up of ``optim.warmup_steps`` steps from ``lr / 100``."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(max_steps - optim.warmup_steps, 1), eta_min=optim.min_lr)
    if optim.warmup_steps <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=0.01, total_iters=optim.warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[optim.warmup_steps])


def stretch_cosine(schedule: LRScheduler, optim: OptimConfig, max_steps: int) -> None:
    """Make a (resumed) :func:`cosine_schedule` end at ``max_steps``: the decay continues from
    the current learning rate and reaches ``optim.min_lr`` at the new end (a loaded scheduler
    state otherwise keeps the length it was saved with)."""
    cosine = schedule._schedulers[-1] if isinstance(schedule, SequentialLR) else schedule
    cosine.T_max = max(max_steps - optim.warmup_steps, 1)


def step_seed(seed: int, step: int, process_index: int) -> int:
    """The seed of the randomness of one training step on one process (a 63-bit integer)."""
    return ((seed * 1_000_003 + step) * 10_007 + process_index) % 2**63


class CsvLog:
    """``log.csv`` with fixed columns, one row per step that logged something (main process).

    When resuming at step ``s``, rows after ``s`` (written before an interruption) are dropped.
    """

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        self.path = path
        self.columns = columns
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as stream:
                kept = [row for row in csv.DictReader(stream) if int(row["step"]) <= resume_step]
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as stream:
            csv.DictWriter(stream, self.columns, extrasaction="ignore").writerow(row)


class Trainer:
    """Runs a :class:`Stage` (see the module docstring).

    Args:
        stage: the teacher or diffusion stage, holding its config.
        resume: continue from the newest checkpoint in ``<output_dir>/checkpoints`` (start
            afresh if there is none). Without it, an output directory that already holds
            checkpoints is refused.
    """

    def __init__(self, stage: Stage, resume: bool = False) -> None:
        config = stage.config
        self.stage = stage
        self.config = config
        if config.train.output_dir is None:
            raise ConfigError("train.output_dir is not set: set it in the config or pass --output")
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        found = latest_checkpoint(self.checkpoint_dir)
        if found is not None and not resume:
            raise FileExistsError(f"{self.output_dir} already holds checkpoints (newest: {found.name}); "
                                  "pass --resume to continue, or choose another --output")
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(config.train.mixed_precision),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
            step_scheduler_with_optimizer=False,
            log_with="tensorboard" if is_tensorboard_available() else None,
            project_dir=str(self.output_dir),
        )
        set_seed(config.train.seed)  # the same initial weights on every process
        model = stage.build_model()
        set_seed(config.train.seed, device_specific=True)
        self.train_dataset = stage.train_dataset()
        self.val_dataset = stage.val_dataset()
        loader = DataLoader(self.train_dataset, batch_size=config.data.batch_size, shuffle=True,
                            num_workers=config.data.num_workers, persistent_workers=config.data.num_workers > 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        schedule = cosine_schedule(optimizer, config.optim, config.train.max_steps)
        self.model, self.optimizer, self.train_loader, self.lr_scheduler = self.accelerator.prepare(
            model, optimizer, loader, schedule)
        self.ema = None
        if config.optim.ema_decay is not None:
            self.ema = EMAModel(self.unwrapped.parameters(), decay=config.optim.ema_decay)
        self.progress = TrainingProgress()
        self.accelerator.register_for_checkpointing(self.progress)
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        self.augmentation = build_augmentation(config.data.augment, config.data.spatial_dims)
        stage.setup(self.accelerator)
        if resume and found is not None:
            self.accelerator.load_state(str(found))
            if self.ema is not None:  # its saved averages load onto the CPU
                self.ema.to(self.accelerator.device)
            stretch_cosine(schedule, config.optim, config.train.max_steps)
            self.accelerator.print(f"resumed from {found} at step {self.progress.step}")

        self.log: CsvLog | None = None
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            columns = ["step", "epoch", "lr", "loss", *stage.loss_names, *VALIDATION_COLUMNS, "elapsed_s"]
            self.log = CsvLog(self.output_dir / "log.csv", columns, self.progress.step if resume else None)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(stage.name)
        self._start = time.monotonic()

    @property
    def unwrapped(self) -> nn.Module:
        """The model without Accelerate's wrappers (DDP, mixed precision)."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def step(self) -> int:
        """Optimizer steps done so far."""
        return self.progress.step

    def fit(self, until_step: int | None = None, on_step: StepCallback | None = None) -> dict[str, float]:
        """Train up to step ``until_step`` (default and at most ``train.max_steps``).

        Checkpoints at every ``train.checkpoint_every`` steps and at the last step; exports the
        stage's result when ``train.max_steps`` is reached.

        Args:
            until_step: stop after this many optimizer steps in total (a later ``resume``
                continues from there along the same schedule).
            on_step: ``on_step(step, batch, losses)`` called on every process after each step.
        Returns:
            The last logged row (training loss terms and, if any, validation metrics).
        """
        loop = self.config.train
        stop = loop.max_steps if until_step is None else min(until_step, loop.max_steps)
        steps_per_epoch = len(self.train_loader)
        bar = tqdm(total=loop.max_steps, initial=self.step, desc=self.stage.name, dynamic_ncols=True,
                   disable=not self.accelerator.is_local_main_process)
        sums: dict[str, Tensor] = {}
        pending = 0  # steps summed in `sums`
        last: dict[str, float] = {}
        self.model.train()
        while self.step < stop:
            epoch, offset = divmod(self.step, steps_per_epoch)
            self.train_loader.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(self.train_loader, offset) if offset else self.train_loader
            for batch in batches:
                losses = self._train_step(batch)
                self.progress.step += 1
                step = self.step
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                pending += 1
                if on_step is not None:
                    on_step(step, batch, losses)
                bar.update(1)
                row: dict[str, float] = {}
                if step % loop.log_every == 0 or step == stop:
                    row.update(self._mean_losses(sums, pending))
                    sums, pending = {}, 0
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                every = self.config.validation.every
                if (every > 0 and step % every == 0) or step == loop.max_steps:
                    row.update(self.validate())
                if row:
                    last = self._write_row(step, step // steps_per_epoch, row)
                if step % loop.checkpoint_every == 0 or step == stop:
                    save_checkpoint(self.accelerator, self.checkpoint_dir, step, loop.keep_checkpoints)
                if step >= stop:
                    break
        bar.close()
        if self.step >= loop.max_steps:
            self.export(last)
        return last

    def _train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One optimizer step; returns the detached loss terms."""
        seed = step_seed(self.config.train.seed, self.step, self.accelerator.process_index)
        generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        if self.augmentation is not None:
            batch = augment_batch(batch, self.augmentation, seed)
        batch = reverse_directions(batch, self.config.data.reverse_share, generator)
        losses = self.stage.loss(self.model, batch, generator, self.step / self.config.train.max_steps)
        self.accelerator.backward(losses["loss"])
        if self.config.optim.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())
        return {name: value.detach() for name, value in losses.items()}

    def _mean_losses(self, sums: dict[str, Tensor], count: int) -> dict[str, float]:
        """Mean of each loss term over the last ``count`` steps and over all processes."""
        names = ["loss", *self.stage.loss_names]
        means = self.accelerator.reduce(torch.stack([sums[name] for name in names]).float() / count, reduction="mean")
        return dict(zip(names, means.tolist()))

    def _write_row(self, step: int, epoch: int, values: dict[str, float]) -> dict[str, float]:
        row = {"step": step, "epoch": epoch, "lr": self.lr_scheduler.get_last_lr()[0], **values,
               "elapsed_s": round(time.monotonic() - self._start, 1)}
        if self.log is not None:
            self.log.write(row)
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        return row

    @contextmanager
    def _eval_weights(self) -> Iterator[nn.Module]:
        """The unwrapped model in eval mode with the EMA weights swapped in (restored after)."""
        model = self.unwrapped
        parameters = list(model.parameters())
        if self.ema is not None:
            self.ema.store(parameters)
            self.ema.copy_to(parameters)
        model.eval()
        try:
            yield model
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(parameters)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation metrics (``VALIDATION_COLUMNS``) computed on the main process; every
        process must call it. Empty when there is no validation set."""
        if self.val_dataset is None:
            return {}
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process:
            device = self.accelerator.device
            rng_devices = [device] if device.type == "cuda" else []
            with self._eval_weights() as model, torch.random.fork_rng(devices=rng_devices):
                metrics = self._validation_metrics(model, device)
        self.accelerator.wait_for_everyone()
        return metrics

    def _validation_metrics(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        generator = torch.Generator(device=device).manual_seed(self.config.train.seed)
        loader = DataLoader(self.val_dataset, batch_size=self.config.validation.batch_size,
                            num_workers=self.config.data.num_workers)
        warped_by_case: dict[str, list[Tensor]] = {}
        fixed_by_case: dict[str, list[Tensor]] = {}
        njd, jsd = [], []
        for batch in loader:
            with self.accelerator.autocast():
                fixed, moving = batch["fixed"].to(device), batch["moving"].to(device)
                field = self.stage.predict_field(model, fixed, moving, generator)
            field = field.float().cpu()
            njd += [njd_percent(f) for f in field]
            jsd += [jacobian_std(f) for f in field]
            if "moving_labels" in batch:
                warped = warp(batch["moving_labels"], field, mode="nearest")
                for name, warped_labels, fixed_labels in zip(case_names(batch), warped, batch["fixed_labels"]):
                    warped_by_case.setdefault(name, []).append(warped_labels[0])
                    fixed_by_case.setdefault(name, []).append(fixed_labels[0])
        metrics = {"val_NJD_percent": sum(njd) / len(njd), "val_JSD": sum(jsd) / len(jsd)}
        scores = [acdc_dice(torch.stack(warped), torch.stack(fixed_by_case[name]))
                  for name, warped in warped_by_case.items()]
        for structure in scores[0] if scores else {}:
            metrics[f"val_Dice_{structure}"] = sum(score[structure] for score in scores) / len(scores)
        return metrics

    def export(self, metrics: dict[str, float]) -> None:
        """Write the stage's result (EMA weights if any) to the output directory (main process);
        ``metrics``: the last logged row."""
        if self.accelerator.is_main_process:
            with self._eval_weights() as model:
                self.stage.export(model, self.train_dataset, self.output_dir, metrics)
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Finish the trackers and release the process group (end of a run)."""
        self.accelerator.end_training()
