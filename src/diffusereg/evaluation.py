"""Evaluate registration methods on ACDC-like folders with the paper's protocol.

Protocol (DiffuseReg and its peers): every patient's ED frame is the fixed image and its ES frame
the moving one; both are preprocessed as in the paper (:class:`~diffusereg.data.PaperPreprocessing`:
1.5 x 1.5 x 3.15 mm, 32 x 128 x 128); a method returns a displacement field on that model grid,
the moving labels are warped with it (nearest neighbour) and compared with the fixed labels there.
A 2D model registers the volume slice by slice, so its Dice is a 3D Dice over the stacked slices.

A method is any :data:`Registrar`: ``registrar(fixed, moving) -> RegistrationResult`` on model-grid
volumes (here: no registration, a pipeline, its one-shot teacher, and ANTs SyN, the baseline). :func:`evaluate` runs one over a dataset and returns one row per case (the columns of
:data:`CASE_COLUMNS`); :func:`score_case` scores one result the same way, for methods that need
more than the two images (e.g. guidance built from the case's labels); :func:`summarize` averages
rows and :func:`write_evaluation` writes the per-case CSV and the summary (JSON and Markdown),
atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusereg.data import ACDCDataset, PreprocessedPair
from diffusereg.io import write_atomically
from diffusereg.metrics import ACDC_SCORES, acdc_case_metrics
from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.spatial import warp_labels

__all__ = [
    "CASE_COLUMNS",
    "RegistrationResult",
    "Registrar",
    "ants_syn_registrar",
    "evaluate",
    "identity_registrar",
    "pipeline_registrar",
    "score_case",
    "summarize",
    "summary_markdown",
    "teacher_registrar",
    "warp_moving_labels",
    "write_evaluation",
]

CASE_COLUMNS = ("case", "group", *ACDC_SCORES, "NJD_percent", "JSD", "HD95", "seconds", "steps_run")
"""Columns of a per-case row: Dice in percent, NJD %, JSD, HD95 (mm, mean over LV, Myo and RV),
seconds of the registration call alone (no reading or preprocessing) and sampling steps run."""

SUMMARY_COLUMNS = (*ACDC_SCORES, "NJD_percent", "JSD", "HD95", "seconds", "steps_run")


@dataclass(frozen=True)
class RegistrationResult:
    """What a method returns for one pair.

    Attributes:
        field: displacement ``(ndim, *S)`` in voxels of the model grid, channel ``i`` along axis ``i``.
        steps_run: sampling steps that ran (diffusion), or None for one-shot methods.
        sample_spread: per-voxel standard deviation of the field over samples ``(ndim, *S)``, voxels,
            when the method draws several samples (``num_samples > 1``), else None.
    """

    field: np.ndarray
    steps_run: int | None = None
    sample_spread: np.ndarray | None = None


Registrar = Callable[[np.ndarray, np.ndarray], RegistrationResult]
"""``registrar(fixed, moving)``: images ``(*S)`` on the model grid in ``[0, 1]`` -> result."""


def identity_registrar(fixed: np.ndarray, moving: np.ndarray) -> RegistrationResult:
    """No registration: a zero field (the "Initial" row of the paper's table)."""
    return RegistrationResult(np.zeros((fixed.ndim, *fixed.shape), dtype=np.float32))


def pipeline_registrar(pipe: Any, num_inference_steps: int, seed: int = 0, **call_kwargs: Any) -> Registrar:
    """A :class:`~diffusereg.pipelines.DiffuseRegPipeline` as a method.

    Every pair is sampled with a fresh ``torch.Generator`` seeded with ``seed``, so results do not
    depend on the order of the cases. ``call_kwargs`` go to the pipeline call (``guidance``,
    ``callback_on_step_end``, ``num_samples``, ``init_field="teacher"`` and ``strength``, ...).
    """

    def register(fixed: np.ndarray, moving: np.ndarray) -> RegistrationResult:
        out = pipe(fixed, moving, num_inference_steps=num_inference_steps, output_type="np",
                   generator=torch.Generator().manual_seed(seed), **call_kwargs)
        return RegistrationResult(out.field, out.num_steps_run, out.sample_spread)

    return register


def teacher_registrar(model: torch.nn.Module, passes: int = 1) -> Registrar:
    """A one-shot :class:`~diffusereg.models.RegistrationNet` as a method, applied ``passes`` times
    recursively (:meth:`~diffusereg.models.RegistrationNet.recursive`; 1: one-shot): a 2D network
    registers a volume ``(D, H, W)`` slice by slice in one batch (zero displacement along ``D``),
    like a 2D diffusion model; a 3D network takes the volume whole."""
    parameter = next(model.parameters())

    @torch.no_grad()
    def register(fixed: np.ndarray, moving: np.ndarray) -> RegistrationResult:
        batch = ModelGridBatch.from_arrays(fixed, moving, None, model.config.spatial_dims, model.size_multiple)
        field = model.recursive(batch.fixed.to(parameter), batch.moving.to(parameter), passes)[-1].float().cpu()
        return RegistrationResult(batch.to_output(field, is_field=True).numpy())

    return register


def ants_syn_registrar(axis_spacing: Sequence[float], threads: int = 1) -> Registrar:
    """ANTs SyN with its defaults (``type_of_transform="SyN"``: affine then SyN), the baseline.

    The images get the model grid's voxel size (``axis_spacing``, mm, array-axis order) so SyN works
    in mm; the composed transform is read back as a displacement field and converted to voxels.
    ``threads`` sets ITK's thread count (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

    Raises:
        ImportError: antspyx is not installed (``pip install -e ".[baselines]"``).
    """
    try:
        import ants
    except ImportError as error:
        raise ImportError("ANTs SyN needs antspyx: pip install -e '.[baselines]'") from error
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    spacing = np.asarray(axis_spacing, dtype=np.float64)

    def register(fixed: np.ndarray, moving: np.ndarray) -> RegistrationResult:
        fixed_image = ants.from_numpy(fixed.astype(np.float32), spacing=tuple(spacing))
        moving_image = ants.from_numpy(moving.astype(np.float32), spacing=tuple(spacing))
        result = ants.registration(fixed=fixed_image, moving=moving_image, type_of_transform="SyN")
        with tempfile.TemporaryDirectory() as folder:
            composed = ants.apply_transforms(fixed_image, moving_image, result["fwdtransforms"],
                                             compose=str(Path(folder) / "field"))
            vectors = ants.image_read(composed).numpy()  # (*S, ndim), mm along the array axes
        for path in result["fwdtransforms"] + result["invtransforms"]:
            Path(path).unlink(missing_ok=True)
        field = np.moveaxis(vectors, -1, 0) / spacing.reshape(-1, *([1] * fixed.ndim))
        return RegistrationResult(field.astype(np.float32))

    return register


def _case_row(case: str, group: str, warped_labels: np.ndarray, fixed_labels: np.ndarray, result: RegistrationResult,
              axis_spacing: Sequence[float], seconds: float) -> dict[str, Any]:
    """One row of :data:`CASE_COLUMNS` (Dice in percent)."""
    metrics = acdc_case_metrics(warped_labels, fixed_labels, result.field, axis_spacing=axis_spacing)
    row: dict[str, Any] = {"case": case, "group": group}
    row.update({name: 100.0 * metrics[f"Dice_{name}"] for name in ACDC_SCORES})
    row["NJD_percent"], row["JSD"] = metrics["NJD_percent"], metrics["JSD"]
    row["HD95"] = float(np.nanmean([metrics[f"HD95_{name}"] for name in ("LV", "Myo", "RV")]))
    row["seconds"] = seconds
    row["steps_run"] = result.steps_run
    return row


def evaluate(dataset: ACDCDataset, registrar: Registrar, description: str = "cases",
             progress: bool = True) -> list[dict[str, Any]]:
    """Run ``registrar`` on every case of ``dataset`` and score it (see the module docstring).

    Args:
        dataset: a 3D :class:`~diffusereg.data.ACDCDataset` (volumes with labels).
        registrar: the method.
        description: label of the progress bar.
        progress: show a progress bar.

    Returns:
        One dict per case with the keys of :data:`CASE_COLUMNS`.
    """
    if dataset.spatial_dims != 3:
        raise ValueError("evaluate() scores whole volumes: build the dataset with spatial_dims=3")
    rows = []
    for index in tqdm(range(len(dataset.names)), desc=description, unit="case", disable=not progress):
        pair = dataset.preprocessed(index)
        started = time.perf_counter()
        result = registrar(pair.fixed, pair.moving)
        seconds = time.perf_counter() - started
        rows.append(score_case(pair, result, dataset.names[index], dataset.metadata(index)["group"], seconds))
    return rows


def score_case(pair: PreprocessedPair, result: RegistrationResult, case: str, group: str,
               seconds: float) -> dict[str, Any]:
    """Score one registered pair as in :func:`evaluate`: warp its moving labels with ``result.field``
    (nearest neighbour) and compare them with its fixed labels on the model grid.

    Args:
        pair: the preprocessed pair (both label maps needed).
        result: what a method returned for ``pair.fixed`` and ``pair.moving``.
        case, group: the case's name and group, copied into the row.
        seconds: duration of the registration call.

    Returns:
        One row with the keys of :data:`CASE_COLUMNS`.
    """
    if pair.fixed_labels is None or pair.moving_labels is None:
        raise ValueError(f"case {case} has no label maps; Dice needs both")
    expected = (pair.fixed.ndim, *pair.fixed.shape)
    if result.field.shape != expected:
        raise ValueError(f"case {case}: the method returned a field of shape {result.field.shape}, expected {expected}")
    warped = warp_moving_labels(pair, result.field)
    return _case_row(case, group, warped, pair.fixed_labels, result, pair.grid.model.axis_spacing, seconds)


def warp_moving_labels(pair: PreprocessedPair, field: np.ndarray) -> np.ndarray:
    """The moving labels of ``pair`` warped by ``field`` ``(ndim, *S)`` (voxels of the model grid)
    with nearest neighbour, as :func:`score_case` scores them: an int64 label map ``(*S)``."""
    labels = torch.from_numpy(np.asarray(pair.moving_labels).astype(np.int64))[None, None]
    return warp_labels(labels, torch.from_numpy(np.asarray(field, dtype=np.float32))[None])[0, 0].numpy()


def summarize(rows: Sequence[dict[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation of each of ``columns`` over ``rows``; missing values and NaNs skipped."""
    summary: dict[str, dict[str, float]] = {}
    for column in columns:
        values = np.array([row[column] for row in rows if row.get(column) is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            std = float(values.std(ddof=1)) if values.size > 1 else 0.0
            summary[column] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return summary


def summary_markdown(summaries: dict[str, dict[str, dict[str, float]]], columns: Sequence[str] = SUMMARY_COLUMNS,
                     precise: Sequence[str] = ("NJD_percent", "JSD")) -> str:
    """A Markdown table with one row per method: mean (std) of each of ``columns`` (by default Dice,
    NJD %, JSD, HD95 and time), with 3 decimals for the ``precise`` columns and 2 for the others."""
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for method, summary in summaries.items():
        cells = []
        for column in columns:
            stats = summary.get(column)
            if stats is None:
                cells.append("")
            else:
                digits = 3 if column in precise else 2
                cells.append(f"{stats['mean']:.{digits}f} ({stats['std']:.{digits}f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value)
                         for key, value in row.items()})
    return stream.getvalue()


def write_evaluation(output_dir: str | Path, rows_by_method: dict[str, Sequence[dict[str, Any]]],
                     settings: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Write ``cases.csv`` (one row per method and case), ``summary.json`` and ``summary.md``.

    Args:
        output_dir: folder for the three files (created if needed).
        rows_by_method: per-case rows of each method, as returned by :func:`evaluate`.
        settings: what produced them (data folder, split, model, steps, ...), stored in the JSON.

    Returns:
        The summaries, per method.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = {method: summarize(rows) for method, rows in rows_by_method.items()}
    flat = [{"method": method, **row} for method, rows in rows_by_method.items() for row in rows]
    text = {
        "cases.csv": _csv_text(flat, ("method", *CASE_COLUMNS)),
        "summary.json": json.dumps({"settings": settings, "summary": summaries}, indent=2) + "\n",
        "summary.md": summary_markdown(summaries),
    }
    for name, content in text.items():
        write_atomically(output_dir / name, lambda temporary, content=content: temporary.write_text(content))
    return summaries
