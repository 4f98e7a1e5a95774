"""Stage 1: train the teacher registration network, then cache its fields phi0.

Output directory::

    teacher/            RegistrationNet.save_pretrained (config.json + safetensors)
    phi0/<pair>.safetensors   phi0 of every training pair (or 2D slice), tensor "field" (ndim, *S)
    field_stats.json    per-axis mean/std of phi0 (voxels), used to z-score fields in stage 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from diffusereg.models import RegistrationNet
from diffusereg.training.config import TeacherConfig
from diffusereg.training.data import FieldAccumulator, FieldStatistics, Phi0Cache, build_dataset, pair_ids
from diffusereg.training.objective import registration_loss
from diffusereg.training.trainer import Stage, Trainer

__all__ = ["TeacherStage", "train_teacher", "write_phi0_cache"]


class TeacherStage(Stage):
    """The one-shot teacher (:class:`~diffusereg.models.RegistrationNet`), trained with
    :func:`~diffusereg.training.objective.registration_loss`."""

    name = "teacher"
    loss_names = ("similarity", "smoothness", "dice")
    config: TeacherConfig

    def build_model(self) -> nn.Module:
        return RegistrationNet(spatial_dims=self.config.data.spatial_dims, **self.config.model)

    def train_dataset(self) -> Dataset:
        dataset = build_dataset(self.config.data, "train")
        if self.config.loss.dice_weight > 0 and "moving_labels" not in dataset[0]:
            raise ValueError("loss.dice_weight > 0 needs label maps in the training data")
        return dataset

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator,
             progress: float) -> dict[str, Tensor]:
        loss = self.config.loss
        return registration_loss(
            model(batch["fixed"], batch["moving"]), batch["fixed"], batch["moving"],
            similarity=loss.similarity, similarity_window=loss.similarity_window,
            smoothness_weight=loss.smoothness_weight, dice_weight=loss.dice_weight,
            fixed_labels=batch.get("fixed_labels"), moving_labels=batch.get("moving_labels"),
            num_labels=loss.num_labels,
        ).parts()

    def predict_field(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator) -> Tensor:
        return model(fixed, moving)

    def export(self, model: nn.Module, train_dataset: Dataset, output_dir: Path, metrics: dict[str, float]) -> None:
        model.save_pretrained(output_dir / "teacher", safe_serialization=True)
        stats = write_phi0_cache(model, train_dataset, Phi0Cache(output_dir / "phi0", self.config.cache_dtype),
                                 batch_size=self.config.validation.batch_size)
        stats.save(output_dir / "field_stats.json")


@torch.no_grad()
def write_phi0_cache(model: nn.Module, dataset: Dataset, cache: Phi0Cache, batch_size: int = 8) -> FieldStatistics:
    """Register every pair of ``dataset`` with ``model``, store each field in ``cache`` and
    return the per-axis statistics of the fields (computed before the storage cast).

    Args:
        model: ``model(fixed, moving) -> (B, ndim, *S)`` field in voxels (eval mode).
        dataset: pair items (see :mod:`diffusereg.training.data`).
        cache: where the fields go (one file per pair id).
        batch_size: pairs per forward pass.
    """
    device = next(model.parameters()).device
    accumulator: FieldAccumulator | None = None
    max_error = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        fields = model(batch["fixed"].to(device), batch["moving"].to(device)).float()
        accumulator = accumulator or FieldAccumulator(fields.shape[1])
        accumulator.update(fields)
        for name, field in zip(pair_ids(batch), fields):
            max_error = max(max_error, cache.write(name, field))
    mean, std = accumulator.mean_std()
    return FieldStatistics(mean=mean, std=std, num_fields=accumulator.fields, spatial_dims=len(mean),
                           cache_dtype=str(cache.dtype).removeprefix("torch."), cache_max_abs_error=max_error)


def train_teacher(config: TeacherConfig, resume: bool = False, until_step: int | None = None) -> dict[str, float]:
    """Train the teacher as ``config`` says; at ``train.max_steps`` write the model, the phi0
    cache and ``field_stats.json`` into ``train.output_dir``. Returns the last logged row."""
    trainer = Trainer(TeacherStage(config), resume=resume)
    try:
        return trainer.fit(until_step=until_step)
    finally:
        trainer.close()
