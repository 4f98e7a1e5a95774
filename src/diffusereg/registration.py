"""Register image files and write every result to a folder (what ``diffusereg register`` does),
and apply a saved field to another image (``diffusereg apply``).

:func:`register_pair` registers one pair of images of any size, spacing and orientation with a
:class:`~diffusereg.pipelines.DiffuseRegPipeline` (which preprocesses them to the model grid,
samples a field there and brings it back to the fixed image's grid) and writes the files of
:mod:`diffusereg.outputs`, which all overlay the fixed image exactly.

Every input is checked before anything is written (:mod:`diffusereg.validation`), and every file
is written atomically (:mod:`diffusereg.outputs`): a folder with a ``metrics.json`` holds a
finished registration (:func:`~diffusereg.outputs.is_complete`), which is what makes
:func:`register_pair_list` resumable. :func:`apply_field` warps any image or label map of the
moving image's space with a saved ``field.h5`` / ``field.nii.gz``, exactly as the registration
warped its own outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from diffusereg import __version__
from diffusereg.data import PaperPreprocessing, PairFiles, read_pair_list, resample_to_grid
from diffusereg.data.preprocessing import ModelGrid
from diffusereg.guidance import Guide, OrganMaskGuidance, SimilarityGuidance, SmoothnessGuidance
from diffusereg.io import (IMAGE_SUFFIXES, Image, displacement_transform, read_displacement_transform, read_image,
                           transform_grid, write_image)
from diffusereg.metrics import jacobian_std, njd_percent, structure_dice
from diffusereg.outputs import OUTPUT_NAMES, is_complete, length_mm, write_registration
from diffusereg.validation import (RegistrationError, WeightsError, check_field_target, check_output_folder, check_pair,
                                   check_sources, source_name)
from diffusereg.visualize import TrajectorySlice, trajectory_slice

if TYPE_CHECKING:
    from accelerate import PartialState

    from diffusereg.models import RegistrationNet
    from diffusereg.pipelines import DiffuseRegPipeline

__all__ = [
    "APPLIED_NAMES",
    "GuidanceSpec",
    "ModelNotFoundError",
    "RegistrationError",
    "RegistrationSettings",
    "apply_field",
    "check_pair_list",
    "build_guides",
    "check_request",
    "load_pipeline",
    "load_teacher",
    "register_pair",
    "register_pair_list",
    "shown_slice",
]

APPLIED_NAMES: dict[bool, str] = {False: OUTPUT_NAMES["warped"], True: OUTPUT_NAMES["warped_labels"]}
"""File name :func:`apply_field` writes into an output folder, for an image (False) and a label map (True)."""


class ModelNotFoundError(RegistrationError):
    """``--model`` names neither a pipeline folder nor a loadable Hugging Face Hub model."""


@dataclass(frozen=True)
class GuidanceSpec:
    """One guide as written on the command line.

    ``smoothness=SCALE`` (:class:`~diffusereg.guidance.SmoothnessGuidance`),
    ``similarity=SCALE`` (:class:`~diffusereg.guidance.SimilarityGuidance`) or
    ``organ=LABEL[:SCALE]`` (:class:`~diffusereg.guidance.OrganMaskGuidance` on the label value
    ``LABEL`` of both label maps; scale 1 when omitted).
    """

    kind: str
    scale: float
    label: int | None = None

    @classmethod
    def parse(cls, text: str) -> GuidanceSpec:
        """Read ``smoothness=0.05``, ``similarity=0.5``, ``organ=3`` or ``organ=3:0.5``."""
        kind, sep, value = text.partition("=")
        usage = "use smoothness=SCALE, similarity=SCALE or organ=LABEL[:SCALE]"
        try:
            if sep and kind in ("smoothness", "similarity"):
                return cls(kind, float(value))
            if sep and kind == "organ":
                label, _, scale = value.partition(":")
                return cls(kind, float(scale) if scale else 1.0, int(label))
        except ValueError:
            raise ValueError(f"guidance {text!r}: cannot read the numbers; {usage}") from None
        raise ValueError(f"guidance {text!r} not understood; {usage}")

    def __str__(self) -> str:
        return f"organ={self.label}:{self.scale:g}" if self.kind == "organ" else f"{self.kind}={self.scale:g}"


@dataclass(frozen=True)
class RegistrationSettings:
    """How to sample: steps, scheduler (``"ddim"``/``"ddpm"``), guides, samples per pair (their
    mean is the field, their std the uncertainty), the seed of the initial noise, whether to
    draw the trajectory, and ``start_from_teacher``: None to start from noise, or a strength in
    (0, 1] to start from the one-shot teacher's field and run that fraction of the steps."""

    steps: int = 10
    scheduler: str = "ddim"
    guidance: tuple[GuidanceSpec, ...] = ()
    samples: int = 1
    seed: int = 0
    save_trajectory: bool = False
    start_from_teacher: float | None = None


@dataclass
class BatchSummary:
    """What :func:`register_pair_list` did in this process: names of pairs registered and skipped."""

    registered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- the model
@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' warnings (e.g. "Couldn't connect to the Hub") and its component-loading
    progress bar while a pipeline loads; both settings are restored afterwards."""
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()


def load_pipeline(model: str, device: str | torch.device = "cpu", allow_pickle: bool = False) -> DiffuseRegPipeline:
    """Load a pipeline from a folder (``save_pretrained`` output) or a Hugging Face Hub id.

    Args:
        model: the folder or Hub id.
        device: where the pipeline runs.
        allow_pickle: also load pickle weights (``.bin``); they can run code when loaded, so only
            for weights from a source you trust (see :meth:`DiffuseRegPipeline.from_pretrained`).

    Raises:
        ModelNotFoundError: ``model 'NAME' not found: REASON``, one line.
        diffusereg.validation.WeightsError: pickle weights (not allowed), corrupt or truncated
            weights, weights that do not match the config; naming the file.
        RegistrationError: ``device`` is CUDA but no CUDA device is available.
    """
    from diffusereg.pipelines import DiffuseRegPipeline

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RegistrationError(f"device {device}: no CUDA device is available; use --device cpu")
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if not path.is_dir() and looks_like_path:
        raise ModelNotFoundError(f"model {model!r} not found: no such folder")
    try:
        with _quiet_loading():
            pipe = DiffuseRegPipeline.from_pretrained(str(path) if path.is_dir() else model, allow_pickle=allow_pickle)
    except WeightsError:
        raise
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 240 else reason[:237] + "..."
        where = "the folder is not a saved pipeline" if path.is_dir() else (
            "not a folder, and not loadable from the Hugging Face Hub or its local cache")
        raise ModelNotFoundError(f"model {model!r} not found: {where} ({reason})") from error
    return pipe.to(device)


def load_teacher(model: str, device: str | torch.device = "cpu") -> RegistrationNet:
    """The one-shot teacher network stored beside a pipeline (``MODEL/teacher``, as in the bundled
    models), in eval mode on ``device``.

    Raises:
        ModelNotFoundError: the model folder has no ``teacher`` folder (Hub ids are not searched).
    """
    from diffusereg.hub import resolve_model
    from diffusereg.models import RegistrationNet

    folder = Path(resolve_model(model)).expanduser() / "teacher"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model {model!r} has no one-shot teacher: {folder} is not a saved RegistrationNet")
    return RegistrationNet.from_pretrained(folder, use_safetensors=True).to(device).eval()


# ---------------------------------------------------------------------------------- outputs
def _sources(fixed: Image | str | os.PathLike, moving: Image | str | os.PathLike,
             fixed_labels: Image | str | os.PathLike | None,
             moving_labels: Image | str | os.PathLike | None) -> dict[str, Image | str | os.PathLike | None]:
    """The inputs of a registration by role (the keys of :mod:`diffusereg.validation`)."""
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels}


def check_request(fixed: Image | str | os.PathLike, moving: Image | str | os.PathLike, output_dir: str | os.PathLike,
                  settings: RegistrationSettings, fixed_labels: Image | str | os.PathLike | None = None,
                  moving_labels: Image | str | os.PathLike | None = None) -> None:
    """Check what can be checked before loading a model or reading a voxel: fixed labels come with
    moving labels (moving labels alone are warped, without Dice), ``organ=`` guides have both, the input files exist with readable headers and fit in memory
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
    sources = _sources(fixed, moving, fixed_labels, moving_labels)
    check_sources(sources)
    check_output_folder(output_dir, sources.values(), OUTPUT_NAMES.values())


# ---------------------------------------------------------------------------------- guidance
def build_guides(specs: Sequence[GuidanceSpec], labels: tuple[np.ndarray, np.ndarray] | None) -> list[Guide]:
    """Guides from their specs; ``labels`` are the fixed and moving label maps on the model grid
    (present when a spec is ``organ``, see :func:`check_request`)."""
    guides: list[Guide] = []
    for spec in specs:
        if spec.kind == "smoothness":
            guides.append(SmoothnessGuidance(scale=spec.scale))
        elif spec.kind == "similarity":
            guides.append(SimilarityGuidance(scale=spec.scale))
        else:
            fixed_mask, moving_mask = (torch.from_numpy(m == spec.label) for m in labels)
            if not fixed_mask.any() or not moving_mask.any():
                raise RegistrationError(f"guidance {spec}: label {spec.label} is missing from a label map (on the model grid)")
            guides.append(OrganMaskGuidance(fixed_mask, moving_mask, scale=spec.scale))
    return guides


# ---------------------------------------------------------------------------------- one pair
def _as_image(image: Image | str | os.PathLike | None) -> Image | None:
    return image if image is None or isinstance(image, Image) else read_image(image)


def _describe(image: Image | str | os.PathLike | None) -> str | None:
    """How metrics.json names an input: its path, or ``<in memory>``."""
    return None if image is None else "<in memory>" if isinstance(image, Image) else str(image)


def shown_slice(grid: ModelGrid, fixed_labels: np.ndarray | None) -> int:
    """The model-grid slice (index along ``D``) to show: most fixed-label voxels, else the middle
    of the image data; 0 for 2D images. ``fixed_labels``: the fixed labels on the model grid."""
    if grid.model.ndim == 2:
        return 0
    if fixed_labels is not None and np.any(fixed_labels > 0):
        return int(np.argmax((fixed_labels > 0).sum(axis=(1, 2))))
    region = grid.data_region[0]
    return (region.start + region.stop - 1) // 2


def _trajectory_picture(out: Any, pipe: DiffuseRegPipeline, grid: ModelGrid, fixed: Image, moving: Image,
                        fixed_labels: np.ndarray | None, settings: RegistrationSettings) -> TrajectorySlice:
    """The slice chosen by :func:`shown_slice` of the sampling trajectory, with its model-grid images."""
    preprocessing: PaperPreprocessing = pipe.preprocessing
    index = shown_slice(grid, fixed_labels)

    def model_slice(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else (array if array.ndim == 2 else array[index])

    return trajectory_slice(
        out.trajectory, grid.model.axis_spacing, settings.steps, slice_index=index, num_samples=settings.samples,
        fixed=model_slice(preprocessing.to_model_grid(fixed, grid, "image")),
        moving=model_slice(preprocessing.to_model_grid(moving, grid, "image")),
        fixed_labels=model_slice(fixed_labels))


def _evaluate(out: Any, fixed: Image, fixed_labels: Image | None, moving_labels: Image | None) -> dict[str, Any]:
    """Dice before/after (with both label maps, on the fixed grid), NJD % and JSD (forward
    differences, as the paper's evaluation), and the largest displacement (mm)."""
    metrics: dict[str, Any] = {}
    if fixed_labels is not None and moving_labels is not None:
        reference = resample_to_grid(fixed_labels, fixed.grid, "nearest")
        metrics["dice_before"] = structure_dice(resample_to_grid(moving_labels, fixed.grid, "nearest"), reference)
        metrics["dice_after"] = structure_dice(out.warped_labels, reference)
    metrics["NJD_percent"] = njd_percent(out.field)
    metrics["JSD"] = jacobian_std(out.field)
    metrics["max_displacement_mm"] = float(length_mm(out.field, fixed.grid).max())
    return metrics


def register_pair(
    pipe: DiffuseRegPipeline,
    fixed: Image | str | os.PathLike,
    moving: Image | str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: RegistrationSettings = RegistrationSettings(),
    fixed_labels: Image | str | os.PathLike | None = None,
    moving_labels: Image | str | os.PathLike | None = None,
    model_name: str = "",
    callback_on_step_end: Callable | Sequence[Callable] | None = None,
    guides: Sequence[Guide] = (),
    teacher: RegistrationNet | None = None,
) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the outputs (see the module docstring).

    Every input is checked before anything is written (:func:`check_request`, then
    :func:`~diffusereg.validation.check_pair` on the read images). Once sampling is done, the
    outputs of an earlier registration in ``output_dir`` are removed, ``metrics.json`` first, and
    the new ones written, ``metrics.json`` last; if writing fails or is interrupted, the outputs
    written so far are removed again. So the folder counts as finished only once this call has
    completed, and a failed call leaves no output behind.

    Args:
        pipe: the registration pipeline (on its device).
        fixed, moving: image files (NIfTI, MHA/MHD, NRRD) or :class:`~diffusereg.io.Image`;
            2D or 3D, any size, spacing and orientation.
        output_dir: the folder for the outputs (created if needed).
        settings: sampling settings.
        fixed_labels, moving_labels: integer label maps on the fixed / moving image's geometry.
            Moving labels are warped onto the fixed grid (``warped_labels.nii.gz``); with fixed
            labels too, ``metrics.json`` gets Dice before and after registration (per ACDC
            structure for labels 0..3), and ``organ=`` guides can be used.
        model_name: how ``metrics.json`` names the model.
        callback_on_step_end: per-step hooks given to the pipeline (see :mod:`diffusereg.callbacks`),
            e.g. to watch the sampling or stop it; a stopped registration writes the field of the
            step it stopped at.
        guides: guide objects used besides ``settings.guidance`` (e.g. ones whose settings change
            while sampling runs); ``metrics.json`` lists them by ``str(guide)``.
        teacher: the one-shot network whose field sampling starts from when
            ``settings.start_from_teacher`` is set (:func:`load_teacher`).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        RegistrationError: see :func:`check_request`; an ``organ=`` label absent from a label map.
        diffusereg.io.ImageError: an input cannot be read, is invalid, or does not fit the model
            (see :mod:`diffusereg.validation`).
    """
    output_dir = Path(output_dir)
    check_request(fixed, moving, output_dir, settings, fixed_labels, moving_labels)
    start: dict[str, Any] = {}
    if settings.start_from_teacher is not None:
        if teacher is None:
            raise RegistrationError("start_from_teacher needs the teacher network (load_teacher)")
        from diffusereg.evaluation import teacher_registrar

        one_shot = teacher_registrar(teacher)
        start = {"init_field": lambda f, m: one_shot(np.asarray(f), np.asarray(m)).field,
                 "strength": settings.start_from_teacher}
    fixed_image, moving_image = _as_image(fixed), _as_image(moving)
    fixed_label_image, moving_label_image = _as_image(fixed_labels), _as_image(moving_labels)
    names = {role: source_name(source, role) for role, source in _sources(fixed, moving, fixed_labels,
                                                                           moving_labels).items()}
    check_pair(fixed_image, moving_image, pipe.spatial_dims, pipe.preprocessing, fixed_labels=fixed_label_image,
               moving_labels=moving_label_image, names=names)

    grid = pipe.preprocessing.model_grid(fixed_image.grid)
    model_labels = None
    needs_labels = settings.save_trajectory or any(g.kind == "organ" for g in settings.guidance)
    if fixed_label_image is not None and needs_labels:
        model_labels = (pipe.preprocessing.to_model_grid(fixed_label_image, grid, "labels"),
                        pipe.preprocessing.to_model_grid(moving_label_image, grid, "labels"))
    all_guides = [*build_guides(settings.guidance, model_labels), *guides]

    started = time.perf_counter()
    out = pipe(fixed_image, moving_image, moving_labels=moving_label_image, num_inference_steps=settings.steps,
               scheduler=settings.scheduler, guidance=all_guides, num_samples=settings.samples,
               generator=torch.Generator().manual_seed(settings.seed), return_trajectory=settings.save_trajectory,
               callback_on_step_end=callback_on_step_end, output_type="np", **start)
    elapsed = time.perf_counter() - started

    trajectory = None
    if settings.save_trajectory:
        trajectory = _trajectory_picture(out, pipe, grid, fixed_image, moving_image,
                                         None if model_labels is None else model_labels[0], settings)
    metrics: dict[str, Any] = {
        "fixed": _describe(fixed), "moving": _describe(moving),
        "fixed_labels": _describe(fixed_labels), "moving_labels": _describe(moving_labels),
        "model": model_name, "scheduler": settings.scheduler, "steps": settings.steps,
        "steps_run": out.num_steps_run, "samples": settings.samples, "seed": settings.seed,
        "start_from_teacher": settings.start_from_teacher,
        "guidance": [*(str(spec) for spec in settings.guidance), *(str(guide) for guide in guides)],
        "device": str(pipe.device),
        "time_seconds": round(elapsed, 3),
        **_evaluate(out, fixed_image, fixed_label_image, moving_label_image),
        "diffusereg_version": __version__,
    }
    return write_registration(output_dir, fixed_image.grid, displacement_transform(out.field, fixed_image.grid),
                              out.field, out.warped, metrics, warped_labels=out.warped_labels,
                              uncertainty=out.uncertainty, trajectory=trajectory)


# ---------------------------------------------------------------------------------- many pairs
def check_pair_list(list_file: str | os.PathLike, output_dir: str | os.PathLike,
                    settings: RegistrationSettings = RegistrationSettings()) -> list[tuple[PairFiles, str]]:
    """Read a pair list and check every pair before anything runs.

    Every listed file must exist (:func:`diffusereg.data.read_pair_list`, which names the row and
    the file), pair names must be unique plain folder names, and each pair must pass
    :func:`check_request` for its folder ``output_dir/NAME``.

    Returns:
        ``(files, name)`` for every pair, in list order.
    """
    list_file, output_dir = Path(list_file), Path(output_dir)
    files, names = read_pair_list(list_file)
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise RegistrationError(f"{list_file}: pair name {name!r} cannot be a folder name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RegistrationError(f"{list_file}: pair names {duplicates} are used more than once")
    for pair, name in zip(files, names):
        check_request(pair.fixed, pair.moving, output_dir / name, settings, pair.fixed_labels, pair.moving_labels)
    return list(zip(files, names))


def register_pair_list(
    pipe: DiffuseRegPipeline,
    list_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: RegistrationSettings = RegistrationSettings(),
    model_name: str = "",
    state: PartialState | None = None,
    progress: bool = True,
    teacher: RegistrationNet | None = None,
) -> BatchSummary:
    """Register every pair of a CSV/JSON list into ``output_dir/NAME/``, skipping finished pairs.

    The list (columns ``fixed``, ``moving`` and optionally ``fixed_labels``, ``moving_labels``,
    ``name``) is checked whole first (:func:`check_pair_list`): a missing file stops the run
    before anything is registered, naming the row and the file. A pair whose folder holds ``metrics.json`` is skipped, so an interrupted run
    continues where it stopped. Under ``accelerate launch`` the pairs are split between the
    processes (``state.split_between_processes``); each pair uses the same ``settings.seed``,
    so its result does not depend on the split.

    Args:
        pipe: the pipeline, on this process's device.
        list_file: the pair list.
        output_dir: parent folder of the per-pair folders.
        settings: sampling settings for every pair.
        model_name: recorded in each ``metrics.json``.
        state: Accelerate's process state (a new ``PartialState()`` if None).
        progress: show a progress bar (main process only).
        teacher: see :func:`register_pair`.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    pairs = check_pair_list(list_file, output_dir, settings)
    state = PartialState() if state is None else state
    summary = BatchSummary()
    with state.split_between_processes(pairs) as mine:
        for pair, name in tqdm(mine, desc="pairs", unit="pair", disable=not (progress and state.is_local_main_process)):
            if is_complete(output_dir / name):
                summary.skipped.append(name)
                continue
            register_pair(pipe, pair.fixed, pair.moving, output_dir / name, settings, fixed_labels=pair.fixed_labels,
                          moving_labels=pair.moving_labels, model_name=model_name, teacher=teacher)
            summary.registered.append(name)
    return summary


# ---------------------------------------------------------------------------------- a saved field
def _applied_path(output: Path, labels: bool) -> Path:
    """``output`` itself when it names an image file, else ``output/warped[_labels].nii.gz``."""
    if output.name.lower().endswith(IMAGE_SUFFIXES):
        return output
    return output / APPLIED_NAMES[labels]


def apply_field(field: str | os.PathLike, image: Image | str | os.PathLike, output: str | os.PathLike,
                labels: bool = False) -> Path:
    """Warp an image (or a label map) of the moving image's space with a saved field and write
    it on the fixed image's grid, exactly as :func:`register_pair` warped its own outputs.

    Args:
        field: a ``field.h5`` (ITK displacement field transform) or ``field.nii.gz`` (vector image)
            written by ``diffusereg register``; it defines the output grid (the fixed image's).
        image: a file, or an :class:`~diffusereg.io.Image`, anywhere in the moving image's space
            (its own grid; it is resampled through the field).
        output: an image file to write (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``), or a
            folder that receives ``warped.nii.gz`` (``warped_labels.nii.gz`` with ``labels``).
        labels: ``image`` is an integer label map: nearest neighbour, its dtype kept; otherwise
            linear interpolation, float32.

    Returns:
        The path written.

    Raises:
        RegistrationError: the output would overwrite an input or cannot be written.
        diffusereg.io.ImageError: the field or the image cannot be read, or they do not fit (other
            dimensionality, no sufficient overlap, non-integer or negative labels).
    """
    path = _applied_path(Path(output), labels)
    check_sources({"moving": image})
    check_output_folder(path.parent, [field, image], [path.name])
    transform = read_displacement_transform(field)
    grid = transform_grid(transform)
    moving = _as_image(image)
    check_field_target(grid, moving, {"field": str(field), "image": source_name(image, "image")}, labels)
    warped = resample_to_grid(moving, grid, "nearest" if labels else "linear", transform=transform)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Image.on_grid(warped, grid), path)
    return path
