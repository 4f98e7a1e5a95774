"""Training data: the datasets a config names, the phi0 cache, field statistics, augmentation.

Batches are dicts as produced by :mod:`diffusereg.data` (``fixed``, ``moving`` ``(B, 1, *S)``
float32 in ``[0, 1]``, optional ``fixed_labels``/``moving_labels`` int64, and the case names
``patient`` (ACDC) or ``case`` (pair lists), plus ``slice`` in 2D) and, with a phi0 cache,
``phi0`` ``(B, ndim, *S)`` (teacher displacement in voxels).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from monai.transforms import Compose, Rand2DElasticd, Rand3DElasticd, RandAffined, RandFlipd
from monai.utils import convert_to_tensor
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, Subset

from diffusereg.data import ACDCDataset, PairedDataset, PaperPreprocessing
from diffusereg.training.config import AugmentConfig, ConfigError, DataConfig

__all__ = [
    "FieldAccumulator",
    "FieldStatistics",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "reverse_directions",
    "Phi0Cache",
    "WithPhi0",
    "augment_batch",
    "build_augmentation",
    "build_dataset",
    "case_names",
    "pair_id",
    "pair_ids",
]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_labels", "moving_labels")


def build_dataset(data: DataConfig, split: Literal["train", "val"], max_items: int | None = None) -> Dataset | None:
    """The training or validation dataset that ``data`` describes.

    ``pairs``/``val_pairs`` (PairedDataset) win over ``acdc_root``; the validation set is
    ``None`` when pair lists are used without ``val_pairs``. ``max_items`` keeps the first items.

    Raises:
        ConfigError: the data files named in the config do not exist.
    """
    skip_empty = data.skip_empty_slices and data.spatial_dims == 2
    preprocessing = PaperPreprocessing(spacing=tuple(data.spacing), size=tuple(data.size))
    if data.pairs is not None:
        list_file = data.pairs if split == "train" else data.val_pairs
        if list_file is None:
            return None
        if not Path(list_file).is_file():
            raise ConfigError(f"data.{'pairs' if split == 'train' else 'val_pairs'}: {list_file} does not exist")
        dataset: Dataset = PairedDataset(list_file, spatial_dims=data.spatial_dims, skip_empty_slices=skip_empty,
                                         preprocessing=preprocessing)
    else:
        if data.acdc_root is None or not Path(data.acdc_root).is_dir():
            raise ConfigError(f"data.acdc_root: {data.acdc_root} is not a directory "
                              "(set it in the config or pass --data)")
        dataset = ACDCDataset(
            data.acdc_root,
            split=data.train_split if split == "train" else data.val_split,
            spatial_dims=data.spatial_dims,
            patients=data.train_patients if split == "train" else data.val_patients,
            skip_empty_slices=skip_empty,
            preprocessing=preprocessing,
        )
    if max_items is not None and max_items < len(dataset):
        dataset = Subset(dataset, range(max_items))
    return dataset


def case_names(batch: dict[str, Any]) -> list[str]:
    """The case of every item of a collated batch (``patient`` for ACDC, else ``case``)."""
    names = batch.get("patient", batch.get("case"))
    if names is None:
        raise KeyError("batch items carry neither 'patient' nor 'case'")
    return list(names)


def pair_id(case: str, slice_index: int | Tensor | None) -> str:
    """A unique name for an item: its case, plus ``_sliceNN`` for a 2D slice of a volume
    (the phi0 cache's file names)."""
    return case if slice_index is None else f"{case}_slice{int(slice_index):02d}"


def pair_ids(batch: dict[str, Any]) -> list[str]:
    """:func:`pair_id` of every item of a collated batch."""
    names = case_names(batch)
    slices = batch.get("slice", [None] * len(names))
    return [pair_id(name, index) for name, index in zip(names, slices)]


@dataclass
class FieldStatistics:
    """Per-axis mean and std (voxels, array-axis order) of the teacher fields used to z-score
    phi0, as stored in ``field_stats.json``.

    Attributes:
        mean, std: one value per field channel.
        num_fields: number of fields (pairs or slices) they were computed on.
        spatial_dims: 2 or 3.
        cache_dtype: storage type of the phi0 cache files.
        cache_max_abs_error: largest ``|stored - computed|`` over all cached voxels (voxels).
    """

    mean: list[float]
    std: list[float]
    num_fields: int
    spatial_dims: int
    cache_dtype: str
    cache_max_abs_error: float

    def save(self, path: Path) -> None:
        """Write as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> FieldStatistics:
        """Read a ``field_stats.json``; raises FileNotFoundError naming it when absent."""
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train the teacher first (diffusereg train teacher)")
        return cls(**json.loads(path.read_text()))


class FieldAccumulator:
    """Running per-channel sums (float64) of fields ``(B, ndim, *S)`` -> mean and std."""

    def __init__(self, ndim: int) -> None:
        self.total = torch.zeros(ndim, dtype=torch.float64)
        self.squares = torch.zeros(ndim, dtype=torch.float64)
        self.voxels = 0
        self.fields = 0

    def update(self, fields: Tensor) -> None:
        """Add a batch of fields."""
        values = fields.detach().double().cpu().transpose(0, 1).reshape(fields.shape[1], -1)
        self.total += values.sum(dim=1)
        self.squares += values.square().sum(dim=1)
        self.voxels += values.shape[1]
        self.fields += fields.shape[0]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std."""
        mean = self.total / self.voxels
        std = (self.squares / self.voxels - mean.square()).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()


class Phi0Cache:
    """The teacher's fields on disk: ``directory/<pair id>.safetensors`` with one tensor
    ``field`` ``(ndim, *S)`` in voxels, stored as ``dtype``."""

    def __init__(self, directory: Path, dtype: Literal["float16", "float32"] = "float16") -> None:
        self.directory = Path(directory)
        self.dtype = getattr(torch, dtype)

    def path(self, pair_id: str) -> Path:
        return self.directory / f"{pair_id}.safetensors"

    def write(self, pair_id: str, field: Tensor) -> float:
        """Store one field ``(ndim, *S)``; returns the largest storage error (voxels)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = field.detach().cpu().to(self.dtype).contiguous()
        save_file({"field": stored}, str(self.path(pair_id)))
        return float((stored.float() - field.detach().cpu().float()).abs().max())

    def read(self, pair_id: str) -> Tensor:
        """The float32 field ``(ndim, *S)`` of a pair; FileNotFoundError names the pair when absent."""
        path = self.path(pair_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the phi0 cache lacks {pair_id}; train the teacher with the same data settings")
        return load_file(str(path))["field"].float()


class WithPhi0(Dataset):
    """A pair dataset whose items also carry ``phi0`` ``(ndim, *S)`` from a :class:`Phi0Cache`."""

    def __init__(self, dataset: Dataset, cache: Phi0Cache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["phi0"] = self.cache.read(pair_id(item.get("patient", item.get("case")), item.get("slice")))
        return item


def build_augmentation(config: AugmentConfig, spatial_dims: int) -> Compose | None:
    """MONAI random spatial transforms applied with the same parameters to both images
    (bilinear) and both label maps (nearest) of an item; ``None`` when disabled.

    Rotation, scaling and translation act in-plane (the last two axes); ``rotate_degrees`` is
    the largest rotation, ``scale`` the largest relative zoom, ``translate_voxels`` the largest
    shift. Elastic: MONAI's 2D/3D elastic deformations with fixed moderate parameters.
    """
    if not config.enabled:
        return None
    keys = [*IMAGE_KEYS, *LABEL_KEYS]
    modes = ["bilinear", "bilinear", "nearest", "nearest"]
    common = {"keys": keys, "mode": modes, "padding_mode": "zeros", "allow_missing_keys": True}
    angle = math.radians(config.rotate_degrees)
    transforms = [
        RandAffined(prob=config.affine_prob, rotate_range=(angle, 0.0, 0.0) if spatial_dims == 3 else (angle,),
                    scale_range=_in_plane(config.scale, spatial_dims),
                    translate_range=_in_plane(config.translate_voxels, spatial_dims), **common)
    ]
    if config.elastic_prob > 0:
        if spatial_dims == 2:
            elastic = Rand2DElasticd(prob=config.elastic_prob, spacing=(16, 16), magnitude_range=(1, 2), **common)
        else:
            elastic = Rand3DElasticd(prob=config.elastic_prob, sigma_range=(5, 7), magnitude_range=(20, 50), **common)
        transforms.append(elastic)
    if config.flip_prob > 0:
        transforms.append(RandFlipd(keys=keys, prob=config.flip_prob, spatial_axis=spatial_dims - 1,
                                    allow_missing_keys=True))
    return Compose(transforms)


def _in_plane(value: float, spatial_dims: int) -> tuple[float, ...]:
    """A per-axis range that acts on the last two axes only."""
    return (0.0, value, value) if spatial_dims == 3 else (value, value)


def reverse_directions(batch: dict[str, Any], share: float, generator: torch.Generator) -> dict[str, Any]:
    """A collated batch in which each pair, with probability ``share`` (drawn with ``generator``),
    is turned round: its moving image (and labels) become the fixed ones and vice versa, so that
    a network learns to register in both directions (for ACDC: ES fixed / ED moving as often as
    ED fixed / ES moving)."""
    if share <= 0:
        return batch
    images = batch[IMAGE_KEYS[0]]
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < share
    turned = dict(batch)
    for fixed_key, moving_key in ((IMAGE_KEYS[0], IMAGE_KEYS[1]), (LABEL_KEYS[0], LABEL_KEYS[1])):
        if fixed_key not in batch:
            continue
        mask = flip.to(batch[fixed_key].device).reshape(-1, *([1] * (batch[fixed_key].ndim - 1)))
        turned[fixed_key] = torch.where(mask, batch[moving_key], batch[fixed_key])
        turned[moving_key] = torch.where(mask, batch[fixed_key], batch[moving_key])
    return turned


def augment_batch(batch: dict[str, Any], transform: Compose, seed: int) -> dict[str, Any]:
    """Apply ``transform`` to every item of a collated batch, seeded by ``seed`` (so a step's
    augmentation does not depend on anything but the step); labels stay int64."""
    transform.set_random_state(seed=seed % 2**32)
    keys = [key for key in (*IMAGE_KEYS, *LABEL_KEYS) if key in batch]
    outputs = [transform({key: batch[key][i] for key in keys}) for i in range(batch[IMAGE_KEYS[0]].shape[0])]
    augmented = dict(batch)
    for key in keys:
        stacked = torch.stack([convert_to_tensor(out[key], track_meta=False) for out in outputs])
        augmented[key] = stacked.round().long() if key in LABEL_KEYS else stacked.float()
    return augmented
