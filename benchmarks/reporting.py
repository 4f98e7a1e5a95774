"""What the benchmark scripts share for their reports: the slice a figure shows, figures drawn
without pyplot state and written atomically, and the JSON + Markdown pair with the run's settings.

The scripts import it as a sibling module (``python benchmarks/<script>.py`` puts ``benchmarks/``
on the path).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusereg.data import PreprocessedPair
from diffusereg.io import write_atomically


@dataclass(frozen=True)
class FigureSlice:
    """The slice a figure draws of one case: a depth index and an in-plane crop around the heart."""

    name: str
    pair: PreprocessedPair
    depth: int
    crop: tuple[slice, slice]

    @classmethod
    def around_heart(cls, name: str, pair: PreprocessedPair, depth: int | None, margin: int = 16) -> "FigureSlice":
        """The slice ``depth`` (default: the one with most fixed heart voxels), cropped to the heart +- ``margin``."""
        heart = pair.fixed_labels > 0
        if depth is None:
            depth = int(np.argmax(heart.sum(axis=(1, 2))))
        rows, cols = np.nonzero(heart[depth] if heart[depth].any() else np.ones_like(heart[depth]))
        height, width = heart.shape[1:]
        crop = (slice(max(rows.min() - margin, 0), min(rows.max() + margin + 1, height)),
                slice(max(cols.min() - margin, 0), min(cols.max() + margin + 1, width)))
        return cls(name, pair, depth, crop)

    def cut(self, volume: np.ndarray) -> np.ndarray:
        """The cropped slice ``(h, w)`` of a volume ``(D, H, W)``."""
        return volume[self.depth][self.crop]

    def show_fixed(self, ax: Axes, title: str) -> None:
        """The fixed image, grey, no ticks."""
        ax.imshow(self.cut(self.pair.fixed), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()


def new_figure(panels: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure with ``panels`` axes side by side and a title (Agg canvas, no pyplot state)."""
    figure = Figure(figsize=(3.6 * panels, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    figure.suptitle(title, fontsize=9)
    return figure, list(axes)


def save_figure(figure: Figure, path: Path) -> None:
    """Write a PNG atomically."""
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight"))


def figure_case_name(names: Sequence[str], patient: int | None) -> str:
    """The case a figure shows: ``patient<NNN>`` for ``patient`` (a ``--figure-patient``), else the first of ``names``."""
    name = names[0] if patient is None else f"patient{patient:03d}"
    if name not in names:
        raise ValueError(f"--figure-patient: {name} is not among the cases {list(names)}")
    return name


def run_settings(args: argparse.Namespace, argv: Sequence[str] | None, script: str) -> dict[str, Any]:
    """The parsed options (paths as text), the torch version and the command line that ran ``script``
    (``argv``, or ``sys.argv`` when the script was started from the shell)."""
    command = sys.argv if argv is None else [script, *argv]
    return {**{key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "torch": torch.__version__, "command": shlex.join(command)}


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf as None and NumPy scalars as Python numbers, for strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(json_path: Path, report: dict[str, Any], markdown_path: Path, markdown: Sequence[str]
                 ) -> dict[str, Any]:
    """Write ``report`` as strict JSON and the ``markdown`` parts, joined by newlines, as text, each
    atomically; print the Markdown and return the report as written (:func:`json_ready`)."""
    report = json_ready(report)
    text = "\n".join(markdown)
    write_atomically(json_path, lambda temporary: temporary.write_text(json.dumps(report, indent=2) + "\n"))
    write_atomically(markdown_path, lambda temporary: temporary.write_text(text))
    print(text)
    return report
