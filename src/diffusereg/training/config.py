"""Typed training configurations, read from YAML with clear errors.

A config file is a YAML mapping whose sections match the dataclasses below; every key is
optional (defaults shown), unknown keys and wrongly typed values raise :class:`ConfigError`
naming the key. Relative paths are resolved against the current working directory when the
trainer starts (run from the repository root, or give absolute paths).

Example (``configs/teacher_2d_cpu.yaml``)::

    data: {spatial_dims: 2, acdc_root: path/to/acdc/training, batch_size: 8}
    model: {channels: [16, 32, 32, 32]}
    loss: {similarity: ssim, smoothness_weight: 1.0}
    train: {max_steps: 2000, output_dir: path/to/output}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "DiffusionLossConfig",
    "LoopConfig",
    "OptimConfig",
    "StageConfig",
    "TeacherConfig",
    "TeacherLossConfig",
    "ValidationConfig",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and the problem."""


@dataclass
class AugmentConfig:
    """Random spatial augmentation, applied identically to both images and both label maps
    of a pair (MONAI dictionary transforms). Rotations are in-plane (the last two axes)."""

    enabled: bool = False
    affine_prob: float = 0.5
    rotate_degrees: float = 10.0
    scale: float = 0.1  # relative, each axis in [1 - scale, 1 + scale]
    translate_voxels: float = 5.0
    elastic_prob: float = 0.0
    flip_prob: float = 0.0  # flips the last (width) axis


@dataclass
class DataConfig:
    """Where the training and validation pairs come from.

    Either ACDC (``acdc_root``: the folder of ``patientNNN`` directories; ED = fixed,
    ES = moving, split into train/val patients by :class:`diffusereg.data.ACDCDataset`) or
    pair lists for :class:`diffusereg.data.PairedDataset` (``pairs``, ``val_pairs``: CSV or
    JSON files); ``pairs`` wins when both are set. ``reverse_share`` is the share of training
    pairs registered in the swapped direction: each pair's fixed and moving images (and labels)
    trade places, so for ACDC ES is the fixed image and ED the moving one.
    """

    spatial_dims: Literal[2, 3] = 2
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 3.15])  # model grid voxel size, mm, ITK (x, y, z)
    size: list[int] = field(default_factory=lambda: [32, 128, 128])  # model grid shape (D, H, W); 2D uses (H, W)
    acdc_root: str | None = None
    train_split: Literal["train", "val", "all"] = "train"
    val_split: Literal["train", "val", "all"] = "val"
    train_patients: list[str] | None = None  # restrict training to these patients (e.g. tests)
    val_patients: list[str] | None = None
    skip_empty_slices: bool = True  # 2D only: drop slices without any foreground label
    pairs: str | None = None
    val_pairs: str | None = None
    batch_size: int = 1  # per process
    num_workers: int = 0
    reverse_share: float = 0.0  # share of training pairs in the swapped direction (ACDC: ES fixed, ED moving)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    """AdamW with a cosine learning-rate decay from ``lr`` to ``min_lr`` over ``max_steps``."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0  # linear warm-up from lr/100 before the cosine decay
    max_grad_norm: float | None = 1.0  # None: no clipping
    ema_decay: float | None = None  # e.g. 0.999; None: no EMA


@dataclass
class LoopConfig:
    """The training loop: length, seeds, precision, logging and checkpoint cadence.

    ``max_steps`` counts optimizer steps; each process draws ``data.batch_size`` pairs per
    step, so the effective batch is ``batch_size * num_processes``.
    """

    output_dir: str | None = None  # required (the config or --output)
    max_steps: int = 1000
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"  # auto: bf16 on a GPU that has it
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)


@dataclass
class ValidationConfig:
    """Validation on the validation pairs (main process): Dice per ACDC structure and NJD."""

    every: int = 500  # steps; 0 disables (a final validation still runs at max_steps)
    max_pairs: int | None = None  # first N validation items only (None: all)
    batch_size: int = 8
    num_inference_steps: int = 10  # diffusion only: DDIM steps of the validation sampling


@dataclass
class TeacherLossConfig:
    """Unsupervised registration loss of the teacher, plus optional label supervision.

    ``similarity`` is ``1 - SSIM`` or negative local NCC (window ``similarity_window``);
    ``smoothness_weight`` scales the mean squared field gradient (voxels^2);
    ``dice_weight > 0`` ADDS LABEL SUPERVISION (soft Dice of the warped one-hot moving labels
    against the fixed labels; the data must have labels), making the teacher semi-supervised.
    """

    similarity: Literal["ssim", "ncc"] = "ssim"
    similarity_window: int = 9
    smoothness_weight: float = 1.0
    dice_weight: float = 0.0
    num_labels: int = 4  # label values 0 .. num_labels - 1 (ACDC: 4)


@dataclass
class DiffusionLossConfig:
    """The diffusion stage's objective.

    ``recipe: paper`` is the paper's (:func:`~diffusereg.training.diffusion_loss`): MSE of the
    prediction + ``similarity_weight * (1 - SSIM(f, m o phi0_hat))`` + ``smoothness_weight *
    mean squared gradient(phi0_hat)`` (lambda1 = 1, lambda2 = 0.1), phi0 the teacher's field.

    ``recipe: refine`` (:func:`~diffusereg.training.refinement_loss`; the denoiser must have
    ``prediction_type: increment``) trains every step to refine the estimate it starts from, on
    the moving image warped by it: the starts are zero (share ``zero_start``), the teacher's field
    scaled by a factor in [0.3, 1.3] (``teacher_start``), the teacher's field of another pair of the
    batch (``other_start``), or the denoiser's own estimate (the rest): after 1 to 3 sampling steps
    from noise at random timesteps in [400, 2000) with ``own_schedules`` empty, or, with
    ``own_schedules`` listing step counts (e.g. ``[5, 10]``), after the first k steps (k drawn
    from 1 .. N - 1) of the DDIM sampler's own N-step schedule, the step then trained being the
    sampler's next one, at its timestep and with the noise the sampler carries (unrolled
    training on the sampler's trajectory). The sampler's state is the target noised to the step's
    timestep; the target is the teacher applied recursively as many times as one of
    ``target_passes`` (drawn per pair) says, with a weight going linearly from ``target_weight``
    to ``target_weight_final`` over the run.
    """

    recipe: Literal["paper", "refine"] = "paper"
    similarity_weight: float = 1.0
    smoothness_weight: float = 0.1
    ssim_window: int = 9
    target_passes: list[int] = field(default_factory=lambda: [3])
    target_weight: float = 1.0
    target_weight_final: float = 1.0
    zero_start: float = 0.3
    teacher_start: float = 0.15
    other_start: float = 0.1
    own_schedules: list[int] = field(default_factory=list)


@dataclass
class StageConfig:
    """What both stages are configured with: data, network (``model``: keyword arguments of the
    stage's network class), optimiser, loop and validation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class TeacherConfig(StageConfig):
    """Stage 1: the one-shot registration network that gives phi0 (``model`` is passed to
    :class:`diffusereg.models.RegistrationNet` as keyword arguments)."""

    loss: TeacherLossConfig = field(default_factory=TeacherLossConfig)
    cache_dtype: Literal["float16", "float32"] = "float16"  # storage type of the phi0 cache


PARAMETRISATION_KEYS = {"prediction_type", "integration_steps", "proposal", "increment_passes"}
"""Denoiser settings that keep its network: ``model`` may set them with ``init_weights``
(``proposal: teacher`` makes its output a residual to the teacher's velocity, see :class:`DiffusionConfig`)."""


@dataclass
class DiffusionConfig(StageConfig):
    """Stage 2: the denoiser (``model`` is passed to :class:`diffusereg.models.DiffuseRegDenoiser`).

    ``teacher`` is the output directory of stage 1 (``phi0/``, ``field_stats.json``,
    ``teacher/``), or a saved pipeline with a teacher (e.g. ``diffusereg/acdc-2d``, to fine-tune
    the shipped model; it has no phi0 cache, so ``phi0_source: teacher``). ``phi0_source:
    cache`` reads phi0 from ``phi0/``; ``teacher`` runs the frozen teacher on every (possibly
    augmented) batch instead, which augmentation requires.
    ``init_weights`` (a pipeline name such as ``diffusereg/acdc-2d``, a Hub id or a folder)
    starts from that pipeline's denoiser instead of fresh weights (fine-tuning); its
    architecture comes with it, so ``model`` must then stay empty, and its field statistics
    must be the teacher's. ``model: proposal: teacher`` makes the denoiser's output a residual
    added to the frozen teacher's velocity on the fixed and the warped moving image (the
    pipeline's teacher component; ``prediction_type: increment`` only); a denoiser that had no
    proposal starts with its output layer at zero, so training starts from the recursive teacher.
    """

    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    teacher: str | None = None  # required (the config or --teacher)
    phi0_source: Literal["cache", "teacher"] = "cache"
    init_weights: str | None = None

    def __post_init__(self) -> None:
        starts = (self.loss.zero_start, self.loss.teacher_start, self.loss.other_start)
        if min(starts) < 0 or sum(starts) > 1:
            raise ConfigError(f"loss.zero_start, teacher_start, other_start must be shares >= 0 summing to at most 1, "
                              f"got {starts}")
        if any(steps < 2 for steps in self.loss.own_schedules):
            raise ConfigError(f"loss.own_schedules are sampling step counts >= 2 (a step to roll out and the next "
                              f"one to train), got {self.loss.own_schedules}")
        if self.loss.recipe == "refine" and self.phi0_source != "teacher":
            raise ConfigError("loss.recipe: refine runs the teacher on every batch: set phi0_source: teacher")
        if self.model.get("proposal", "teacher") != "teacher":
            raise ConfigError(f"model.proposal can only be 'teacher' (a residual to the teacher's velocity), "
                              f"got {self.model['proposal']!r}")
        architecture = sorted(set(self.model) - PARAMETRISATION_KEYS)
        if self.init_weights is not None and architecture:
            raise ConfigError(f"init_weights ({self.init_weights}) brings its own architecture; `model` may only set "
                              f"{sorted(PARAMETRISATION_KEYS)} (got {architecture})")
        if self.data.reverse_share > 0 and self.phi0_source == "cache":
            raise ConfigError("data.reverse_share needs phi0_source: teacher (the cached phi0 register one direction only)")
        if self.data.augment.enabled and self.phi0_source == "cache":
            raise ConfigError("data.augment.enabled needs phi0_source: teacher "
                              "(the cached phi0 fit the un-augmented pairs only)")


Config = TypeVar("Config", TeacherConfig, DiffusionConfig)


def load_config(path: str | Path, kind: type[Config]) -> Config:
    """Read a YAML file into ``kind`` (:class:`TeacherConfig` or :class:`DiffusionConfig`).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: invalid YAML, unknown keys, wrong types (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    try:
        return _build(kind, raw, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(config: TeacherConfig | DiffusionConfig) -> dict[str, Any]:
    """Plain nested dict of a config (what ``config.yaml`` in an output directory holds)."""
    return dataclasses.asdict(config)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``raw``; ``where`` is the dotted key prefix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the file'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; allowed under "
                          f"{where.rstrip('.') or 'the top level'}: {', '.join(names)}")
    values = {name: _coerce(raw[name], hints[name], f"{where}{name}") for name in names if name in raw}
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against type ``hint`` (numbers written as strings such as YAML's ``1e-4``
    become floats); raises :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
