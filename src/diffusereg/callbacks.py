"""Per-step hooks for :class:`~diffusereg.pipelines.DiffuseRegPipeline`.

The contract is diffusers' ``callback_on_step_end``: after every sampling step the pipeline calls
``callback(pipe, step, timestep, callback_kwargs)`` and uses the dict it returns. The tensors a
callback can read, in the layout of the call's output on the model grid (see
:mod:`diffusereg.pipelines.layout`), with a leading axis for the ``num_samples`` samples:

- ``"x0"``: the current estimate of the clean field ``(num_samples, *field)``, voxels of the model
  grid (``field`` is ``(ndim, *S)`` for one pair, ``(3, D, H, W)`` for a volume registered slice
  by slice, ``(B, ndim, *S)`` for a batch): the result if sampling stopped now;
- ``"warped"``: the moving image warped by ``x0``, ``(num_samples, *image)``.

Returning a replaced ``"x0"`` changes the result if the loop ends at that step. Setting
``pipe.interrupt = True`` stops sampling after the current step; the output is then the ``x0``
of that step.

A callback object may declare the tensors it reads in a ``tensor_inputs`` list (as diffusers'
``PipelineCallback`` does); the pipeline adds them to ``callback_on_step_end_tensor_inputs``.
A list of callbacks runs in order, each seeing the tensors returned by the one before.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StepCallback", "EarlyStopping", "TrajectoryRecorder"]


class StepCallback:
    """Base class of the built-in per-step hooks.

    Subclasses set ``tensor_inputs`` and implement :meth:`on_step`. :meth:`reset` runs at step 0
    so one callback object can serve many pipeline calls.
    """

    tensor_inputs: list[str] = []

    def reset(self) -> None:
        """Forget the state of a previous pipeline call."""

    def on_step(self, pipe: Any, step: int, timestep: int, callback_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, pipe: Any, step: int, timestep: int, callback_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if step == 0:
            self.reset()
        return self.on_step(pipe, step, timestep, callback_kwargs)


class EarlyStopping(StepCallback):
    """Stop sampling once the field estimate ``x0`` has settled.

    After each step, the change of ``x0`` since the previous step is measured as the mean
    absolute difference over all voxels and channels (voxels). Sampling stops when that change
    stays below ``tolerance`` for ``patience`` consecutive steps, and never before
    ``min_steps`` steps have run.

    Attributes set during a call: ``changes`` (one float per step from step 1 on) and
    ``stopped_at`` (the step index at which it stopped, or None).
    """

    tensor_inputs = ["x0"]

    def __init__(self, tolerance: float = 0.05, patience: int = 2, min_steps: int = 1) -> None:
        if tolerance <= 0 or patience < 1 or min_steps < 1:
            raise ValueError(f"EarlyStopping needs tolerance > 0, patience >= 1, min_steps >= 1; got {tolerance}, {patience}, {min_steps}")
        self.tolerance = tolerance
        self.patience = patience
        self.min_steps = min_steps
        self.reset()

    def reset(self) -> None:
        self._previous: torch.Tensor | None = None
        self._calm_steps = 0
        self.changes: list[float] = []
        self.stopped_at: int | None = None

    def on_step(self, pipe: Any, step: int, timestep: int, callback_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = callback_kwargs["x0"].detach()
        if self._previous is not None:
            change = (x0 - self._previous).abs().mean().item()
            self.changes.append(change)
            self._calm_steps = self._calm_steps + 1 if change < self.tolerance else 0
            if self._calm_steps >= self.patience and step + 1 >= self.min_steps:
                self.stopped_at = step
                pipe.interrupt = True
        self._previous = x0.clone()
        return callback_kwargs


class TrajectoryRecorder(StepCallback):
    """Keep a copy (on the CPU) of the clean-field estimate and the warped image every ``every`` steps.

    After a call, ``steps`` lists the recorded step indices, ``fields`` the ``x0`` tensors
    ``(num_samples, *field)`` (voxels, model grid) and ``warped`` the warped moving images
    ``(num_samples, *image)``, in the call's output layout (see the module docstring).
    """

    tensor_inputs = ["x0", "warped"]

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"TrajectoryRecorder every must be >= 1, got {every}")
        self.every = every
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.fields: list[torch.Tensor] = []
        self.warped: list[torch.Tensor] = []

    def on_step(self, pipe: Any, step: int, timestep: int, callback_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if step % self.every == 0:
            self.steps.append(step)
            self.fields.append(callback_kwargs["x0"].detach().cpu().clone())
            self.warped.append(callback_kwargs["warped"].detach().cpu().clone())
        return callback_kwargs

