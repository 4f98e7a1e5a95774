"""DiffuseRegPipeline: register two images by denoising a deformation field."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffusereg import DEFAULT_STEPS
from diffusereg.data.preprocessing import PaperPreprocessing
from diffusereg.guidance import Guide, GuidanceFunction, as_guide
from diffusereg.hub import WeightsError, check_weights, resolve_model
from diffusereg.io import Grid, write_atomically
from diffusereg.models import DiffuseRegDenoiser, RegistrationNet
from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.schedulers import FieldNormalizer, clean_and_noise, denoise, increment_fraction, prediction_target
from diffusereg.spatial import warp, warp_labels

__all__ = ["DiffuseRegPipeline", "DiffuseRegPipelineOutput"]

INIT_FIELDS = ("teacher",)
"""Named initial fields: ``init_field="teacher"`` starts from the pipeline's one-shot teacher."""


@dataclass
class DiffuseRegPipelineOutput(BaseOutput):
    """What a registration returns.

    Args:
        field: displacement ``(ndim, *S)`` (or ``(B, ndim, *S)`` for batched inputs; ``(3, D, H, W)``
            for a volume registered slice by slice), voxels of the fixed image's grid, channel
            ``i`` along array axis ``i``. With ``num_samples > 1`` it is the mean over samples.
        warped: the moving image warped by ``field``, shaped like the fixed image input.
        warped_labels: the moving labels warped by ``field`` (nearest neighbour, their dtype), or None.
        sample_spread: per-axis standard deviation of the field over samples (same shape as
            ``field``, voxels) when ``num_samples > 1``, else None. Not an uncertainty estimate: it does
            not point at where the registration is wrong (docs, "Registration pipeline").
        num_steps_run: how many sampling steps ran (fewer than asked when a callback stopped).
        grid: for inputs with geometry, the fixed image's grid (spacing, origin, direction) on which
            ``field``, ``warped``, ``warped_labels`` and ``sample_spread`` lie; None for array inputs.
    """

    field: torch.Tensor | np.ndarray
    warped: torch.Tensor | np.ndarray
    warped_labels: torch.Tensor | np.ndarray | None
    sample_spread: torch.Tensor | np.ndarray | None
    num_steps_run: int
    grid: Grid | None = None


class DiffuseRegPipeline(DiffusionPipeline):
    r"""Deformable registration by DDPM/DDIM denoising of the deformation field (DiffuseReg).

    Components:
        denoiser: a :class:`~diffusereg.models.DiffuseRegDenoiser` (or a model with the same
            ``encode_condition`` / ``forward`` interface and ``field_mean``/``field_std`` in its config).
        scheduler: a diffusers ``DDIMScheduler`` or ``DDPMScheduler`` whose ``prediction_type`` is
            the denoiser's (:func:`~diffusereg.schedulers.default_scheduler`); swap it for another
            kind with ``pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)``.
        teacher: optional one-shot :class:`~diffusereg.models.RegistrationNet` (the network the
            denoiser learnt from, a baseline, and a starting point: ``init_field="teacher"``).
        model_spacing: voxel size of the model grid, mm, ITK ``(x, y, z)`` order; image and file
            inputs are resampled to it (paper: 1.5 x 1.5 x 3.15).
        model_size: model grid shape ``(D, H, W)`` (paper: 32 x 128 x 128); 2D images use ``(H, W)``.

    Example:
        ```py
        >>> import torch
        >>> from diffusereg import DiffuseRegPipeline, SmoothnessGuidance, EarlyStopping
        >>> pipe = DiffuseRegPipeline.from_pretrained("diffusereg/acdc-2d")
        >>> out = pipe("fixed.nii.gz", "moving.nii.gz", num_inference_steps=5,
        ...            guidance=[SmoothnessGuidance()], callback_on_step_end=EarlyStopping(),
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.field.shape  # (3, D, H, W), voxels of the fixed image
        ```
    """

    model_cpu_offload_seq = "denoiser"
    _optional_components = ["teacher"]
    _callback_tensor_inputs = ["x0", "warped"]

    def __init__(self, denoiser: DiffuseRegDenoiser, scheduler: DDIMScheduler | DDPMScheduler,
                 teacher: RegistrationNet | None = None,
                 model_spacing: tuple[float, ...] | list[float] = (1.5, 1.5, 3.15),
                 model_size: tuple[int, ...] | list[int] = (32, 128, 128)) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, teacher=teacher)
        self.register_to_config(model_spacing=list(model_spacing), model_size=list(model_size))
        self._interrupt = False

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

    @property
    def preprocessing(self) -> PaperPreprocessing:
        """The preprocessing that brings image/file inputs onto this model's grid."""
        return PaperPreprocessing(spacing=tuple(self.config.model_spacing), size=tuple(self.config.model_size))

    @property
    def normalizer(self) -> FieldNormalizer:
        """The z-scoring of fields the denoiser works in (its config's ``field_mean``/``field_std``)."""
        return FieldNormalizer.from_config(self.denoiser.config)

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, allow_pickle: bool = False,
                        **kwargs: Any) -> DiffuseRegPipeline:
        """Load a bundled model by its short name (e.g. ``"diffusereg/acdc-2d"``, offline), a local
        directory or a Hugging Face Hub repo id.

        A local folder's weights are checked first (:func:`~diffusereg.hub.check_weights`):
        complete safetensors files holding the tensors its config builds. Weights stored in half
        precision are loaded into the float32 model (upcast) unless a ``dtype`` is given.

        Args:
            pretrained_model_name_or_path: bundled name, folder or Hub id.
            allow_pickle: also load pickle weights (``.bin``, where a component has no
                safetensors file). Pickle files can run code when loaded: only for weights from a
                source you trust. Default False: they are refused.
            **kwargs: passed to ``DiffusionPipeline.from_pretrained``.

        Raises:
            diffusereg.hub.WeightsError: pickle weights without ``allow_pickle``; corrupt,
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

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: str | None = None,
                        training: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Save components (safetensors) and a model card ``README.md`` (when ``model_card`` is None,
        a minimal one describing the configuration and ``training``: how the model was trained,
        ``data`` (text), ``steps`` and the final validation metrics ``val_*``)."""
        kwargs["safe_serialization"] = True
        super().save_pretrained(save_directory, **kwargs)
        card = model_card if model_card is not None else self._configuration_card(training)
        write_atomically(Path(save_directory) / "README.md", lambda temporary: temporary.write_text(card))

    def _configuration_card(self, training: dict[str, Any] | None) -> str:
        config = dict(self.denoiser.config)
        if training is None:
            record = ["Training data and metrics: not recorded for this model.", ""]
        else:
            scores = {name: value for name, value in training.items() if name.startswith("val_")}
            record = [f"Training data: {training['data']}; {training['steps']} optimizer steps.", "",
                      "Final validation metrics: " + (", ".join(f"{name} {value:.4g}" for name, value in scores.items())
                                                      if scores else "none (no validation set)") + ".", ""]
        return "\n".join([
            "# DiffuseReg registration pipeline", "",
            "Deformable registration by denoising diffusion of the deformation field (diffusereg).", "",
            f"- denoiser: `{type(self.denoiser).__name__}`, spatial_dims={config.get('spatial_dims')}, "
            f"prediction_type={config.get('prediction_type')}",
            f"- scheduler: `{type(self.scheduler).__name__}`, {self.scheduler.config.num_train_timesteps} training steps",
            f"- teacher: `{type(self.teacher).__name__}`" if self.teacher is not None else "- teacher: none",
            f"- field normalisation: mean={config.get('field_mean')}, std={config.get('field_std')} (voxels)", "",
            *record,
            "Intended use: research on image registration; not for clinical decisions.", ""])

    # ------------------------------------------------------------------ the steps of a call
    def prepare_batch(self, fixed: Any, moving: Any, moving_labels: Any = None) -> ModelGridBatch:
        """The inputs of a call on the model grid, every check of them run once
        (:meth:`~diffusereg.pipelines.layout.ModelGridBatch.from_inputs`)."""
        return ModelGridBatch.from_inputs(fixed, moving, moving_labels, self.preprocessing, self.spatial_dims,
                                          self.denoiser.size_multiple)

    def check_inputs(self, num_inference_steps: int, num_samples: int, init_field: Any, strength: float,
                     output_type: str, tensor_inputs: Sequence[str]) -> None:
        """Raise a ValueError naming the problem if the call cannot run as asked."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if strength != 1.0 and init_field is None:
            raise ValueError("strength needs an init_field to start from")
        if isinstance(init_field, str) and (init_field not in INIT_FIELDS or self.teacher is None):
            raise ValueError(f"init_field={init_field!r}: give a field, or 'teacher' for a pipeline with a teacher "
                             f"(this one has {'one' if self.teacher is not None else 'none'})")
        if self.denoiser.config.get("proposal") == "teacher" and self.teacher is None:
            raise ValueError("this denoiser adds its residual to the teacher's velocity, but the pipeline has no "
                             "teacher component")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback tensor inputs {unknown} unknown; choose from {self._callback_tensor_inputs}")

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The schedule's timesteps, of which the last ``round(num_inference_steps * strength)`` run
        (all of them from pure noise; as diffusers' image-to-image pipelines from a given start)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        return self.scheduler.timesteps[num_inference_steps - max(1, round(num_inference_steps * strength)):]

    def teacher_field(self, batch: ModelGridBatch) -> torch.Tensor:
        """The teacher's one-shot field of every item, ``(N, ndim, *S)`` voxels on the model grid."""
        parameter = next(self.teacher.parameters())
        return self.teacher(batch.fixed.to(parameter), batch.moving.to(parameter)).float()

    def prepare_initial_field(self, batch: ModelGridBatch, init_field: Any, first_timestep: torch.Tensor,
                              num_samples: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where sampling starts: the z-scored noisy field ``(N * num_samples, ndim, *S)`` and the
        estimate of the clean field (voxels, same shape). From pure noise the estimate is zero;
        from ``init_field`` (a field in the output layout, voxels, or ``"teacher"``) it is that
        field, noised to ``first_timestep`` with the scheduler's ``add_noise``."""
        device = self._execution_device
        shape = (batch.size * num_samples, self.spatial_dims, *batch.fixed.shape[2:])
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if init_field is None:
            return noise * self.scheduler.init_noise_sigma, torch.zeros_like(noise)
        start = self.teacher_field(batch) if isinstance(init_field, str) else batch.field_from_output(init_field, "init_field")
        start = batch.repeated(start.to(device), num_samples)
        return self.scheduler.add_noise(self.normalizer.normalize(start), noise, first_timestep[None]), start

    @property
    def proposal(self) -> RegistrationNet | None:
        """The network whose velocity an increment denoiser's residual is added to: the teacher,
        for a denoiser whose config says ``proposal: teacher``; else None."""
        return self.teacher if self.denoiser.config.get("proposal") == "teacher" else None

    @staticmethod
    def apply_guidance(field: torch.Tensor, guides: list[Guide], fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The clean-field estimate ``field`` (N, ndim, *S), voxels, corrected by each guide in
        turn (:meth:`~diffusereg.guidance.Guide.correct`: one gradient step, or for
        :class:`~diffusereg.guidance.FoldGuidance` as many as it takes to remove the folds)."""
        for guide in guides:
            field = guide.correct(field.detach(), fixed, moving)
        return field

    def run_callbacks(self, callbacks: list[Callable], tensor_inputs: Sequence[str], step: int, timestep: torch.Tensor,
                      x0: torch.Tensor, moving: torch.Tensor, batch: ModelGridBatch, num_samples: int) -> torch.Tensor:
        """Hand the callbacks the step's tensors in the output layout (``x0``: ``(num_samples,
        *field)`` voxels of the model grid; ``warped``: ``(num_samples, *image)``); return the clean
        field estimate, replaced if a callback returned a new ``x0``."""
        available = {"x0": lambda: batch.samples_to_output(x0, True, num_samples),
                     "warped": lambda: batch.samples_to_output(warp(moving, x0), False, num_samples)}
        callback_kwargs = {name: available[name]() for name in tensor_inputs}
        for callback in callbacks:
            callback_kwargs = callback(self, step, timestep, callback_kwargs)
        return batch.samples_from_output(callback_kwargs["x0"]).to(x0) if "x0" in callback_kwargs else x0

    def outputs(self, batch: ModelGridBatch, x0: torch.Tensor, num_samples: int, steps_run: int,
                output_type: str, final_guides: Sequence[Guide]) -> DiffuseRegPipelineOutput:
        """Mean and std over samples, warped moving image and labels, all in the caller's layout:
        the model grid for arrays, the fixed image's own grid for inputs with geometry. The guides
        active at the last step correct the returned field on that grid (``Guide.correct_output``)."""
        mean, std = (None if x is None else x.detach().cpu() for x in batch.mean_std(x0, num_samples))
        sample_spread = None if std is None else batch.to_output(std, True)
        if batch.images is None:
            for guide in final_guides:
                mean = guide.correct_output(mean)
            field = batch.to_output(mean, True)
            warped = batch.to_output(warp(batch.moving, mean), is_field=False)
            warped_labels = None if batch.moving_labels is None else batch.to_output(
                warp_labels(batch.moving_labels, mean), is_field=False).to(batch.labels_dtype)
            grid = None
        else:
            field = self.correct_on_fixed_grid(torch.from_numpy(batch.field_on_fixed_grid(batch.to_output(mean, True))),
                                               final_guides, batch.layout == "slices")
            sample_spread = None if sample_spread is None else torch.from_numpy(batch.field_on_fixed_grid(sample_spread))
            _, warped_array, labels_array = batch.warp_on_fixed_grid(field.numpy())
            warped = torch.from_numpy(warped_array)
            warped_labels = None if labels_array is None else torch.from_numpy(labels_array)
            grid = batch.images.fixed.grid
        tensors = {"field": field, "warped": warped, "warped_labels": warped_labels, "sample_spread": sample_spread}
        if output_type == "np":
            tensors = {name: None if x is None else x.numpy() for name, x in tensors.items()}
        return DiffuseRegPipelineOutput(**tensors, num_steps_run=steps_run, grid=grid)

    @staticmethod
    def correct_on_fixed_grid(field: torch.Tensor, guides: Sequence[Guide], slice_by_slice: bool) -> torch.Tensor:
        """``field`` ``(ndim, *S)`` on the fixed image's grid (voxels) after each guide's
        ``correct_output``, which sees it as a batch: its slices ``(D, 2, H, W)`` for a volume
        registered slice by slice (the across-slice channel stays zero), else ``(1, ndim, *S)``."""
        if not guides:
            return field
        x = field[1:].movedim(1, 0) if slice_by_slice else field[None]
        for guide in guides:
            x = guide.correct_output(x)
        return torch.cat([field[:1], x.movedim(0, 1)]) if slice_by_slice else x[0]

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        fixed: Any,
        moving: Any = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance: Sequence[Guide | GuidanceFunction] | None = None,
        callback_on_step_end: Callable | Sequence[Callable] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("x0",),
        moving_labels: Any = None,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        init_field: Any = None,
        strength: float = 1.0,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> DiffuseRegPipelineOutput | tuple:
        r"""Register ``moving`` to ``fixed``.

        Args:
            fixed, moving: images with geometry (file paths, SimpleITK images or
                :class:`~diffusereg.io.Image`), which are preprocessed to the model grid and whose
                outputs come back on the fixed image's own grid; or arrays/tensors already on the
                model grid, intensities in [0, 1]: ``(*S)`` or ``(B, 1, *S)``; a 2D model also
                takes volumes ``(D, H, W)`` / ``(B, 1, D, H, W)`` and registers them slice by
                slice in one batch (zero displacement across slices). Or ``fixed`` is a
                :class:`~diffusereg.pipelines.layout.ModelGridBatch` from :meth:`prepare_batch`
                (checked already) and ``moving`` and ``moving_labels`` are None.
            num_inference_steps: sampling steps (of a denoiser with ``increment_passes``, each
                applies its share of them, :func:`~diffusereg.schedulers.increment_fraction`).
            guidance: guides (see :mod:`diffusereg.guidance`) or plain functions
                ``(field, fixed, moving) -> loss``; each acts in its own range of steps.
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` or a
                list of them, run after every step (see :mod:`diffusereg.callbacks`).
            callback_on_step_end_tensor_inputs: tensors put in ``callback_kwargs``: ``"x0"`` (the
                step's field estimate, what the call returns if it stops there: with partial
                steps, after the step's share of its increment; ``(num_samples, *field)`` in the
                layout of ``field`` below, voxels of the model grid) and ``"warped"`` (the moving image warped by it,
                ``(num_samples, *image)``). Callbacks with a ``tensor_inputs`` attribute add theirs.
            moving_labels: integer label map given like ``moving``, warped with nearest neighbour.
            num_samples: independent samples per pair; the field is their mean, ``sample_spread`` their
                per-voxel standard deviation.
            generator: ``torch.Generator`` for the initial noise and DDPM noise (reproducibility).
            init_field: start from this field instead of pure noise: a field in the output layout
                on the model grid (voxels), e.g. an earlier result, or ``"teacher"`` for the
                pipeline's one-shot teacher. It is noised to the level of the schedule's step
                ``num_inference_steps * (1 - strength)`` and denoised from there.
            strength: in (0, 1], the fraction of the ``num_inference_steps`` schedule that runs
                from ``init_field``; 1 starts from (almost) pure noise.
            output_type: ``"pt"`` (CPU tensors) or ``"np"`` (NumPy arrays).
            return_dict: return a :class:`DiffuseRegPipelineOutput` (else a tuple in its field order).

        Raises:
            diffusereg.io.ImageError: an image input cannot be read, is invalid, or does not fit
                this model (the checks of :mod:`diffusereg.validation`), naming the input.
        """
        callbacks = [] if callback_on_step_end is None else (
            list(callback_on_step_end) if isinstance(callback_on_step_end, (list, tuple)) else [callback_on_step_end])
        tensor_inputs = list(dict.fromkeys([*callback_on_step_end_tensor_inputs,
                                            *(name for cb in callbacks for name in getattr(cb, "tensor_inputs", []))]))
        # 1. check the inputs (once) and bring them to the model grid
        self.check_inputs(num_inference_steps, num_samples, init_field, strength, output_type, tensor_inputs)
        batch = fixed if isinstance(fixed, ModelGridBatch) else self.prepare_batch(fixed, moving, moving_labels)
        guides = [as_guide(guide).bind(batch, num_samples) for guide in guidance or ()]
        device, normalizer = self._execution_device, self.normalizer
        fixed_n, moving_n = (batch.repeated(x.to(device), num_samples) for x in (batch.fixed, batch.moving))
        # 2. encode the condition: image features, once per call (in the weights' dtype)
        condition = self.denoiser.encode_condition(fixed_n.to(self.denoiser.dtype), moving_n.to(self.denoiser.dtype))
        # 3. timesteps
        timesteps = self.get_timesteps(num_inference_steps, strength)
        fraction = increment_fraction(self.denoiser.config, num_inference_steps)
        # 4. initial field (and estimate of the clean field)
        field_t, x0 = self.prepare_initial_field(batch, init_field, timesteps[0], num_samples, generator)
        # 5. denoising loop: denoiser, guidance, scheduler step, callbacks
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            alpha_bar = self.scheduler.alphas_cumprod[int(t)].to(device)
            denoised = denoise(self.denoiser, self.denoiser.config, field_t, t, alpha_bar, normalizer, estimate=x0,
                               condition=condition, moving=moving_n, proposal=self.proposal, fraction=fraction)
            x0_z, noise = denoised.clean, denoised.noise
            x0 = normalizer.denormalize(x0_z)
            active = [guide for guide in guides if guide.is_active(i, len(timesteps))]
            if active:
                x0 = self.apply_guidance(x0, active, fixed_n, moving_n)
                x0_z, noise = clean_and_noise(normalizer.normalize(x0), field_t, alpha_bar, "sample")
            model_output = prediction_target(x0_z, noise, alpha_bar, self.scheduler.config.prediction_type)
            field_t = self.scheduler.step(model_output, t, field_t, generator=generator).prev_sample
            if callbacks:
                x0 = self.run_callbacks(callbacks, tensor_inputs, i, t, x0, moving_n, batch, num_samples)
            if self.interrupt:
                break
        # 6. outputs
        output = self.outputs(batch, x0, num_samples, i + 1, output_type, active)
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()
