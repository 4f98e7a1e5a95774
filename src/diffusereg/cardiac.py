"""The cardiac readout (``diffusereg cardiac``): labels of one cine frame carried to the other by
registration, then LV and RV volumes, ejection fractions, LV mass and LV myocardial strain.

Given the end-diastole (ED) and end-systole (ES) images and the labels of one of them, the readout
registers in the direction that carries those labels to the other frame: labels of ED -> ES is
the fixed image and ED the moving one (and the other way round for labels of ES). The carried
labels (nearest neighbour, on the other frame's own grid) stand in for that frame's segmentation:

- LV and RV end-diastolic and end-systolic volumes (ml, voxel counts times voxel volume) and
  ejection fractions (%), :mod:`diffusereg.metrics`;
- LV myocardial mass (g): the ED myocardium times 1.05 g/ml;
- radial and circumferential strain of the LV myocardium (%, Lagrangian engineering strain,
  ED reference), global and per slice of the fixed frame, from the field (:mod:`diffusereg.strain`).

Labels use ACDC's values (1 RV cavity, 2 LV myocardium, 3 LV cavity) unless a ``label_map``
names others. :func:`write_cardiac_report` writes ``report.json`` (last), ``report.csv`` and
``report.png`` into a folder, each atomically. Research use only: nothing here is validated for
clinical decisions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffusereg.data.acdc import Frame
from diffusereg.guidance import build_guides
from diffusereg.io import Image, write_atomically
from diffusereg.metrics import ACDC_LABELS, ejection_fraction, label_volume_ml, myocardial_mass_g, njd_percent
from diffusereg.pipelines.layout import as_image
from diffusereg.registration import RegistrationSettings
from diffusereg.schedulers import scheduler_of_kind
from diffusereg.strain import MyocardialStrain, myocardial_strain
from diffusereg.validation import RegistrationError, source_name

if TYPE_CHECKING:
    from diffusereg.pipelines import DiffuseRegPipeline

__all__ = ["REPORT_NAMES", "CardiacReadout", "cardiac_readout", "parse_label_map", "to_acdc_labels",
           "write_cardiac_report"]

REPORT_NAMES: dict[str, str] = {"csv": "report.csv", "picture": "report.png", "json": "report.json"}
"""The files :func:`write_cardiac_report` writes, in writing order (``report.json`` last)."""

Source = Image | str | os.PathLike


def parse_label_map(text: str) -> dict[str, int]:
    """``"LV=3,Myo=2,RV=1"`` -> ``{"LV": 3, "Myo": 2, "RV": 1}``: the label values of the three
    structures in the user's label maps.

    Raises:
        RegistrationError: a structure other than LV, Myo, RV; a missing one; a value that is not
            a positive integer, or used twice.
    """
    mapping: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in ACDC_LABELS or not value.strip().isdigit() or int(value) == 0:
            raise RegistrationError(f"--label-map {text!r}: write it as LV=V,Myo=V,RV=V with positive integer values")
        mapping[name] = int(value)
    missing = [name for name in ACDC_LABELS if name not in mapping]
    if missing or len(set(mapping.values())) != len(mapping):
        raise RegistrationError(f"--label-map {text!r}: give each of LV, Myo and RV one distinct value")
    return mapping


def to_acdc_labels(labels: Image, label_map: dict[str, int] = ACDC_LABELS, name: str = "labels") -> Image:
    """``labels`` with the values of ``label_map`` turned into ACDC's (1 RV, 2 Myo, 3 LV), every
    other value 0.

    Raises:
        RegistrationError: a structure's value is absent from ``labels``, naming it and the
            values present.
    """
    present = {int(value) for value in np.unique(labels.array)}
    missing = [f"{structure} ({value})" for structure, value in label_map.items() if value not in present]
    if missing:
        raise RegistrationError(
            f"{name}: the readout needs LV cavity, LV myocardium and RV cavity labels; {', '.join(missing)} "
            f"not found among the values {sorted(present)} (give yours with --label-map LV=V,Myo=V,RV=V)")
    acdc = np.zeros(labels.array.shape, dtype=np.uint8)
    for structure, value in label_map.items():
        acdc[labels.array == value] = ACDC_LABELS[structure]
    return labels.with_array(acdc)


@dataclass(frozen=True, eq=False)
class CardiacReadout:
    """What :func:`cardiac_readout` measured.

    Attributes:
        labels_frame: the frame whose labels were given (``"ED"`` or ``"ES"``).
        ed, es: the two images as read.
        ed_labels, es_labels: ACDC label maps on each image's grid, one given, one carried.
        field: ``(3, D, H, W)`` displacement of the registration, voxels of the fixed frame (the
            other frame than ``labels_frame``).
        volumes: ``{"LV": {...}, "RV": {...}}`` with ``EDV`` and ``ESV`` (ml), ``EF`` (%), and
            the LV's ``mass`` (g).
        strain: LV myocardial strain, percent, per slice of the fixed frame.
        seconds: duration of the registration call.
        steps_run: sampling steps that ran.
    """

    labels_frame: Frame
    ed: Image
    es: Image
    ed_labels: Image
    es_labels: Image
    field: np.ndarray
    volumes: dict[str, dict[str, float]]
    strain: MyocardialStrain
    seconds: float
    steps_run: int

    @property
    def fixed_frame(self) -> Frame:
        """The frame registered onto: the one whose labels were carried there."""
        return "ES" if self.labels_frame == "ED" else "ED"


def _volumes(ed_labels: Image, es_labels: Image) -> dict[str, dict[str, float]]:
    """LV and RV volumes (ml) and EF (%), and the LV mass (g) of the ED myocardium."""
    volumes: dict[str, dict[str, float]] = {}
    for chamber in ("LV", "RV"):
        edv = label_volume_ml(ed_labels.array, ACDC_LABELS[chamber], ed_labels.axis_spacing)
        esv = label_volume_ml(es_labels.array, ACDC_LABELS[chamber], es_labels.axis_spacing)
        volumes[chamber] = {"EDV": edv, "ESV": esv, "EF": ejection_fraction(edv, esv)}
    volumes["LV"]["mass"] = myocardial_mass_g(ed_labels.array, ed_labels.axis_spacing)
    return volumes


def cardiac_readout(pipe: DiffuseRegPipeline, ed: Source, es: Source, labels: Source,
                    labels_frame: Frame = "ED", label_map: dict[str, int] = ACDC_LABELS,
                    settings: RegistrationSettings = RegistrationSettings()) -> CardiacReadout:
    """Carry the labels of one frame to the other and measure (see the module docstring).

    Args:
        pipe: the registration pipeline (a 2D model registers the stack slice by slice).
        ed, es: the end-diastole and end-systole short-axis stacks (files or
            :class:`~diffusereg.io.Image`, 3D, any geometry).
        labels: label map of ``labels_frame``, on that image's grid.
        labels_frame: ``"ED"`` (registers ES fixed, ED moving) or ``"ES"`` (ED fixed, ES moving).
        label_map: the label values of LV, Myo and RV in ``labels`` (default: ACDC's).
        settings: how to sample (steps, scheduler, guidance without ``organ``, samples, seed,
            start from the teacher); ``save_trajectory`` is ignored.

    Raises:
        RegistrationError: a label value is missing, ``organ`` guidance, 2D images, or a
            teacher start without a teacher.
        diffusereg.io.ImageError: an input cannot be read or does not fit.
    """
    if labels_frame not in ("ED", "ES"):
        raise RegistrationError(f"labels frame must be 'ED' or 'ES', got {labels_frame!r}")
    if any(spec.kind == "organ" for spec in settings.guidance):
        raise RegistrationError("organ guidance needs the labels of both frames; the readout has one frame's")
    if settings.start_from_teacher is not None and pipe.teacher is None:
        raise RegistrationError("start from the teacher: this model has no one-shot teacher component")
    images = {"ED": as_image(ed, "ED"), "ES": as_image(es, "ES")}
    if any(image.ndim != 3 for image in images.values()):
        raise RegistrationError("the cardiac readout needs 3D short-axis stacks (D, H, W) of both frames")
    given = to_acdc_labels(as_image(labels, "labels"), label_map, source_name(labels, "labels"))
    fixed_frame: Frame = "ES" if labels_frame == "ED" else "ED"
    pipe.scheduler = scheduler_of_kind(pipe.scheduler, settings.scheduler)
    start = {} if settings.start_from_teacher is None else {"init_field": "teacher",
                                                             "strength": settings.start_from_teacher}
    started = time.perf_counter()
    out = pipe(images[fixed_frame], images[labels_frame], moving_labels=given, num_inference_steps=settings.steps,
               guidance=build_guides(settings.guidance, None), num_samples=settings.samples,
               generator=torch.Generator().manual_seed(settings.seed), output_type="np", **start)
    seconds = time.perf_counter() - started
    carried = images[fixed_frame].with_array(np.asarray(out.warped_labels).astype(np.uint8))
    frame_labels = {labels_frame: given, fixed_frame: carried}
    strain = myocardial_strain(out.field, carried.array, carried.axis_spacing,
                               "moving" if labels_frame == "ED" else "fixed")
    return CardiacReadout(labels_frame, images["ED"], images["ES"], frame_labels["ED"], frame_labels["ES"],
                          np.asarray(out.field), _volumes(frame_labels["ED"], frame_labels["ES"]), strain, seconds,
                          out.num_steps_run)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _report_dict(readout: CardiacReadout, described: dict[str, Any]) -> dict[str, Any]:
    """What ``report.json`` holds: ``described`` (the inputs, model and settings), the direction,
    volumes, strain (global and per slice; null where a slice has no myocardium) and the field's
    folding."""
    strain = readout.strain
    return {
        **described,
        "labels_frame": readout.labels_frame,
        "direction": f"{readout.labels_frame} labels carried to {readout.fixed_frame} ({readout.fixed_frame} fixed, "
                     f"{readout.labels_frame} moving)",
        "LV": {"EDV_ml": readout.volumes["LV"]["EDV"], "ESV_ml": readout.volumes["LV"]["ESV"],
               "EF_percent": _finite(readout.volumes["LV"]["EF"]), "mass_g": readout.volumes["LV"]["mass"]},
        "RV": {"EDV_ml": readout.volumes["RV"]["EDV"], "ESV_ml": readout.volumes["RV"]["ESV"],
               "EF_percent": _finite(readout.volumes["RV"]["EF"])},
        "strain": {
            "definition": "Lagrangian engineering strain of the LV myocardium, ED reference, percent; radial from "
                          "the LV centroid of each slice, circumferential perpendicular in-plane",
            "slices_of": f"{readout.fixed_frame} image",
            "radial_percent": _finite(strain.radial), "circumferential_percent": _finite(strain.circumferential),
            "per_slice": [{"slice": index, "radial_percent": _finite(radial),
                           "circumferential_percent": _finite(circumferential)}
                          for index, (radial, circumferential) in enumerate(zip(strain.slice_radial,
                                                                                strain.slice_circumferential))],
        },
        "NJD_percent": njd_percent(readout.field),
        "time_seconds": round(readout.seconds, 3),
        "steps_run": readout.steps_run,
        "outputs": list(REPORT_NAMES.values()),
    }


def _report_rows(report: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """``report.csv``'s rows: ``(quantity, value, unit)``."""
    rows: list[tuple[str, float | None, str]] = []
    for chamber in ("LV", "RV"):
        for key, value in report[chamber].items():
            quantity, unit = key.rsplit("_", 1)
            rows.append((f"{chamber}_{quantity}", value, {"percent": "%"}.get(unit, unit)))
    strain = report["strain"]
    rows += [("radial_strain_global", strain["radial_percent"], "%"),
             ("circumferential_strain_global", strain["circumferential_percent"], "%")]
    for item in strain["per_slice"]:
        rows += [(f"radial_strain_slice_{item['slice']}", item["radial_percent"], "%"),
                 (f"circumferential_strain_slice_{item['slice']}", item["circumferential_percent"], "%")]
    return rows


def _mid_slice(labels: np.ndarray) -> int:
    """Index of the middle one of the slices holding LV myocardium and RV (else LV myocardium):
    a mid-ventricular slice."""
    muscle = (labels == ACDC_LABELS["Myo"]).any(axis=(1, 2))
    both = muscle & (labels == ACDC_LABELS["RV"]).any(axis=(1, 2))
    slices = np.flatnonzero(both if both.any() else muscle)
    return int(slices[len(slices) // 2]) if slices.size else labels.shape[0] // 2


def _show_frame(ax: Any, image: Image, labels: Image, index: int, title: str) -> None:
    """One slice of a frame, cropped around the heart, with the contours of its labels."""
    section, outline = image.array[index], labels.array[index]
    rows, cols = np.nonzero(outline > 0) if (outline > 0).any() else np.nonzero(np.ones_like(outline))
    margin = int(round(25.0 / min(image.axis_spacing[1:])))
    crop = (slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
            slice(max(cols.min() - margin, 0), cols.max() + margin + 1))
    ax.imshow(section[crop], cmap="gray", aspect=image.axis_spacing[1] / image.axis_spacing[2],
              interpolation="nearest")
    colours = {"LV": "tab:red", "Myo": "tab:green", "RV": "tab:blue"}
    for structure, value in ACDC_LABELS.items():
        mask = (outline[crop] == value).astype(float)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=colours[structure], linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _save_report_picture(readout: CardiacReadout, path: Path, title: str) -> None:
    """``report.png``: both frames at the mid-ventricle with their contours (given and carried),
    the volumes with the ejection fractions, and the strain per slice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15.0, 3.9), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 4, width_ratios=[1, 1, 1.1, 1.3])
    given = readout.ed_labels if readout.labels_frame == "ED" else readout.es_labels
    index = _mid_slice(given.array)
    for ax, frame, image, labels in ((axes[0], "ED", readout.ed, readout.ed_labels),
                                     (axes[1], "ES", readout.es, readout.es_labels)):
        origin = "given" if frame == readout.labels_frame else "carried by registration"
        _show_frame(ax, image, labels, min(index, image.array.shape[0] - 1), f"{frame}, slice {index}: labels {origin}")
    bars = axes[2]
    for offset, (phase, colour) in enumerate((("EDV", "tab:gray"), ("ESV", "tab:orange"))):
        values = [readout.volumes[chamber][phase] for chamber in ("LV", "RV")]
        bars.bar(np.arange(2) + 0.38 * offset, values, width=0.36, color=colour, label=f"{phase} (ml)")
    bars.set_xticks(np.arange(2) + 0.19, [f"{chamber}\nEF {readout.volumes[chamber]['EF']:.0f} %"
                                         for chamber in ("LV", "RV")])
    bars.set_title(f"volumes; LV mass {readout.volumes['LV']['mass']:.0f} g", fontsize=8)
    bars.legend(fontsize=7)
    curve = axes[3]
    strain = readout.strain
    slices = np.arange(strain.slice_radial.size)
    curve.plot(slices, strain.slice_radial, marker="o", color="tab:purple",
               label=f"radial (global {strain.radial:.0f} %)")
    curve.plot(slices, strain.slice_circumferential, marker="s", color="tab:cyan",
               label=f"circumferential (global {strain.circumferential:.0f} %)")
    curve.axhline(0.0, color="0.5", linewidth=0.8)
    curve.set_xlabel(f"slice of the {readout.fixed_frame} image", fontsize=8)
    curve.set_ylabel("LV myocardial strain (%)", fontsize=8)
    curve.set_title("strain per slice (ED reference)", fontsize=8)
    curve.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def write_cardiac_report(readout: CardiacReadout, output_dir: str | os.PathLike,
                         described: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``report.csv``, ``report.png`` and ``report.json`` (last) into ``output_dir``
    (created if needed), each atomically; an earlier ``report.json`` is removed first, so a folder
    holding one holds a finished report.

    Args:
        readout: what :func:`cardiac_readout` measured.
        output_dir: the folder.
        described: what else ``report.json`` records (inputs, model, settings).

    Returns:
        The report as written to ``report.json``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_NAMES["json"]).unlink(missing_ok=True)
    report = _report_dict(readout, described or {})
    text = "quantity,value,unit\n" + "".join(
        f"{quantity},{'' if value is None else f'{value:.6g}'},{unit}\n" for quantity, value, unit in _report_rows(report))
    write_atomically(output_dir / REPORT_NAMES["csv"], lambda temporary: temporary.write_text(text))
    lv = report["LV"]
    _save_report_picture(readout, output_dir / REPORT_NAMES["picture"],
                        f"{report['direction']}: LV EDV {lv['EDV_ml']:.0f} ml, ESV {lv['ESV_ml']:.0f} ml, "
                        f"EF {readout.volumes['LV']['EF']:.0f} %. Research use, not for clinical decisions.")
    content = json.dumps(report, indent=2) + "\n"
    write_atomically(output_dir / REPORT_NAMES["json"], lambda temporary: temporary.write_text(content))
    return report
