"""Register image files into a folder (``diffusereg register``); apply a saved field (``diffusereg apply``).

A registration checks the request (:func:`check_request`), reads and checks the inputs once
(:func:`read_inputs`), hands the pipeline one :class:`~diffusereg.pipelines.layout.ModelGridBatch`
and writes the files of :mod:`diffusereg.outputs` (``metrics.json`` last, which makes lists of
pairs resumable). :func:`apply_field` warps another image as the registration warped its own.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from diffusereg import DEFAULT_STEPS, __version__
from diffusereg.callbacks import TrajectoryRecorder
from diffusereg.data import read_pair_list, resample_to_grid
from diffusereg.guidance import Guide, GuidanceSpec, build_guides
from diffusereg.io import (IMAGE_SUFFIXES, Image, displacement_transform, read_displacement_transform, transform_grid,
                           write_image)
from diffusereg.outputs import OUTPUT_NAMES, is_complete, output_lock, registration_metrics, write_registration
from diffusereg.pipelines.layout import ModelGridBatch, as_image
from diffusereg.schedulers import scheduler_of_kind
from diffusereg.validation import (RegistrationError, check_field_target, check_output_folder, check_pair, check_sources,
                                   source_name)
from diffusereg.visualize import trajectory_picture

if TYPE_CHECKING:
    from accelerate import PartialState

    from diffusereg.pipelines import DiffuseRegPipeline

__all__ = ["APPLIED_NAMES", "CheckedInputs", "NotMoreAlikeWarning", "RegistrationRequest", "RegistrationSettings",
           "apply_field",
           "check_pair_list", "check_request", "read_inputs", "register_checked", "register_pair", "register_pair_list"]

APPLIED_NAMES: dict[bool, str] = {False: OUTPUT_NAMES["warped"], True: OUTPUT_NAMES["warped_labels"]}
"""File name :func:`apply_field` writes into an output folder, for an image (False) and a label map (True)."""

Source = Image | str | os.PathLike


class NotMoreAlikeWarning(UserWarning):
    """A registration did not make the images more alike (``NCC_after <= NCC_before`` in
    ``metrics.json``): its result should not be trusted without a look."""


@dataclass(frozen=True)
class RegistrationSettings:
    """How to sample: steps, scheduler (``"ddim"``/``"ddpm"``), guides, samples per pair (their
    mean is the field, their std the sample spread), the seed of the initial noise, whether to
    draw the trajectory, and ``start_from_teacher``: None to start from noise, or a strength in
    (0, 1] to start from the pipeline's one-shot teacher and run that fraction of the steps."""

    steps: int = DEFAULT_STEPS
    scheduler: str = "ddim"
    guidance: tuple[GuidanceSpec, ...] = ()
    samples: int = 1
    seed: int = 0
    save_trajectory: bool = False
    start_from_teacher: float | None = None


@dataclass(frozen=True, eq=False)
class RegistrationRequest:
    """What a registration reads (``sources`` by role: ``fixed``, ``moving``, ``fixed_labels``,
    ``moving_labels``), where it writes and how it samples, checked by :func:`check_request`."""

    sources: dict[str, Source | None]
    output_dir: Path
    settings: RegistrationSettings


@dataclass(frozen=True, eq=False)
class CheckedInputs:
    """One registration's inputs, read and checked once (:func:`read_inputs`): the pair on the
    model grid (``batch``, with the originals), the fixed label map as given, both label maps on
    the model grid in the batch's image layout (for ``organ`` guidance and the pictures; None
    without fixed labels), how ``metrics.json`` names each input, and the request."""

    batch: ModelGridBatch
    fixed_labels: Image | None
    model_labels: tuple[np.ndarray, np.ndarray] | None
    described: dict[str, str | None]
    request: RegistrationRequest


def check_request(fixed: Source, moving: Source, output_dir: str | os.PathLike, settings: RegistrationSettings,
                  fixed_labels: Source | None = None, moving_labels: Source | None = None) -> RegistrationRequest:
    """Check what can be checked before loading a model or reading a voxel: fixed labels come with
    moving labels (moving labels alone are warped, without Dice), ``organ=`` guides have both,
    the input files exist with readable headers and fit in memory
    (:func:`~diffusereg.validation.check_sources`), and the outputs can be written without
    overwriting an input (:func:`~diffusereg.validation.check_output_folder`).

    Raises:
        RegistrationError, diffusereg.io.ImageError: naming the problem, one line.
    """
    if fixed_labels is not None and moving_labels is None:
        raise RegistrationError("labels: --fixed-labels needs --moving-labels (the moving labels are what is warped; "
                                "Dice compares them with the fixed labels)")
    organ = next((spec for spec in settings.guidance if spec.kind == "organ"), None)
    if organ is not None and fixed_labels is None:
        raise RegistrationError(f"guidance {organ}: needs --fixed-labels and --moving-labels")
    sources = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels}
    check_sources(sources)
    check_output_folder(output_dir, sources.values(), OUTPUT_NAMES.values())
    return RegistrationRequest(sources, Path(output_dir), settings)


def read_inputs(pipe: DiffuseRegPipeline, request: RegistrationRequest) -> CheckedInputs:
    """Read every input of a checked request once, run :func:`~diffusereg.validation.check_pair`
    once, and bring the pair to the model grid once."""
    if request.settings.start_from_teacher is not None and pipe.teacher is None:
        raise RegistrationError("start from the teacher: this model has no one-shot teacher component")
    sources = request.sources
    images = {role: as_image(source, role) for role, source in sources.items()}
    check_pair(images["fixed"], images["moving"], pipe.spatial_dims, pipe.preprocessing,
               fixed_labels=images["fixed_labels"], moving_labels=images["moving_labels"],
               names={role: source_name(source, role) for role, source in sources.items()})
    batch = ModelGridBatch.from_images(images["fixed"], images["moving"], images["moving_labels"], pipe.preprocessing,
                                       pipe.spatial_dims, pipe.denoiser.size_multiple)
    model_labels = None
    if images["fixed_labels"] is not None:
        model_labels = (pipe.preprocessing.to_model_grid(images["fixed_labels"], batch.images.grid, "labels"),
                        batch.to_output(batch.moving_labels, is_field=False).numpy())
    return CheckedInputs(batch, images["fixed_labels"], model_labels,
                         {role: _describe(source) for role, source in sources.items()}, request)


def _describe(source: Source | None) -> str | None:
    """How metrics.json names an input: its path, or ``<in memory>``."""
    return None if source is None else "<in memory>" if isinstance(source, Image) else str(source)


def register_pair(pipe: DiffuseRegPipeline, fixed: Source, moving: Source, output_dir: str | os.PathLike,
                  settings: RegistrationSettings = RegistrationSettings(), fixed_labels: Source | None = None,
                  moving_labels: Source | None = None, model_name: str = "", callbacks: Sequence[Callable] = (),
                  guides: Sequence[Guide] = ()) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the outputs of :mod:`diffusereg.outputs`:
    :func:`read_inputs`, then :func:`register_checked`.

    Args:
        pipe: the registration pipeline (on its device); its scheduler is set to ``settings.scheduler``.
        fixed, moving: image files (NIfTI, MHA/MHD, NRRD, pictures, DICOM series folders; see
            :func:`~diffusereg.io.read_image`) or :class:`~diffusereg.io.Image`;
            2D or 3D, any size, spacing and orientation.
        output_dir: the folder for the outputs (created if needed).
        settings: sampling settings.
        fixed_labels, moving_labels: integer label maps on the fixed / moving image's geometry.
            Moving labels are warped onto the fixed grid (``warped_labels.nii.gz``); with fixed
            labels too, ``metrics.json`` gets Dice before and after registration (per ACDC
            structure for labels 0..3), and ``organ=`` guides can be used.
        model_name: how ``metrics.json`` names the model.
        callbacks: per-step hooks given to the pipeline (see :mod:`diffusereg.callbacks`); a
            stopped registration writes the field of the step it stopped at.
        guides: guide objects used besides ``settings.guidance`` (e.g. ones whose settings change
            while sampling runs); ``metrics.json`` lists them by ``str(guide)``.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        RegistrationError, diffusereg.io.ImageError: see :func:`read_inputs`; an ``organ=`` label
            absent from a label map.
    """
    request = check_request(fixed, moving, output_dir, settings, fixed_labels, moving_labels)
    return register_checked(pipe, read_inputs(pipe, request), settings, model_name, callbacks, guides)


def register_checked(pipe: DiffuseRegPipeline, inputs: CheckedInputs,
                     settings: RegistrationSettings = RegistrationSettings(), model_name: str = "",
                     callbacks: Sequence[Callable] = (), guides: Sequence[Guide] = ()) -> dict[str, Any]:
    """Register inputs :func:`read_inputs` checked, with ``settings``, into the request's output
    folder (see :func:`register_pair`).

    Once sampling is done, the outputs of an earlier registration in ``output_dir`` are removed,
    ``metrics.json`` first, and the new ones written, ``metrics.json`` last; a failed or
    interrupted write removes what it wrote, so a failed call leaves no output behind. The
    folder's lock (:func:`~diffusereg.outputs.output_lock`) is held from sampling to the last
    file, so two registrations into one folder never mix their files.

    Raises:
        diffusereg.outputs.OutputFolderBusyError: another registration is writing into the folder.
    """
    with output_lock(inputs.request.output_dir):
        all_guides = [*build_guides(settings.guidance, inputs.model_labels), *guides]
        recorder = TrajectoryRecorder() if settings.save_trajectory else None
        callbacks = [*callbacks, *([] if recorder is None else [recorder])]
        pipe.scheduler = scheduler_of_kind(pipe.scheduler, settings.scheduler)
        start = {} if settings.start_from_teacher is None else {"init_field": "teacher",
                                                                 "strength": settings.start_from_teacher}
        started = time.perf_counter()
        out = pipe(inputs.batch, num_inference_steps=settings.steps, guidance=all_guides, num_samples=settings.samples,
                   generator=torch.Generator().manual_seed(settings.seed), callback_on_step_end=callbacks or None,
                   output_type="np", **start)
        elapsed = time.perf_counter() - started
        images = inputs.batch.images
        metrics = {
            **inputs.described, "model": model_name, "scheduler": settings.scheduler, "steps": settings.steps,
            "steps_run": out.num_steps_run, "samples": settings.samples, "seed": settings.seed,
            "start_from_teacher": settings.start_from_teacher,
            "guidance": [*(str(spec) for spec in settings.guidance), *(str(guide) for guide in guides)],
            "device": str(pipe.device), "time_seconds": round(elapsed, 3),
            **registration_metrics(out.field, out.warped, out.warped_labels, images.fixed, images.moving,
                                   inputs.fixed_labels, images.moving_labels,
                                   None if out.sample_spread is None else np.asarray(out.sample_spread)),
            "diffusereg_version": __version__,
        }
        if metrics["NCC_after"] <= metrics["NCC_before"]:
            warnings.warn(f"{inputs.request.output_dir}: the registration did not make the images more alike (NCC "
                          f"{metrics['NCC_before']:.3g} before, {metrics['NCC_after']:.3g} after); look at the result "
                          "before using it", NotMoreAlikeWarning, stacklevel=2)
        transform = displacement_transform(out.field, images.fixed.grid)  # the one the pipeline warped with
        return write_registration(inputs.request.output_dir, images.fixed.grid, transform, out.field, out.warped, metrics,
                                  warped_labels=out.warped_labels, sample_spread=out.sample_spread,
                                  trajectory=None if recorder is None else trajectory_picture(
                                      recorder, inputs.batch, None if inputs.model_labels is None else inputs.model_labels[0],
                                      settings.steps))


@dataclass
class BatchSummary:
    """What :func:`register_pair_list` did in this process: names of pairs registered and skipped."""

    registered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def check_pair_list(list_file: str | os.PathLike, output_dir: str | os.PathLike,
                    settings: RegistrationSettings = RegistrationSettings()) -> list[tuple[RegistrationRequest, str]]:
    """Read a pair list and check every pair before anything runs: every listed file exists
    (:func:`diffusereg.data.read_pair_list` names the row and the file), names are unique plain
    folder names, and each pair passes :func:`check_request` for its folder ``output_dir/NAME``.

    Returns:
        ``(request, name)`` for every pair, in list order.
    """
    list_file, output_dir = Path(list_file), Path(output_dir)
    files, names = read_pair_list(list_file)
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise RegistrationError(f"{list_file}: pair name {name!r} cannot be a folder name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RegistrationError(f"{list_file}: pair names {duplicates} are used more than once")
    return [(check_request(pair.fixed, pair.moving, output_dir / name, settings, pair.fixed_labels,
                           pair.moving_labels), name) for pair, name in zip(files, names)]


def register_pair_list(pipe: DiffuseRegPipeline, requests: Sequence[tuple[RegistrationRequest, str]],
                       model_name: str = "", state: PartialState | None = None, progress: bool = True) -> BatchSummary:
    """Register the checked pairs of a list (:func:`check_pair_list`) into their folders,
    skipping finished pairs (those holding ``metrics.json``), so an interrupted run continues
    where it stopped. Under ``accelerate launch`` the pairs are split between the processes
    (``state.split_between_processes``); each pair uses its settings' seed, so its result does
    not depend on the split.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState() if state is None else state
    summary = BatchSummary()
    with state.split_between_processes(list(requests)) as mine:
        for request, name in tqdm(mine, desc="pairs", unit="pair", disable=not (progress and state.is_local_main_process)):
            if is_complete(request.output_dir):
                summary.skipped.append(name)
                continue
            register_checked(pipe, read_inputs(pipe, request), request.settings, model_name=model_name)
            summary.registered.append(name)
    return summary


def apply_field(field: str | os.PathLike, image: Source, output: str | os.PathLike, labels: bool = False) -> Path:
    """Warp an image (or a label map) of the moving image's space with a saved field and write
    it on the fixed image's grid, exactly as :func:`register_pair` warped its own outputs.

    Args:
        field: a ``field.h5`` (ITK displacement field transform) or ``field.nii.gz`` (vector image)
            written by ``diffusereg register``; it defines the output grid (the fixed image's).
        image: a file, or an :class:`~diffusereg.io.Image`, anywhere in the moving image's space.
        output: an image file to write (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``), or a
            folder that receives ``warped.nii.gz`` (``warped_labels.nii.gz`` with ``labels``).
        labels: ``image`` is an integer label map: nearest neighbour, its dtype kept; otherwise
            linear interpolation, float32.

    Returns:
        The path written.

    Raises:
        RegistrationError: the output would overwrite an input or cannot be written.
        diffusereg.io.ImageError: the field or the image cannot be read, or they do not fit (other
            dimensionality, too little overlap, non-integer or negative labels).
    """
    output = Path(output)
    path = output if output.name.lower().endswith(IMAGE_SUFFIXES) else output / APPLIED_NAMES[labels]
    check_sources({"moving": image})
    check_output_folder(path.parent, [field, image], [path.name])
    transform = read_displacement_transform(field)
    grid = transform_grid(transform)
    moving = as_image(image, "image")
    check_field_target(grid, moving, {"field": str(field), "image": source_name(image, "image")}, labels)
    warped = resample_to_grid(moving, grid, "nearest" if labels else "linear", transform=transform)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Image.on_grid(warped, grid), path)
    return path
