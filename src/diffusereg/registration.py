"""Register image files and write every result to a folder (what ``diffusereg register`` does).

:func:`register_pair` registers one pair of images of any size, spacing and orientation with a
:class:`~diffusereg.pipelines.DiffuseRegPipeline` (which preprocesses them to the model grid,
samples a field there and brings it back to the fixed image's grid) and writes, into one folder,
files that all overlay the fixed image exactly (its shape, spacing, origin and direction):

- ``warped.nii.gz``: the moving image warped onto the fixed image (float32);
- ``warped_labels.nii.gz``: the moving labels warped (nearest neighbour), when given;
- ``field.h5``: the displacement as an ITK ``DisplacementFieldTransform`` (HDF5);
- ``field.nii.gz``: the same displacement as a vector image (mm, ITK ``x, y, z`` components);
- ``jacobian.nii.gz``: det of the Jacobian of ``x -> x + u(x)``, central differences (so it has
  the fixed grid's shape);
- ``uncertainty.nii.gz``: per-voxel length (mm) of the field's std over samples, when N > 1;
- ``trajectory.png``, ``trajectory.gif``: the sampling steps (with ``save_trajectory``);
- ``metrics.json``: Dice, NJD %, JSD, time, steps, model, seed; written last.

Every input is checked before anything is written (:mod:`diffusereg.validation`). Every file is
written atomically (temporary file, then ``os.replace``); ``metrics.json`` is removed before the
outputs are written and written after every other file, and a write that fails or is
interrupted removes the outputs written so far: a folder with a ``metrics.json`` holds a
finished registration (:func:`is_complete`), which is what makes :func:`register_pair_list`
resumable.
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
from diffusereg.io import Image, write_atomically, read_image, write_displacement_field, write_image
from diffusereg.metrics import acdc_dice, dice, jacobian_std, njd_percent
from diffusereg.spatial import jacobian_determinant
from diffusereg.validation import (RegistrationError, WeightsError, check_output_folder, check_pair, check_sources,
                                   source_name)
from diffusereg.visualize import save_trajectory_gif, save_trajectory_strip, trajectory_slice

if TYPE_CHECKING:
    from accelerate import PartialState

    from diffusereg.models import RegistrationNet
    from diffusereg.pipelines import DiffuseRegPipeline

__all__ = [
    "OUTPUT_NAMES",
    "GuidanceSpec",
    "ModelNotFoundError",
    "RegistrationError",
    "RegistrationSettings",
    "check_pair_list",
    "build_guides",
    "check_request",
    "is_complete",
    "load_pipeline",
    "load_teacher",
    "register_pair",
    "register_pair_list",
    "shown_slice",
    "structure_dice",
]

OUTPUT_NAMES: dict[str, str] = {
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "field_transform": "field.h5",
    "field_image": "field.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "uncertainty": "uncertainty.nii.gz",
    "trajectory_png": "trajectory.png",
    "trajectory_gif": "trajectory.gif",
    "metrics": "metrics.json",
}
"""File name of every output in the output folder."""

_ACDC_VALUES = {0, 1, 2, 3}


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
    """Check what can be checked before loading a model or reading a voxel: labels come in pairs,
    ``organ=`` guides have labels, the input files exist with readable headers and fit in memory
    (:func:`~diffusereg.validation.check_sources`), and the outputs can be written without
    overwriting an input (:func:`~diffusereg.validation.check_output_folder`).

    Raises:
        RegistrationError, diffusereg.io.ImageError: naming the problem, one line.
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise RegistrationError("labels: give both --fixed-labels and --moving-labels (Dice compares the warped "
                                "moving labels with the fixed labels), or neither")
    organ = next((spec for spec in settings.guidance if spec.kind == "organ"), None)
    if organ is not None and fixed_labels is None:
        raise RegistrationError(f"guidance {organ}: needs --fixed-labels and --moving-labels")
    sources = _sources(fixed, moving, fixed_labels, moving_labels)
    check_sources(sources)
    check_output_folder(output_dir, sources.values(), OUTPUT_NAMES.values())


def is_complete(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a finished registration (its ``metrics.json``, written last)."""
    return (Path(output_dir) / OUTPUT_NAMES["metrics"]).is_file()


def _remove_outputs(output_dir: Path) -> None:
    """Delete every output of a registration from ``output_dir``, ``metrics.json`` first (from
    then on the folder is unfinished)."""
    metrics = OUTPUT_NAMES["metrics"]
    for name in (metrics, *(name for name in OUTPUT_NAMES.values() if name != metrics)):
        (output_dir / name).unlink(missing_ok=True)


def _write_json(data: dict[str, Any], path: Path) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"), overwrite=True)


def structure_dice(labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice of ``labels`` against ``reference`` (integer maps of one shape) per ACDC structure
    (labels 0..3), else per label value (``label_K``)."""
    values = {int(v) for v in np.unique(reference)} | {int(v) for v in np.unique(labels)}
    if values <= _ACDC_VALUES:
        return acdc_dice(labels, reference)
    return {f"label_{value}": dice(labels, reference, value) for value in sorted(values - {0})}


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


def _write_trajectory(out: Any, pipe: DiffuseRegPipeline, grid: ModelGrid, fixed: Image, moving: Image,
                      fixed_labels: np.ndarray | None, settings: RegistrationSettings, output_dir: Path) -> None:
    """The trajectory strip (PNG) and animation (GIF) of the slice chosen by :func:`shown_slice`."""
    preprocessing: PaperPreprocessing = pipe.preprocessing
    index = shown_slice(grid, fixed_labels)

    def model_slice(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else (array if array.ndim == 2 else array[index])

    shown = trajectory_slice(
        out.trajectory, grid.model.axis_spacing, settings.steps, slice_index=index, num_samples=settings.samples,
        fixed=model_slice(preprocessing.to_model_grid(fixed, grid, "image")),
        moving=model_slice(preprocessing.to_model_grid(moving, grid, "image")),
        fixed_labels=model_slice(fixed_labels))
    save_trajectory_strip(shown, output_dir / OUTPUT_NAMES["trajectory_png"])
    save_trajectory_gif(shown, output_dir / OUTPUT_NAMES["trajectory_gif"])


def _write_images(out: Any, fixed: Image, label_dtype: np.dtype | None, output_dir: Path) -> list[str]:
    """Write the warped image and labels, the field (two formats), the Jacobian determinant and
    the uncertainty, all on ``fixed``'s grid; returns the names written."""
    written = []

    def save(name: str, array: np.ndarray) -> None:
        write_image(Image.on_grid(array, fixed.grid), output_dir / OUTPUT_NAMES[name])
        written.append(OUTPUT_NAMES[name])

    save("warped", out.warped.astype(np.float32))
    if out.warped_labels is not None:
        save("warped_labels", out.warped_labels.astype(label_dtype))
    for name in ("field_transform", "field_image"):
        write_displacement_field(out.field, fixed.grid, output_dir / OUTPUT_NAMES[name])
        written.append(OUTPUT_NAMES[name])
    field = torch.from_numpy(np.ascontiguousarray(out.field, dtype=np.float32))[None]
    save("jacobian", jacobian_determinant(field, method="central")[0].numpy())
    if out.uncertainty is not None:
        save("uncertainty", _length_mm(out.uncertainty, fixed))
    return written


def _length_mm(field: np.ndarray, grid_image: Image) -> np.ndarray:
    """Per-voxel length (mm) of a ``(ndim, *S)`` field given in voxels of ``grid_image``'s grid."""
    spacing = np.asarray(grid_image.axis_spacing, dtype=np.float32).reshape(-1, *([1] * grid_image.ndim))
    return np.sqrt(((field * spacing) ** 2).sum(axis=0)).astype(np.float32)


def _evaluate(out: Any, fixed: Image, fixed_labels: Image | None, moving_labels: Image | None) -> dict[str, Any]:
    """Dice before/after (with labels, on the fixed grid), NJD % and JSD (forward differences, as
    the paper's evaluation), and the largest displacement (mm)."""
    metrics: dict[str, Any] = {}
    if fixed_labels is not None and moving_labels is not None:
        reference = resample_to_grid(fixed_labels, fixed.grid, "nearest")
        metrics["dice_before"] = structure_dice(resample_to_grid(moving_labels, fixed.grid, "nearest"), reference)
        metrics["dice_after"] = structure_dice(out.warped_labels, reference)
    metrics["NJD_percent"] = njd_percent(out.field)
    metrics["JSD"] = jacobian_std(out.field)
    metrics["max_displacement_mm"] = float(_length_mm(out.field, fixed).max())
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
            With both, ``metrics.json`` gets Dice before and after registration (per ACDC
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
    if fixed_label_image is not None and (settings.save_trajectory or any(g.kind == "organ" for g in settings.guidance)):
        model_labels = (pipe.preprocessing.to_model_grid(fixed_label_image, grid, "labels"),
                        pipe.preprocessing.to_model_grid(moving_label_image, grid, "labels"))
    all_guides = [*build_guides(settings.guidance, model_labels), *guides]

    started = time.perf_counter()
    out = pipe(fixed_image, moving_image, moving_labels=moving_label_image, num_inference_steps=settings.steps,
               scheduler=settings.scheduler, guidance=all_guides, num_samples=settings.samples,
               generator=torch.Generator().manual_seed(settings.seed), return_trajectory=settings.save_trajectory,
               callback_on_step_end=callback_on_step_end, output_type="np", **start)
    elapsed = time.perf_counter() - started

    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(output_dir)
    try:
        written = _write_images(out, fixed_image,
                                None if moving_label_image is None else moving_label_image.array.dtype, output_dir)
        if settings.save_trajectory:
            _write_trajectory(out, pipe, grid, fixed_image, moving_image,
                              None if model_labels is None else model_labels[0], settings, output_dir)
            written += [OUTPUT_NAMES["trajectory_png"], OUTPUT_NAMES["trajectory_gif"]]
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
            "outputs": [*written, OUTPUT_NAMES["metrics"]],
            "diffusereg_version": __version__,
        }
        _write_json(metrics, output_dir / OUTPUT_NAMES["metrics"])
    except BaseException:  # KeyboardInterrupt included: no output of an unfinished registration stays
        _remove_outputs(output_dir)
        raise
    return metrics


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
