"""Stage 2: train the DiffuseReg denoiser on the teacher's fields.

Output directory::

    pipeline/   DiffuseRegPipeline.save_pretrained: denoiser (EMA weights if enabled, with
                field_mean/field_std of the teacher fields in its config) + DDIM scheduler;
                load it with DiffuseRegPipeline.from_pretrained(output_dir / "pipeline")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusereg.hub import resolve_model
from diffusereg.models import DiffuseRegDenoiser, RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline, default_scheduler
from diffusereg.training.config import ConfigError, DiffusionConfig
from diffusereg.training.data import FieldStatistics, Phi0Cache, WithPhi0, build_dataset
from diffusereg.training.objective import diffusion_loss
from diffusereg.training.trainer import Stage, Trainer

__all__ = ["DiffusionStage", "train_diffusion"]


def _teacher_folders(teacher: str) -> tuple[Path, Path, bool]:
    """``(folder of field_stats.json, folder of the RegistrationNet, has a phi0 cache)`` of a ``teacher`` setting:
    a stage-1 output directory (``field_stats.json``, ``teacher/``, ``phi0/``), or a saved
    pipeline with a teacher (a folder, or a bundled name such as ``diffusereg/acdc-2d``), whose
    ``teacher/`` holds both the network and its ``field_stats.json``."""
    folder = Path(resolve_model(teacher))
    if (folder / "model_index.json").is_file():
        return folder / "teacher", folder / "teacher", False
    return folder, folder / "teacher", True


class DiffusionStage(Stage):
    """The denoiser (:class:`~diffusereg.models.DiffuseRegDenoiser`) trained with
    :func:`~diffusereg.training.objective.diffusion_loss` on phi0 from the teacher's output
    directory (its cache, or the frozen teacher run on every batch)."""

    name = "diffusion"
    loss_names = ("noise", "similarity", "smoothness")
    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.teacher_dir, self.teacher_weights, has_cache = _teacher_folders(config.teacher)
        if not has_cache and config.phi0_source == "cache":
            raise ConfigError(f"teacher {config.teacher} is a saved pipeline, which has no phi0 cache: "
                              "set phi0_source: teacher")
        self.statistics = FieldStatistics.load(self.teacher_dir / "field_stats.json")
        if self.statistics.spatial_dims != config.data.spatial_dims:
            raise ValueError(f"the teacher in {self.teacher_dir} is {self.statistics.spatial_dims}D "
                             f"but data.spatial_dims is {config.data.spatial_dims}")
        self.scheduler = default_scheduler("ddpm")  # add_noise and alphas_cumprod of the paper's schedule
        self.teacher: RegistrationNet | None = None

    def build_model(self) -> nn.Module:
        """A fresh denoiser, or the one of ``init_weights`` (float32) after checking that it fits."""
        if self.config.init_weights is None:
            model = DiffuseRegDenoiser(spatial_dims=self.config.data.spatial_dims, field_mean=self.statistics.mean,
                                       field_std=self.statistics.std, **self.config.model)
        else:
            model = DiffuseRegDenoiser.from_pretrained(resolve_model(self.config.init_weights),
                                                       subfolder="denoiser").to(torch.float32)
            self._check_pretrained(model)
        self.prediction_type = model.config.prediction_type
        return model

    def _check_pretrained(self, model: DiffuseRegDenoiser) -> None:
        source, config = self.config.init_weights, model.config
        if config.spatial_dims != self.config.data.spatial_dims:
            raise ValueError(f"init_weights {source} is a {config.spatial_dims}D denoiser "
                             f"but data.spatial_dims is {self.config.data.spatial_dims}")
        for name, ours in (("field_mean", self.statistics.mean), ("field_std", self.statistics.std)):
            theirs = getattr(config, name)
            if not torch.allclose(torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64),
                                  rtol=1e-4, atol=1e-6):
                raise ValueError(f"init_weights {source} was trained on fields with {name} {theirs}, but the "
                                 f"teacher in {self.teacher_dir} gives {ours}: fine-tune with the teacher it learnt from")

    def train_dataset(self) -> Dataset:
        dataset = build_dataset(self.config.data, "train")
        if self.config.phi0_source == "teacher":
            return dataset
        return WithPhi0(dataset, Phi0Cache(self.teacher_dir / "phi0", self.statistics.cache_dtype))

    def setup(self, accelerator: Accelerator) -> None:
        if self.config.phi0_source == "teacher":
            self.teacher = RegistrationNet.from_pretrained(self.teacher_weights).to(accelerator.device).eval()
            self.teacher.requires_grad_(False)

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
        if self.teacher is not None:
            with torch.no_grad():
                phi0 = self.teacher(batch["fixed"], batch["moving"]).float()
        else:
            phi0 = batch["phi0"]
        loss = self.config.loss
        return diffusion_loss(
            model, self.scheduler, batch["fixed"], batch["moving"], phi0,
            self.statistics.mean, self.statistics.std, generator=generator,
            similarity_weight=loss.similarity_weight, smoothness_weight=loss.smoothness_weight,
            ssim_window=loss.ssim_window, prediction_type=self.prediction_type,
        ).parts()

    def predict_field(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator) -> Tensor:
        """A short DDIM sampling run (``validation.num_inference_steps``) through the pipeline."""
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe(fixed, moving, num_inference_steps=self.config.validation.num_inference_steps,
                    generator=generator).field

    def pipeline(self, model: nn.Module) -> DiffuseRegPipeline:
        """``model`` with a DDIM scheduler, on the model grid (spacing, size) of the training data."""
        return DiffuseRegPipeline(denoiser=model, scheduler=default_scheduler("ddim"),
                                  model_spacing=self.config.data.spacing, model_size=self.config.data.size)

    def export(self, model: nn.Module, train_dataset: Dataset, output_dir: Path) -> None:
        self.pipeline(model).save_pretrained(output_dir / "pipeline", safe_serialization=True)


def train_diffusion(config: DiffusionConfig, resume: bool = False, until_step: int | None = None) -> dict[str, float]:
    """Train the denoiser as ``config`` says; at ``train.max_steps`` save the pipeline to
    ``train.output_dir/pipeline``. Returns the last logged row."""
    trainer = Trainer(DiffusionStage(config), resume=resume)
    try:
        return trainer.fit(until_step=until_step)
    finally:
        trainer.close()
