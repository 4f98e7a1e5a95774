"""One image pair, registered in a background thread that can be watched, stopped and steered.

This is the engine of ``diffusereg watch``, with no web code. A :class:`WatchSession` holds one
case (fixed and moving image, optional label maps) brought to the model grid once.
:meth:`~WatchSession.start` runs :func:`~diffusereg.registration.register_checked` in a thread with
a per-step callback that publishes a :class:`StepState` after every sampling step;
:meth:`~WatchSession.stop` makes the pipeline stop after the current step (the outputs are then
that step's result); :meth:`~WatchSession.steer` replaces the guidance from the next step on
(:class:`LiveGuidance`). The outputs are written into ``folder/outputs`` exactly as
``diffusereg register`` writes them, and :meth:`~WatchSession.download` zips them.

Every method is thread-safe. :meth:`~WatchSession.wait` blocks until something changed and
:meth:`~WatchSession.snapshot` describes the session as JSON-ready data, with PNG pictures of the
viewed slice (:mod:`diffusereg.watch.frames`).
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import threading
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from diffusereg.data import PairFiles
from diffusereg.guidance import Guide, GuidanceSpec, build_guides
from diffusereg.metrics import ACDC_LABELS, njd_percent, structure_dice
from diffusereg.phantom import write_phantom
from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.registration import (CheckedInputs, RegistrationError, RegistrationSettings, check_request, read_inputs,
                                     register_checked)
from diffusereg.spatial import jacobian_determinant, voxel_to_mm, warp, warp_labels
from diffusereg.visualize import shown_slice
from diffusereg.watch.frames import slice_pictures

if TYPE_CHECKING:
    from diffusereg.pipelines import DiffuseRegPipeline

__all__ = ["LiveGuidance", "StepState", "UPLOAD_SUFFIXES", "WatchSession"]

IDLE, RUNNING, STOPPING, FINISHED, STOPPED, FAILED = "idle", "running", "stopping", "finished", "stopped", "failed"
"""The session's ``status``: no registration yet, one running, asked to stop, and how the last one ended."""

UPLOAD_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
"""Image files that can be uploaded: the single-file formats (an ``.mhd`` needs its data file)."""

MAX_SAMPLES = 32
"""Most samples per registration (each one costs the memory and time of a registration)."""

_ACDC_NAMES = {value: name for name, value in ACDC_LABELS.items()}


@dataclass(frozen=True)
class StepState:
    """The registration after ``step`` sampling steps (0: before the first), on the model grid.

    Arrays hold the ``D`` slices of the model grid (``D = 1`` for 2D images); the field is the
    mean over samples of the step's field estimate ``x0``, i.e. the result if sampling stopped now.

    Attributes:
        step: steps done.
        warped: ``(D, H, W)`` the moving image warped by the field, intensities in ``[0, 1]``.
        field: ``(D, 2, H, W)`` in-plane displacement, voxels (rows, columns).
        jacobian: ``(D, H, W)`` Jacobian determinant (central differences; per slice for a 2D
            model).
        sample_spread: ``(D, H, W)`` length of the field's std over samples, mm; None for one sample.
        metrics: ``NJD_percent`` and, with labels, ``dice`` per structure (model grid).
    """

    step: int
    warped: np.ndarray
    field: np.ndarray
    jacobian: np.ndarray
    sample_spread: np.ndarray | None
    metrics: dict[str, Any]


def _as_slices(array: np.ndarray) -> np.ndarray:
    """A map ``(B, *S)`` or ``(B, 1, *S)`` on the model grid (or the array ``S`` itself) as ``(D, H, W)``."""
    return array.reshape(-1, *array.shape[-2:])


@dataclass(frozen=True)
class _ModelCase:
    """A case as files and as checked inputs on the model grid."""

    files: PairFiles
    inputs: CheckedInputs

    @property
    def batch(self) -> ModelGridBatch:
        return self.inputs.batch

    def images(self, kind: str) -> np.ndarray:
        """``fixed``, ``moving`` or ``fixed_labels`` on the model grid as ``(D, H, W)`` slices."""
        if kind == "fixed_labels":
            return _as_slices(self.inputs.model_labels[0])
        return _as_slices(self.batch.to_output(getattr(self.batch, kind), is_field=False).numpy())

    @property
    def labels(self) -> list[int]:
        """Label values (not 0) in both label maps on the model grid; empty without both."""
        if self.inputs.model_labels is None:
            return []
        common = set(np.unique(self.inputs.model_labels[0])) & set(np.unique(self.inputs.model_labels[1]))
        return sorted(int(value) for value in common - {0})

    def measure(self, step: int, x0: torch.Tensor) -> StepState:
        """The :class:`StepState` of the clean-field estimates ``x0`` ``(num_samples, *field)`` of a
        step (voxels, the call's output layout on the model grid)."""
        samples = x0.detach().float().cpu()
        field = samples.mean(dim=0)[None]  # (1, ndim, *S): a volume's field is (3, D, H, W)
        metrics: dict[str, Any] = {"NJD_percent": njd_percent(field)}
        if self.inputs.model_labels is not None:
            fixed_labels, moving_labels = (torch.from_numpy(np.ascontiguousarray(m))[None, None]
                                           for m in self.inputs.model_labels)
            metrics["dice"] = structure_dice(_as_slices(warp_labels(moving_labels, field).numpy()),
                                             _as_slices(fixed_labels.numpy()))
        sample_spread = None
        if samples.shape[0] > 1:
            spacing = self.batch.images.grid.model.axis_spacing[-(field.shape[1]):]
            sample_spread = _as_slices(voxel_to_mm(samples.std(dim=0)[None], spacing).norm(dim=1).numpy())
        moving = self.batch.to_output(self.batch.moving, is_field=False)[None, None]
        in_plane = field[0, 1:].transpose(0, 1) if field.shape[1] == 3 else field
        return StepState(step, _as_slices(warp(moving, field).numpy()), in_plane.numpy(),
                         _as_slices(jacobian_determinant(field, method="central").numpy()), sample_spread, metrics)


class LiveGuidance(Guide):
    """Guides, given as :class:`~diffusereg.registration.GuidanceSpec`, that may be replaced
    while sampling runs: each step uses the specs set before it began.

    Args:
        specs: the guides at the start.
        labels: fixed and moving label maps on the model grid (for ``organ`` specs), or None.

    Attributes:
        history: ``(step, specs)`` for the first step (0-based) of every guidance in effect.
    """

    def __init__(self, specs: Sequence[GuidanceSpec], labels: tuple[np.ndarray, np.ndarray] | None) -> None:
        super().__init__(scale=1.0)
        self._labels = labels
        self._lock = threading.Lock()
        self._specs = tuple(specs)
        self._guides: list[Guide] = []
        self._batch: tuple[ModelGridBatch, int] | None = None
        self.history: list[tuple[int, tuple[GuidanceSpec, ...]]] = []

    def bind(self, batch: ModelGridBatch, num_samples: int) -> LiveGuidance:
        """Remember the call's batch: the guides built from the specs are bound to it."""
        self._batch = (batch, num_samples)
        return self

    def set(self, specs: Sequence[GuidanceSpec]) -> None:
        """Use ``specs`` from the next step on (callable from any thread)."""
        with self._lock:
            self._specs = tuple(specs)

    def is_active(self, step: int, num_steps: int) -> bool:
        with self._lock:
            specs = self._specs
        if not self.history or self.history[-1][1] != specs:
            self.history.append((step, specs))
            self._guides = [guide.bind(*self._batch) for guide in build_guides(specs, self._labels)]
        return bool(self._guides)

    def correct(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        for guide in self._guides:
            field = guide.correct(field, fixed, moving)
        return field

    def correct_output(self, field: torch.Tensor) -> torch.Tensor:
        for guide in self._guides:
            field = guide.correct_output(field)
        return field

    def __str__(self) -> str:
        """E.g. ``live: none from step 1, smoothness=0.05 organ=3:1 from step 4``."""
        return "live: " + ", ".join(f"{' '.join(str(spec) for spec in specs) or 'none'} from step {step + 1}"
                                    for step, specs in self.history)


class WatchSession:
    """One case, registered on request in a background thread (see the module docstring).

    Args:
        pipe: the registration pipeline (on its device).
        folder: the session's working folder (uploads, the phantom, ``outputs/``).
        model_name: how ``metrics.json`` names the model.
        settings: the initial sampling settings; their ``guidance`` is the initial live guidance.
    """

    def __init__(self, pipe: DiffuseRegPipeline, folder: str | os.PathLike, model_name: str = "",
                 settings: RegistrationSettings = RegistrationSettings()) -> None:
        self.pipe = pipe
        self.folder = Path(folder)
        self.output_dir = self.folder / "outputs"
        self.model_name = model_name
        pipe.set_progress_bar_config(disable=True)
        self._settings = replace(settings, guidance=())
        self._guidance = tuple(settings.guidance)
        self._changed = threading.Condition()
        self._version = 0
        self._status = IDLE
        self._message = ""
        self._case: _ModelCase | None = None
        self._before: StepState | None = None
        self._state: StepState | None = None
        self._slice = 0
        self._result: dict[str, Any] | None = None
        self._live: LiveGuidance | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._uploads: dict[int, Path] = {}
        self._pictures: tuple[int, dict[str, str]] | None = None
        self._closed = False

    # ------------------------------------------------------------------ state changes
    def _changed_now(self) -> None:
        """Count a change and wake :meth:`wait` (call with ``self._changed`` held)."""
        self._version += 1
        self._changed.notify_all()

    def _check_idle(self) -> None:
        if self._status in (RUNNING, STOPPING):
            raise RegistrationError("a registration is running: stop it first")

    def load(self, files: PairFiles) -> None:
        """Make ``files`` the case to register: check and read them, bring them to the model grid.

        Organ guidance on labels the new case lacks is dropped.

        Raises:
            RegistrationError: a registration is running, labels not in pairs, or a missing file.
            diffusereg.io.ImageError: a file cannot be read as an image, or the images do not make a
                registration this model can do (:func:`diffusereg.validation.check_pair`).
        """
        with self._changed:
            self._check_idle()
        inputs = read_inputs(self.pipe, check_request(files.fixed, files.moving, self.output_dir, RegistrationSettings(),
                                                      files.fixed_labels, files.moving_labels))
        case = _ModelCase(files, inputs)
        before = case.measure(0, torch.zeros(1, *inputs.batch.to_output(
            torch.zeros(inputs.batch.size, self.pipe.spatial_dims, *inputs.batch.fixed.shape[2:]), is_field=True).shape))
        with self._changed:
            self._check_idle()
            self._case, self._before, self._state, self._result, self._status, self._message = (
                case, before, before, None, IDLE, "")
            self._slice = shown_slice(inputs.batch.images.grid, None if inputs.model_labels is None
                                      else inputs.model_labels[0])
            self._guidance = tuple(s for s in self._guidance if s.kind != "organ" or s.label in case.labels)
            self._changed_now()

    def load_phantom(self) -> None:
        """Load the cardiac phantom of ``diffusereg demo`` (written into ``folder/phantom``)."""
        self.load(write_phantom(self.folder / "phantom"))

    def store_upload(self, name: str, data: bytes) -> int:
        """Keep an uploaded image file (its ``name`` on the user's computer and its bytes); returns
        the number that :meth:`load_uploads` takes."""
        suffix = next((s for s in UPLOAD_SUFFIXES if name.lower().endswith(s)), None)
        if suffix is None:
            raise RegistrationError(f"{name}: upload an image as {', '.join(UPLOAD_SUFFIXES)} (one file)")
        with self._changed:
            number = len(self._uploads) + 1
            path = self.folder / "uploads" / str(number) / re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1])
            self._uploads[number] = path
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        return number

    def load_uploads(self, fixed: int, moving: int, fixed_labels: int | None = None,
                     moving_labels: int | None = None) -> None:
        """:meth:`load` uploaded files, given by the numbers :meth:`store_upload` returned."""
        with self._changed:
            numbers = (fixed, moving, fixed_labels, moving_labels)
            unknown = [n for n in numbers if n is not None and n not in self._uploads]
            if unknown:
                raise RegistrationError(f"no uploaded file number {unknown[0]}")
            paths = [None if n is None else self._uploads[n] for n in numbers]
        self.load(PairFiles(*paths))

    def start(self, steps: int | None = None, seed: int | None = None, samples: int | None = None) -> None:
        """Start registering the case in a background thread; omitted settings keep their values.

        Raises:
            RegistrationError: no case loaded, a registration is running, or a setting out of range.
        """
        with self._changed:
            self._check_idle()
            if self._case is None:
                raise RegistrationError("load a fixed and a moving image first")
            settings = replace(self._settings, **{name: value for name, value in
                                                  (("steps", steps), ("seed", seed), ("samples", samples))
                                                  if value is not None})
            most_steps = int(self.pipe.scheduler.config.num_train_timesteps)
            if not 1 <= settings.steps <= most_steps:
                raise RegistrationError(f"steps must be between 1 and {most_steps}, got {settings.steps}")
            if not 1 <= settings.samples <= MAX_SAMPLES:
                raise RegistrationError(f"samples must be between 1 and {MAX_SAMPLES}, got {settings.samples}")
            self._settings, self._live = settings, LiveGuidance(self._guidance, self._case.inputs.model_labels)
            self._status, self._message, self._result, self._state = RUNNING, "", None, self._before
            self._stop_requested.clear()
            self._thread = threading.Thread(target=self._run, args=(self._case, settings, self._live),
                                            name="diffusereg-watch-registration", daemon=True)
            self._thread.start()
            self._changed_now()

    def _run(self, case: _ModelCase, settings: RegistrationSettings, live: LiveGuidance) -> None:
        """The registration thread: register, write the outputs, record how it ended."""
        try:
            metrics = register_checked(self.pipe, case.inputs, settings, model_name=self.model_name,
                                       callbacks=[self._on_step], guides=[live])
        except (ValueError, OSError) as error:  # bad input or settings: shown on the page
            self._finish(FAILED, " ".join(str(error).split()), None)
        except BaseException as error:  # a bug: shown on the page, and its traceback on the console
            self._finish(FAILED, f"{type(error).__name__}: {error}", None)
            raise
        else:
            self._finish(STOPPED if metrics["steps_run"] < settings.steps else FINISHED, "", metrics)

    def _on_step(self, pipe: DiffuseRegPipeline, step: int, timestep: int,
                 callback_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pipeline's per-step callback: publish the step, stop sampling if asked to."""
        state = self._case.measure(step + 1, callback_kwargs["x0"])
        with self._changed:
            self._state = state
            self._changed_now()
        if self._stop_requested.is_set():
            pipe.interrupt = True
        return callback_kwargs

    def _finish(self, status: str, message: str, result: dict[str, Any] | None) -> None:
        with self._changed:
            self._status, self._message, self._result = status, message, result
            self._changed_now()

    def stop(self) -> None:
        """Stop the running registration after the current step; its outputs are that step's result."""
        with self._changed:
            if self._status == RUNNING:
                self._stop_requested.set()
                self._status = STOPPING
                self._changed_now()

    def steer(self, specs: Sequence[GuidanceSpec]) -> None:
        """Guide with ``specs`` from the next sampling step on, and in later registrations.

        Raises:
            RegistrationError: a negative or non-finite scale, or an ``organ`` label that is not
                in both label maps.
        """
        specs = tuple(specs)
        with self._changed:
            labels = [] if self._case is None else self._case.labels
            for spec in specs:
                if not (math.isfinite(spec.scale) and spec.scale >= 0):
                    raise RegistrationError(f"guidance {spec}: the scale must be a number >= 0")
                if spec.kind == "organ" and spec.label not in labels:
                    raise RegistrationError(f"guidance {spec}: label {spec.label} is not in both label maps")
            self._guidance = specs
            if self._status in (RUNNING, STOPPING):
                self._live.set(specs)
            self._changed_now()

    def view(self, index: int) -> None:
        """Show slice ``index`` (along ``D`` of the model grid) in the pictures."""
        with self._changed:
            slices = 0 if self._case is None else self._case.images("fixed").shape[0]
            if not 0 <= index < slices:
                raise RegistrationError(f"slice {index} is not in 0 .. {slices - 1}")
            self._slice = index
            self._changed_now()

    def close(self) -> None:
        """Stop a running registration, wait for its thread, and release :meth:`wait`."""
        with self._changed:
            self._closed = True
            self._stop_requested.set()
            self._changed_now()
            thread = self._thread
        if thread is not None:
            thread.join()

    # ------------------------------------------------------------------ reading
    @property
    def closed(self) -> bool:
        return self._closed

    def wait(self, after: int, timeout: float) -> int:
        """Block until the version passes ``after`` (or the session closes, or ``timeout`` seconds
        pass); returns the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version > after or self._closed, timeout)
            return self._version

    def snapshot(self) -> dict[str, Any]:
        """The session as JSON-ready data: status, settings, guidance, the current step with its
        metrics and pictures (PNG data URLs) of the viewed slice, and the final metrics.

        Keys: ``version``, ``status``, ``message``, ``model``, ``inputs`` (file names and size, or
        None), ``labels`` (``value``, ``name``), ``settings`` (``steps``, ``seed``, ``samples``),
        ``guidance`` (spec strings), ``step``, ``slice``, ``slices``, ``metrics`` and
        ``metrics_before`` (model grid), ``sample_spread_max_mm``, ``pictures``, ``result`` (what
        ``metrics.json`` holds, once a registration ended) and ``download`` (bool).
        """
        with self._changed:
            version, case, state, index, status = self._version, self._case, self._state, self._slice, self._status
            settings, guidance, result, message, before = (self._settings, self._guidance, self._result,
                                                           self._message, self._before)
            pictures = self._pictures[1] if self._pictures is not None and self._pictures[0] == version else None
        if pictures is None and case is not None:
            pictures = self._draw(case, state, index)
            with self._changed:
                self._pictures = (version, pictures)
        return {
            "version": version, "status": status, "message": message, "model": self.model_name,
            "inputs": None if case is None else _describe_inputs(case),
            "labels": [] if case is None else _named_labels(case.labels),
            "settings": {"steps": settings.steps, "seed": settings.seed, "samples": settings.samples},
            "guidance": [str(spec) for spec in guidance],
            "step": None if state is None else state.step,
            "slice": index, "slices": 0 if case is None else case.images("fixed").shape[0],
            "metrics": None if state is None else state.metrics,
            "metrics_before": None if before is None else before.metrics,
            "sample_spread_max_mm": None if state is None or state.sample_spread is None else _sample_spread_max(state),
            "pictures": pictures or {},
            "result": result,
            "download": result is not None and status not in (RUNNING, STOPPING),
        }

    @staticmethod
    def _draw(case: _ModelCase, state: StepState, index: int) -> dict[str, str]:
        """PNG data URLs of the pictures of slice ``index`` at ``state``."""
        sample_spread = None if state.sample_spread is None else state.sample_spread[index]
        pictures = slice_pictures(
            case.images("fixed")[index], case.images("moving")[index], state.warped[index],
            state.field[index], state.jacobian[index], sample_spread,
            sample_spread_max=1.0 if sample_spread is None else _sample_spread_max(state))
        return {name: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                for name, png in pictures.items()}

    def download(self) -> bytes:
        """A zip of the files the last registration wrote (those ``metrics.json`` lists).

        Raises:
            RegistrationError: no registration has ended since the case was loaded, or one is running.
        """
        with self._changed:
            if self._result is None or self._status in (RUNNING, STOPPING):
                raise RegistrationError("nothing to download yet: register first")
            names = list(self._result["outputs"])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name in names:
                archive.write(self.output_dir / name, arcname=name)
        return buffer.getvalue()


def _sample_spread_max(state: StepState) -> float:
    """The brightest value (mm) of the spread pictures of a step: its largest value, at least 1e-3."""
    return max(float(state.sample_spread.max()), 1e-3)


def _named_labels(values: list[int]) -> list[dict[str, Any]]:
    """``value`` and display ``name`` of each label: ACDC names when all values are ACDC's."""
    acdc = set(values) <= set(_ACDC_NAMES)
    return [{"value": value, "name": _ACDC_NAMES[value] if acdc else f"label {value}"} for value in values]


def _describe_inputs(case: _ModelCase) -> dict[str, Any]:
    """File names of the case and the model grid it is registered on."""
    files, model = case.files, case.batch.images.grid.model
    return {
        "fixed": files.fixed.name, "moving": files.moving.name,
        "fixed_labels": None if files.fixed_labels is None else files.fixed_labels.name,
        "moving_labels": None if files.moving_labels is None else files.moving_labels.name,
        "model_grid": " x ".join(str(n) for n in model.shape) + " voxels of "
                      + " x ".join(f"{s:g}" for s in model.axis_spacing) + " mm",
    }
