"""Stage 2: train the DiffuseReg denoiser on the teacher's fields.

Output directory::

    pipeline/   DiffuseRegPipeline.save_pretrained: denoiser (EMA weights if enabled, with
                field_mean/field_std of the teacher fields in its config) + DDIM scheduler;
                load it with DiffuseRegPipeline.from_pretrained(output_dir / "pipeline")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusereg.hub import resolve_model
from diffusereg.models import DiffuseRegDenoiser, RegistrationNet
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.schedulers import FieldNormalizer, default_scheduler
from diffusereg.training.config import ConfigError, DiffusionConfig
from diffusereg.training.data import FieldStatistics, Phi0Cache, WithPhi0, build_dataset
from diffusereg.training.objective import diffusion_loss
from diffusereg.training.trainer import Stage, Trainer

__all__ = ["DiffusionStage", "diffusion_stage", "train_diffusion"]


@dataclass(frozen=True)
class TeacherSource:
    """Where the diffusion stage's teacher comes from.

    Attributes:
        weights: folder of the :class:`~diffusereg.models.RegistrationNet`.
        mean, std: per-axis statistics (voxels) of its fields, which z-score phi0.
        spatial_dims: 2 or 3.
        cache: its fields of the training pairs (a stage-1 output), or None (a saved pipeline).
    """

    weights: Path
    mean: list[float]
    std: list[float]
    spatial_dims: int
    cache: Phi0Cache | None


def teacher_source(teacher: str) -> TeacherSource:
    """A ``teacher`` setting: a stage-1 output directory (``field_stats.json``, ``teacher/``,
    ``phi0/``), or a saved pipeline with a teacher component (a folder, or a bundled name such as
    ``diffusereg/acdc-2d``), whose field statistics are its denoiser's."""
    folder = Path(resolve_model(teacher))
    if (folder / "model_index.json").is_file():
        if not (folder / "teacher" / "config.json").is_file():
            raise ConfigError(f"teacher {teacher}: the pipeline in {folder} has no teacher component")
        config = DiffuseRegDenoiser.load_config(folder / "denoiser")
        return TeacherSource(folder / "teacher", list(config["field_mean"]), list(config["field_std"]),
                             int(config["spatial_dims"]), None)
    statistics = FieldStatistics.load(folder / "field_stats.json")
    return TeacherSource(folder / "teacher", statistics.mean, statistics.std, statistics.spatial_dims,
                         Phi0Cache(folder / "phi0", statistics.cache_dtype))


class DiffusionStage(Stage):
    """The denoiser (:class:`~diffusereg.models.DiffuseRegDenoiser`) trained with the paper's
    :func:`~diffusereg.training.objective.diffusion_loss` (``loss.recipe: paper``) on the teacher's
    fields (its cache, or the frozen teacher run on every batch); what every recipe shares (the
    teacher, the model, validation, export). The cascade's recipe (``refine``) is
    :class:`~diffusereg.training.cascade.CascadeStage`; :func:`diffusion_stage` picks by config."""

    name = "diffusion"
    recipe = "paper"
    loss_names = ("noise", "similarity", "smoothness")
    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        if config.teacher is None:
            raise ConfigError("teacher is not set: name a stage-1 output folder or a pipeline with a teacher "
                              "(in the config, or --teacher)")
        self.source = teacher_source(config.teacher)
        if self.source.cache is None and config.phi0_source == "cache":
            raise ConfigError(f"teacher {config.teacher} is a saved pipeline, which has no phi0 cache: "
                              "set phi0_source: teacher")
        if self.source.spatial_dims != config.data.spatial_dims:
            raise ValueError(f"the teacher {config.teacher} is {self.source.spatial_dims}D "
                             f"but data.spatial_dims is {config.data.spatial_dims}")
        if config.loss.recipe != self.recipe:
            raise ConfigError(f"{type(self).__name__} trains loss.recipe {self.recipe!r}, got {config.loss.recipe!r}: "
                              "use diffusion_stage(config)")
        self.scheduler = default_scheduler("ddpm")  # add_noise and alphas_cumprod of the paper's schedule
        self.teacher: RegistrationNet | None = None
        self.refine = self.recipe == "refine"

    def build_model(self) -> nn.Module:
        """A fresh denoiser, or the one of ``init_weights`` (float32) after checking that it fits.

        The refine recipe starts from ``init_weights`` with its config's parametrisation keys as
        ``model`` says and the teacher's field statistics (a new parametrisation of the same
        network). ``model: proposal: teacher`` on a denoiser that had no proposal zeroes its output
        layer, so that training starts from the recursive teacher."""
        settings = dict(self.config.model)
        if self.config.init_weights is None:
            model = DiffuseRegDenoiser(spatial_dims=self.config.data.spatial_dims, field_mean=self.source.mean,
                                       field_std=self.source.std, **settings)
            adds_proposal = model.config.proposal is not None
        else:
            overrides = {**settings, **({"field_mean": self.source.mean, "field_std": self.source.std}
                                        if self.refine else {})}
            model = DiffuseRegDenoiser.from_pretrained(resolve_model(self.config.init_weights), subfolder="denoiser",
                                                       dtype=torch.float32, **overrides)
            self._check_pretrained(model)
            adds_proposal = "proposal" in settings and DiffuseRegDenoiser.load_config(
                resolve_model(self.config.init_weights), subfolder="denoiser").get("proposal") is None
        if adds_proposal:
            torch.nn.init.zeros_(model.decoder.out.weight)
            torch.nn.init.zeros_(model.decoder.out.bias)
        if self.refine != (model.config.prediction_type == "increment"):
            raise ConfigError("loss.recipe: refine and model.prediction_type: increment go together (a denoiser that "
                              f"refines its estimate); got recipe {self.config.loss.recipe!r}, prediction_type "
                              f"{model.config.prediction_type!r}")
        self.model_config = model.config
        self.normalizer = FieldNormalizer.from_config(model.config)
        return model

    @property
    def proposal(self) -> RegistrationNet | None:
        """The frozen teacher, for a denoiser whose residual is added to its velocity; else None."""
        return self.teacher if self.model_config.get("proposal") == "teacher" else None

    def _check_pretrained(self, model: DiffuseRegDenoiser) -> None:
        source, config = self.config.init_weights, model.config
        if config.spatial_dims != self.config.data.spatial_dims:
            raise ValueError(f"init_weights {source} is a {config.spatial_dims}D denoiser "
                             f"but data.spatial_dims is {self.config.data.spatial_dims}")
        if self.refine:  # the refine recipe sets the teacher's statistics itself
            return
        for name, ours in (("field_mean", self.source.mean), ("field_std", self.source.std)):
            theirs = getattr(config, name)
            if not torch.allclose(torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64),
                                  rtol=1e-4, atol=1e-6):
                raise ValueError(f"init_weights {source} was trained on fields with {name} {theirs}, but the "
                                 f"teacher {self.config.teacher} gives {ours}: fine-tune with the teacher it learnt from")

    def train_dataset(self) -> Dataset:
        dataset = build_dataset(self.config.data, "train")
        if self.config.phi0_source == "teacher":
            return dataset
        return WithPhi0(dataset, self.source.cache)

    def setup(self, accelerator: Accelerator) -> None:
        if self.config.phi0_source == "teacher":
            self.teacher = self.frozen_teacher().to(accelerator.device)

    def frozen_teacher(self) -> RegistrationNet:
        """The teacher network, in eval mode, without gradients."""
        teacher = RegistrationNet.from_pretrained(self.source.weights).eval()
        teacher.requires_grad_(False)
        return teacher

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator,
             progress: float) -> dict[str, Tensor]:
        loss = self.config.loss
        if self.teacher is not None:
            with torch.no_grad():
                phi0 = self.teacher(batch["fixed"], batch["moving"]).float()
        else:
            phi0 = batch["phi0"]
        return diffusion_loss(
            model, self.scheduler, batch["fixed"], batch["moving"], phi0,
            self.source.mean, self.source.std, generator=generator,
            similarity_weight=loss.similarity_weight, smoothness_weight=loss.smoothness_weight,
            ssim_window=loss.ssim_window, prediction_type=self.model_config.prediction_type,
        ).parts()

    def predict_field(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator) -> Tensor:
        """A short DDIM sampling run (``validation.num_inference_steps``) through the pipeline."""
        pipe = self.pipeline(model, self.teacher)
        pipe.set_progress_bar_config(disable=True)
        return pipe(fixed, moving, num_inference_steps=self.config.validation.num_inference_steps,
                    generator=generator).field

    def pipeline(self, model: nn.Module, teacher: RegistrationNet | None = None) -> DiffuseRegPipeline:
        """``model`` with a DDIM scheduler (and ``teacher``), on the model grid (spacing, size) of
        the training data."""
        return DiffuseRegPipeline(denoiser=model, scheduler=default_scheduler("ddim", model.config.prediction_type),
                                  teacher=teacher, model_spacing=self.config.data.spacing,
                                  model_size=self.config.data.size)

    def export(self, model: nn.Module, train_dataset: Dataset, output_dir: Path, metrics: dict[str, float]) -> None:
        """The pipeline, with the teacher as its component (a one-shot baseline and a start); its
        model card records the training data and the final validation metrics."""
        teacher = self.frozen_teacher().to(next(model.parameters()).device)
        data = self.config.data
        source = data.pairs if data.pairs else f"ACDC {data.acdc_root} ({data.train_split} split)"
        training = {"data": f"{source}, {len(train_dataset)} training items", "steps": self.config.train.max_steps,
                    **{name: value for name, value in metrics.items() if name.startswith("val_")}}
        self.pipeline(model, teacher).save_pretrained(output_dir / "pipeline", safe_serialization=True,
                                                      training=training)


def diffusion_stage(config: DiffusionConfig) -> DiffusionStage:
    """The stage that trains ``config``'s ``loss.recipe``: :class:`DiffusionStage` (``paper``) or
    :class:`~diffusereg.training.cascade.CascadeStage` (``refine``)."""
    from diffusereg.training.cascade import CascadeStage  # the cascade builds on this module

    return CascadeStage(config) if config.loss.recipe == "refine" else DiffusionStage(config)


def train_diffusion(config: DiffusionConfig, resume: bool = False, until_step: int | None = None) -> dict[str, float]:
    """Train the denoiser as ``config`` says; at ``train.max_steps`` save the pipeline to
    ``train.output_dir/pipeline``. Returns the last logged row."""
    trainer = Trainer(diffusion_stage(config), resume=resume)
    try:
        return trainer.fit(until_step=until_step)
    finally:
        trainer.close()
