"""DiffuseRegPipeline: register two images by denoising a deformation field."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffusereg.callbacks import TrajectoryRecorder
from diffusereg.data.preprocessing import PaperPreprocessing, resample_to_grid
from diffusereg.guidance import Guide, GuidanceFunction, as_guide
from diffusereg.hub import resolve_model
from diffusereg.io import Grid, Image, displacement_transform, read_image, validate_image, write_atomically
from diffusereg.models import DiffuseRegDenoiser, clean_and_noise
from diffusereg.spatial import warp
from diffusereg.validation import (WeightsError, check_model_grid_arrays, check_pair, check_sources, check_weights,
                                   source_name)

__all__ = ["DiffuseRegPipeline", "DiffuseRegPipelineOutput", "default_scheduler"]

CALLBACK_TENSOR_INPUTS = ("field_t", "x0", "warped")


def default_scheduler(kind: str = "ddim", clip_range: float | None = None) -> DDIMScheduler | DDPMScheduler:
    """The paper's noise schedule: linear betas 1e-6 .. 1e-2 over 2000 steps, epsilon prediction.

    Args:
        kind: ``"ddim"`` (deterministic, "trailing" spacing so few steps start from pure noise)
            or ``"ddpm"`` (ancestral sampling).
        clip_range: None keeps every clean-field estimate as predicted; a number ``r`` clips the
            z-scored estimate to ``[-r, r]`` at every step (the schedulers' ``clip_sample``), which
            stops the large errors of the first, pure-noise steps from propagating.
    """
    clip = {"clip_sample": False} if clip_range is None else {"clip_sample": True, "clip_sample_range": clip_range}
    common = dict(num_train_timesteps=2000, beta_start=1e-6, beta_end=1e-2, beta_schedule="linear",
                  prediction_type="epsilon", timestep_spacing="trailing", **clip)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    if kind == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small")
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


@dataclass
class DiffuseRegPipelineOutput(BaseOutput):
    """What a registration returns.

    Args:
        field: displacement ``(ndim, *S)`` (or ``(B, ndim, *S)`` for batched inputs), voxels of the
            fixed image's grid, channel ``i`` along array axis ``i``. With ``num_samples > 1`` it is
            the mean over samples.
        warped: the moving image warped by ``field``, shaped like the fixed image input.
        warped_labels: the moving labels warped by ``field`` (nearest neighbour), or None.
        trajectory: with ``return_trajectory=True``, a dict with ``steps`` (list of step indices),
            ``fields`` ``(T, N, ndim, *S)`` and ``warped`` ``(T, N, 1, *S)`` on the model grid
            (``N = batch * num_samples``; slices of a volume count as batch for a 2D model).
        uncertainty: per-voxel standard deviation of the field over samples (same shape as
            ``field``, voxels) when ``num_samples > 1``, else None.
        num_steps_run: how many sampling steps ran (fewer than asked when a callback stopped).
        grid: for image/file inputs, the fixed image's grid (spacing, origin, direction) on which
            ``field``, ``warped``, ``warped_labels`` and ``uncertainty`` lie; None for array inputs.
    """

    field: torch.Tensor | np.ndarray
    warped: torch.Tensor | np.ndarray
    warped_labels: torch.Tensor | np.ndarray | None
    trajectory: dict[str, Any] | None
    uncertainty: torch.Tensor | np.ndarray | None
    num_steps_run: int
    grid: Grid | None = None


@dataclass
class _ModelGridBatch:
    """Inputs brought to the model's layout, and how to bring outputs back.

    ``fixed``/``moving``: ``(N, 1, *S_model)``; ``moving_labels`` likewise or None.
    ``layout``: ``"single"`` (unbatched input), ``"batch"`` (batched input), ``"slices"`` (one
    volume registered slice by slice by a 2D model) or ``"slices_batch"`` (a batch of volumes so);
    ``num_volumes`` and ``depth`` say how to restack slices.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    moving_labels: torch.Tensor | None
    layout: str
    num_volumes: int = 1
    depth: int = 1


class DiffuseRegPipeline(DiffusionPipeline):
    r"""Deformable registration by DDPM/DDIM denoising of the deformation field (DiffuseReg).

    Components:
        denoiser: a :class:`~diffusereg.models.DiffuseRegDenoiser` (or any model with the same
            ``encode_condition`` / ``forward`` interface and ``field_mean``/``field_std`` in its config).
        scheduler: a diffusers ``DDIMScheduler`` or ``DDPMScheduler``; see :func:`default_scheduler`.
        model_spacing: voxel size of the model grid, mm, ITK ``(x, y, z)`` order; image and file
            inputs are resampled to it (paper: 1.5 x 1.5 x 3.15).
        model_size: model grid shape ``(D, H, W)`` (paper: 32 x 128 x 128); 2D images use ``(H, W)``.

    Example:
        ```py
        >>> import torch
        >>> from diffusereg import DiffuseRegPipeline, SmoothnessGuidance, EarlyStopping
        >>> pipe = DiffuseRegPipeline.from_pretrained("path/to/model")
        >>> out = pipe(fixed, moving, num_inference_steps=10,
        ...            guidance=[SmoothnessGuidance(scale=0.05)],
        ...            callback_on_step_end=EarlyStopping(tolerance=0.02),
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.field.shape  # (ndim, *S), voxels
        ```
    """

    model_cpu_offload_seq = "denoiser"
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, denoiser: DiffuseRegDenoiser, scheduler: DDIMScheduler | DDPMScheduler,
                 model_spacing: tuple[float, ...] | list[float] = (1.5, 1.5, 3.15),
                 model_size: tuple[int, ...] | list[int] = (32, 128, 128)) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)
        self.register_to_config(model_spacing=list(model_spacing), model_size=list(model_size))
        self._interrupt = False

    # ------------------------------------------------------------------ properties
    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from a callback) to stop sampling after the current step."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the dimensionality the denoiser works in."""
        return int(self.denoiser.config.spatial_dims)

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, allow_pickle: bool = False,
                        **kwargs: Any) -> "DiffuseRegPipeline":
        """Load a bundled model by its short name (e.g. ``"diffusereg/acdc-2d"``, offline), a local
        directory or a Hugging Face Hub repo id.

        A local folder's weights are checked first (:func:`~diffusereg.validation.check_weights`):
        complete safetensors files holding the tensors its config builds. Weights stored in half
        precision are loaded into the float32 model (upcast) unless a ``dtype`` is given.

        Args:
            pretrained_model_name_or_path: bundled name, folder or Hub id.
            allow_pickle: also load pickle weights (``.bin``, where a component has no
                safetensors file). Pickle files can run code when loaded: only for weights from a
                source you trust. Default False: they are refused.
            **kwargs: passed to ``DiffusionPipeline.from_pretrained``.

        Raises:
            diffusereg.validation.WeightsError: pickle weights without ``allow_pickle``; corrupt,
                truncated or mismatched weights (naming the file).
        """
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise WeightsError("use_safetensors=False loads pickle weights, which can run code when loaded; "
                                   "pass allow_pickle=True if you trust their source")
            kwargs["use_safetensors"] = True
        source = resolve_model(pretrained_model_name_or_path)
        if Path(source).is_dir():
            check_weights(source, allow_pickle)
        return super().from_pretrained(source, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: str | None = None, **kwargs: Any) -> None:
        """Save components (safetensors) and a model card ``README.md``.

        Args:
            save_directory: target folder.
            model_card: Markdown text of the card (training data, metrics, intended use); a card
                describing the configuration is written when omitted.
        """
        kwargs["safe_serialization"] = True
        super().save_pretrained(save_directory, **kwargs)
        card = model_card if model_card is not None else self._configuration_card()
        write_atomically(Path(save_directory) / "README.md", lambda temporary: temporary.write_text(card))

    def _configuration_card(self) -> str:
        """A minimal model card: what the model is and how it was configured."""
        config = dict(self.denoiser.config)
        lines = [
            "# DiffuseReg registration pipeline",
            "",
            "Deformable registration by denoising diffusion of the deformation field (diffusereg).",
            "",
            f"- denoiser: `{type(self.denoiser).__name__}`, spatial_dims={config.get('spatial_dims')}",
            f"- scheduler: `{type(self.scheduler).__name__}`, {self.scheduler.config.num_train_timesteps} training steps",
            f"- field normalisation: mean={config.get('field_mean')}, std={config.get('field_std')} (voxels)",
            "",
            "Training data and metrics: not recorded for this model.",
            "",
            "Intended use: research on image registration; not for clinical decisions.",
            "",
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor, moving_labels: torch.Tensor | None,
                     num_inference_steps: int, num_samples: int, tensor_inputs: Sequence[str]) -> None:
        """Raise a ValueError naming the problem if the call cannot run."""
        if tuple(fixed.shape) != tuple(moving.shape):
            raise ValueError(f"fixed and moving must have the same shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        if moving_labels is not None and tuple(moving_labels.shape) != tuple(moving.shape):
            raise ValueError(f"moving_labels shape {tuple(moving_labels.shape)} differs from moving shape {tuple(moving.shape)}")
        check_model_grid_arrays({"fixed": fixed, "moving": moving})
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback tensor inputs {unknown} unknown; choose from {self._callback_tensor_inputs}")

    def _to_model_grid(self, fixed: Any, moving: Any, moving_labels: Any) -> _ModelGridBatch:
        """Arrays/tensors already on the model grid -> ``(N, 1, *S)`` tensors plus their layout.

        Accepted shapes (``d`` = the denoiser's spatial dims): ``(*S)`` unbatched, ``(B, 1, *S)``
        batched; for a 2D denoiser also ``(D, H, W)`` and ``(B, 1, D, H, W)`` volumes, which are
        registered slice by slice.
        """
        tensors = [None if x is None else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
                   for x in (fixed, moving, moving_labels)]
        fixed_t, moving_t, labels_t = tensors
        self.check_inputs(fixed_t, moving_t, labels_t, 1, 1, ())
        d = self.spatial_dims
        rank = fixed_t.ndim
        multiple = self.denoiser.size_multiple
        if any(size % multiple for size in fixed_t.shape[-d:]):
            raise ValueError(
                f"arrays of shape {tuple(fixed_t.shape)} are not on a model grid (each of the last {d} sizes a multiple "
                f"of {multiple}; this pipeline's grid is {' x '.join(map(str, self.config.model_size))}): give file paths "
                "or diffusereg.io.Image objects (resampled, scaled and cropped for you), or bring images there with "
                "pipe.preprocessing(fixed_image, moving_image)")

        def as_images(x: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
            return None if x is None else x.reshape(shape).float()

        if rank == d:
            shape = (1, 1, *fixed_t.shape)
            return _ModelGridBatch(*(as_images(x, shape) for x in tensors), layout="single")
        if rank == d + 2 and fixed_t.shape[1] == 1:
            return _ModelGridBatch(*(as_images(x, tuple(fixed_t.shape)) for x in tensors), layout="batch")
        if d == 2 and rank in (3, 5):
            volumes = fixed_t.reshape(-1, *fixed_t.shape[-3:])
            num_volumes, depth, height, width = volumes.shape
            shape = (num_volumes * depth, 1, height, width)
            return _ModelGridBatch(*(as_images(x, shape) for x in tensors), layout="slices" if rank == 3 else "slices_batch",
                                   num_volumes=num_volumes, depth=depth)
        raise ValueError(
            f"cannot read an input of shape {tuple(fixed_t.shape)} for a {d}D model: give {d}D arrays "
            f"({'H, W' if d == 2 else 'D, H, W'}) or batches (B, 1, *S)" + (" or volumes (D, H, W)" if d == 2 else "")
        )

    def _from_model_grid(self, x: torch.Tensor, batch: _ModelGridBatch, is_field: bool) -> torch.Tensor:
        """Inverse of :meth:`_to_model_grid` for an output ``(N, C, *S)``.

        Fields keep their channel axis; images lose it where the input had none (``"single"``
        and ``"slices"`` layouts).
        """
        if batch.layout.startswith("slices"):
            # (V*D, C, H, W) -> (V, C, D, H, W); a field gains a zero channel for the slice axis
            x = x.reshape(batch.num_volumes, batch.depth, *x.shape[1:]).transpose(1, 2)
            if is_field:
                x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
        if batch.layout in ("single", "slices"):
            x = x[0] if is_field else x[0, 0]
        return x

    def _field_to_model_layout(self, field: Any, batch: _ModelGridBatch) -> torch.Tensor:
        """A field given in the layout this call returns (see :meth:`_from_model_grid`) ->
        ``(N, ndim, *S)`` float32; a ValueError names the expected shape otherwise."""
        x = torch.as_tensor(np.asarray(field) if not torch.is_tensor(field) else field).float()
        ndim, count, shape = self.spatial_dims, batch.fixed.shape[0], tuple(batch.fixed.shape[2:])
        if batch.layout.startswith("slices"):
            expected = (batch.num_volumes, ndim + 1, batch.depth, *shape)
            if batch.layout == "slices":
                expected = expected[1:]
            # (V, 3, D, H, W) -> (V*D, 2, H, W); the across-slice channel is dropped
            x = (x.reshape(-1, *expected[-4:])[:, 1:].transpose(1, 2).reshape(count, ndim, *shape)
                 if tuple(x.shape) == expected else None)
        else:
            expected = (ndim, *shape) if batch.layout == "single" else (count, ndim, *shape)
            x = x.reshape(count, ndim, *shape) if tuple(x.shape) == expected else None
        if x is None:
            raise ValueError(f"init_field must have the shape of the field this call returns, {expected}, "
                             f"got {tuple(np.shape(field))}")
        if not torch.isfinite(x).all():
            raise ValueError("init_field contains NaN or infinite values")
        return x

    # ------------------------------------------------------------------ images with geometry
    @property
    def preprocessing(self) -> PaperPreprocessing:
        """The preprocessing that brings image/file inputs onto this model's grid."""
        return PaperPreprocessing(spacing=tuple(self.config.model_spacing), size=tuple(self.config.model_size))

    @staticmethod
    def _as_image(x: Any, name: str) -> Image | None:
        """A path, SimpleITK image or :class:`~diffusereg.io.Image` as a validated Image; None for arrays."""
        if x is None or isinstance(x, (np.ndarray, torch.Tensor)):
            return None
        if isinstance(x, (str, os.PathLike)):
            return read_image(x)
        if isinstance(x, sitk.Image):
            return validate_image(Image.from_sitk(x), name)
        if isinstance(x, Image):
            return validate_image(x, name)
        raise TypeError(f"{name}: cannot register a {type(x).__name__}; give a path, SimpleITK image, "
                        "diffusereg.io.Image, numpy array or torch tensor")

    def _register_images(self, fixed: Image, moving: Image, moving_labels: Image | None, output_type: str,
                         **sampling: Any) -> DiffuseRegPipelineOutput:
        """Preprocess to the model grid, sample there, and bring the results to the fixed grid.

        The field is mapped back with the preprocessing's inverse (voxels of the original fixed
        grid); the original moving image and labels are resampled once through it (its ITK
        transform, :func:`~diffusereg.io.displacement_transform`) onto the fixed grid, so the
        outputs overlay the fixed image, and ``diffusereg apply`` with the saved field gives the
        same voxels.
        """
        pair = self.preprocessing(fixed, moving, moving_labels=moving_labels)
        on_grid = self(pair.fixed, pair.moving, output_type="pt", **sampling)
        field = torch.from_numpy(pair.grid.field_to_original(on_grid.field.numpy())).float()
        uncertainty = None
        if on_grid.uncertainty is not None:
            uncertainty = torch.from_numpy(pair.grid.field_to_original(on_grid.uncertainty.numpy())).float()
        transform = displacement_transform(field.numpy(), fixed.grid)
        warped = torch.from_numpy(resample_to_grid(moving, fixed.grid, "linear", transform=transform))
        warped_labels = None
        if moving_labels is not None:
            warped_labels = torch.from_numpy(resample_to_grid(moving_labels, fixed.grid, "nearest", transform=transform))

        def finish(x: torch.Tensor | None) -> torch.Tensor | np.ndarray | None:
            return x.numpy() if x is not None and output_type == "np" else x

        return DiffuseRegPipelineOutput(field=finish(field), warped=finish(warped), warped_labels=finish(warped_labels),
                                        trajectory=on_grid.trajectory, uncertainty=finish(uncertainty),
                                        num_steps_run=on_grid.num_steps_run, grid=fixed.grid)

    # ------------------------------------------------------------------ sampling pieces
    def _scheduler_for(self, kind: str | None) -> DDIMScheduler | DDPMScheduler:
        """The pipeline's scheduler, or one of the other kind built from the same config."""
        if kind is None:
            return self.scheduler
        classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
        if kind not in classes:
            raise ValueError(f"scheduler must be None, 'ddim' or 'ddpm', got {kind!r}")
        if isinstance(self.scheduler, classes[kind]):
            return self.scheduler
        return classes[kind].from_config(self.scheduler.config)

    def _field_statistics(self, ndim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-axis mean and std of the training fields, shaped ``(1, ndim, 1, ...)`` for broadcasting."""
        shape = (1, ndim) + (1,) * ndim
        mean = torch.tensor(self.denoiser.config.field_mean, dtype=torch.float32, device=device).reshape(shape)
        std = torch.tensor(self.denoiser.config.field_std, dtype=torch.float32, device=device).reshape(shape)
        return mean, std

    @staticmethod
    def _apply_guidance(field: torch.Tensor, guides: list[Guide], fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """One guidance step on the clean-field estimate ``field`` (N, ndim, *S), voxels.

        ``field <- field - sum_g scale_g * n * dL_g/dfield`` with ``n`` = the number of voxels in
        the batch, so a loss written as a mean over voxels moves each voxel by ``scale`` times the
        derivative of that voxel's own term.
        """
        voxels = field.shape[0] * math.prod(field.shape[2:])
        with torch.enable_grad():
            variable = field.detach().requires_grad_(True)
            total = sum(guide.scale * guide(variable, fixed, moving) for guide in guides)
            (gradient,) = torch.autograd.grad(total, variable)
        return field - voxels * gradient

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        fixed: Any,
        moving: Any,
        num_inference_steps: int = 10,
        scheduler: str | None = None,
        guidance: Sequence[Guide | GuidanceFunction] | None = None,
        callback_on_step_end: Callable | Sequence[Callable] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("x0",),
        moving_labels: Any = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        output_type: str = "pt",
        eta: float = 0.0,
        init_field: Any = None,
        strength: float = 1.0,
        return_dict: bool = True,
    ) -> DiffuseRegPipelineOutput | tuple:
        r"""Register ``moving`` to ``fixed``.

        Args:
            fixed, moving: either images with geometry (file paths, SimpleITK images or
                :class:`~diffusereg.io.Image`), which are preprocessed to the model grid and whose
                outputs come back on the fixed image's own grid; or arrays/tensors already on the
                model grid, intensities in [0, 1]: ``(*S)`` or ``(B, 1, *S)``. A 2D model also
                takes volumes ``(D, H, W)`` / ``(B, 1, D, H, W)`` and registers them slice by slice
                in one batch (zero displacement across slices).
            num_inference_steps: sampling steps (default 10).
            scheduler: None (the pipeline's scheduler), ``"ddim"`` or ``"ddpm"``.
            guidance: guides (see :mod:`diffusereg.guidance`) or plain functions
                ``(field, fixed, moving) -> loss``; each acts in its own range of steps.
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` or a
                list of them, run after every step (see :mod:`diffusereg.callbacks`).
            callback_on_step_end_tensor_inputs: tensors put in ``callback_kwargs``; any of
                ``"field_t"``, ``"x0"``, ``"warped"``. Callbacks with a ``tensor_inputs`` attribute
                add theirs.
            moving_labels: integer label map given like ``moving``, warped with nearest neighbour.
            num_samples: independent samples per pair; the field is their mean, ``uncertainty`` their
                per-voxel standard deviation.
            generator: ``torch.Generator`` for the initial noise and DDPM noise (reproducibility).
            return_trajectory: keep the clean-field estimate and warped image of every step.
            output_type: ``"pt"`` (CPU tensors) or ``"np"`` (NumPy arrays).
            eta: DDIM stochasticity (0 = deterministic).
            init_field: start from this field instead of pure noise, in the layout of the field
                this call returns (voxels), e.g. a one-shot network's field or an earlier result:
                it is noised to the level of the schedule's step ``num_inference_steps * (1 -
                strength)`` and denoised from there. An array needs model-grid inputs; a function
                ``init_field(fixed, moving) -> field`` is called with the model-grid images (the
                preprocessed ones for images with geometry).
            strength: in (0, 1], the fraction of the ``num_inference_steps`` schedule that runs
                from ``init_field``; 1 starts from (almost) pure noise. Only with ``init_field``.
            return_dict: return a :class:`DiffuseRegPipelineOutput` (else a tuple in its field order).

        Raises:
            diffusereg.io.ImageError: an image input cannot be read, is invalid, or does not fit
                this model (the checks of :mod:`diffusereg.validation`), naming the input.
        """
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if strength != 1.0 and init_field is None:
            raise ValueError("strength needs an init_field to start from")
        sources = {"fixed": fixed, "moving": moving, "moving_labels": moving_labels}
        check_sources(sources)  # files: before any voxel is read
        fixed_image = self._as_image(fixed, "fixed")
        if fixed_image is not None:
            moving_image = self._as_image(moving, "moving")
            if moving_image is None:
                raise TypeError("moving must be given like fixed: a path, SimpleITK image or diffusereg.io.Image")
            if init_field is not None and not callable(init_field):
                raise ValueError("an init_field array needs inputs on the model grid (arrays or tensors); for images "
                                 "with geometry give a function init_field(fixed, moving) of the model-grid images")
            labels_image = self._as_image(moving_labels, "moving_labels")
            check_pair(fixed_image, moving_image, self.spatial_dims, self.preprocessing, moving_labels=labels_image,
                       names={role: source_name(source, role) for role, source in sources.items()})
            output = self._register_images(
                fixed_image, moving_image, labels_image, output_type,
                num_inference_steps=num_inference_steps, scheduler=scheduler, guidance=guidance,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, num_samples=num_samples,
                generator=generator, return_trajectory=return_trajectory, eta=eta, init_field=init_field,
                strength=strength,
            )
            return output if return_dict else output.to_tuple()
        callbacks = [] if callback_on_step_end is None else (
            list(callback_on_step_end) if isinstance(callback_on_step_end, (list, tuple)) else [callback_on_step_end])
        recorder = TrajectoryRecorder() if return_trajectory else None
        if recorder is not None:
            callbacks.append(recorder)
        tensor_inputs = list(dict.fromkeys(
            [*callback_on_step_end_tensor_inputs, *(name for cb in callbacks for name in getattr(cb, "tensor_inputs", []))]))
        guides = [as_guide(g) for g in (guidance or [])]

        # 1. inputs to the model grid, checked
        batch = self._to_model_grid(fixed, moving, moving_labels)
        if callable(init_field):
            init_field = init_field(fixed, moving)
        self.check_inputs(batch.fixed, batch.moving, batch.moving_labels, num_inference_steps, num_samples, tensor_inputs)
        device = self._execution_device
        fixed_n = batch.fixed.to(device).repeat_interleave(num_samples, dim=0)
        moving_n = batch.moving.to(device).repeat_interleave(num_samples, dim=0)

        # 2. image features, once per call (in the weights' dtype; the sampling arithmetic stays float32)
        dtype = self.denoiser.dtype
        condition = self.denoiser.encode_condition(fixed_n.to(dtype), moving_n.to(dtype))

        # 3. initial noise
        sampler = self._scheduler_for(scheduler)
        if sampler.config.prediction_type != "epsilon":
            raise ValueError(f"the scheduler must take the noise (prediction_type='epsilon'), got "
                             f"{sampler.config.prediction_type!r}; what the denoiser predicts is its own config's "
                             "prediction_type")
        sampler.set_timesteps(num_inference_steps, device=device)
        timesteps = sampler.timesteps
        ndim = self.spatial_dims
        mean, std = self._field_statistics(ndim, device)
        noise = randn_tensor((fixed_n.shape[0], ndim, *fixed_n.shape[2:]), generator=generator, device=device,
                             dtype=fixed_n.dtype)
        if init_field is None:
            field_t = noise * sampler.init_noise_sigma
        else:  # as diffusers' image-to-image pipelines: run the last `strength` part of the schedule
            start = num_inference_steps - max(1, round(num_inference_steps * strength))  # strength <= 1
            timesteps = timesteps[start:]
            init_z = (self._field_to_model_layout(init_field, batch).to(device) - mean) / std
            field_t = sampler.add_noise(init_z.repeat_interleave(num_samples, dim=0), noise, timesteps[:1])
        clip_range = float(sampler.config.clip_sample_range) if sampler.config.get("clip_sample", False) else None
        prediction_type = self.denoiser.config.get("prediction_type", "epsilon")  # the scheduler always gets the noise
        step_kwargs: dict[str, Any] = {"generator": generator}
        if "eta" in inspect.signature(sampler.step).parameters:
            step_kwargs["eta"] = eta

        # 4. denoising loop
        self._interrupt = False
        x0 = torch.zeros_like(field_t)
        steps_run = 0
        for i, t in enumerate(self.progress_bar(timesteps)):
            alpha_bar = sampler.alphas_cumprod[int(t)].to(device)
            model_input = sampler.scale_model_input(field_t, t)
            prediction = self.denoiser(model_input.to(dtype), t.expand(field_t.shape[0]).to(device),
                                       condition=condition).sample.float()
            x0_z, noise = clean_and_noise(prediction, field_t, alpha_bar, prediction_type)
            if clip_range is not None:  # the scheduler's own x0 clipping, so the reported x0 is the one it uses
                x0_z = x0_z.clamp(-clip_range, clip_range)
            x0 = x0_z * std + mean
            active = [g for g in guides if g.is_active(i, len(timesteps))]
            if active:
                x0 = self._apply_guidance(x0, active, fixed_n, moving_n)
            if active or clip_range is not None:
                _, noise = clean_and_noise((x0 - mean) / std, field_t, alpha_bar, "sample")
            field_t = sampler.step(noise, t, field_t, **step_kwargs).prev_sample
            steps_run = i + 1

            if callbacks:
                available = {"field_t": field_t, "x0": x0}
                if "warped" in tensor_inputs:
                    available["warped"] = warp(moving_n, x0)
                callback_kwargs = {name: available[name] for name in tensor_inputs}
                for callback in callbacks:
                    callback_kwargs = callback(self, i, t, callback_kwargs)
                field_t = callback_kwargs.get("field_t", field_t)
                x0 = callback_kwargs.get("x0", x0)
            if self.interrupt:
                break

        # 5. samples -> field, uncertainty; warp; back to the input layout
        samples = x0.reshape(-1, num_samples, *x0.shape[1:])
        field = samples.mean(dim=1)
        uncertainty = samples.std(dim=1) if num_samples > 1 else None
        warped = warp(batch.moving.to(device), field)
        warped_labels = None
        if batch.moving_labels is not None:
            labels_dtype = torch.as_tensor(moving_labels).dtype if not torch.is_tensor(moving_labels) else moving_labels.dtype
            warped_labels = warp(batch.moving_labels.to(device), field, mode="nearest").round().to(labels_dtype)

        def finish(x: torch.Tensor | None, is_field: bool) -> torch.Tensor | np.ndarray | None:
            if x is None:
                return None
            x = self._from_model_grid(x.detach().cpu(), batch, is_field)
            return x.numpy() if output_type == "np" else x

        trajectory = None
        if recorder is not None:
            trajectory = {"steps": recorder.steps, "fields": torch.stack(recorder.fields),
                          "warped": torch.stack(recorder.warped)}
        output = DiffuseRegPipelineOutput(
            field=finish(field, True),
            warped=finish(warped, False),
            warped_labels=finish(warped_labels, False),
            trajectory=trajectory,
            uncertainty=finish(uncertainty, True),
            num_steps_run=steps_run,
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()
