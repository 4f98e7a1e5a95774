"""The ACDC cine-MRI dataset: end-diastole (ED) = fixed, end-systole (ES) = moving (the paper's
direction), or the other way round with ``fixed_frame="ES"``.

``root`` holds ``patientNNN/`` folders, each with ``Info.cfg`` (``ED:``, ``ES:``, ``Group:``, ...),
the ED and ES frames ``patientNNN_frameXX.nii.gz`` and their labels ``patientNNN_frameXX_gt.nii.gz``
(0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity).

Split (deterministic): validation = patients 010, 020, ..., 100 (two per disease group);
train = every other patient in ``root``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffusereg.data.base import PairDataset, PairFiles
from diffusereg.data.preprocessing import PaperPreprocessing

__all__ = ["ACDC_VALIDATION_PATIENTS", "ACDCDataset", "ACDCPatient", "Frame", "read_acdc_patient"]

Frame = Literal["ED", "ES"]
"""A cardiac phase of ACDC: end-diastole or end-systole."""


ACDC_VALIDATION_PATIENTS: tuple[str, ...] = tuple(f"patient{n:03d}" for n in range(10, 101, 10))
"""The validation split: two patients of each group (DCM 010 020, HCM 030 040, MINF 050 060,
NOR 070 080, RV 090 100)."""

_PATIENT_FOLDER = re.compile(r"patient\d{3}")


@dataclass(frozen=True)
class ACDCPatient:
    """One ACDC patient folder, parsed from its ``Info.cfg``.

    Attributes:
        name: folder name, e.g. ``patient001``.
        folder: path of the folder.
        group: disease group (``NOR``, ``MINF``, ``DCM``, ``HCM``, ``RV``).
        ed, es: end-diastole and end-systole frame numbers.
        info: every ``key: value`` of ``Info.cfg`` as strings (e.g. ``Height``, ``Weight``).
    """

    name: str
    folder: Path
    group: str
    ed: int
    es: int
    info: dict[str, str]

    def frame_path(self, frame: int, labels: bool = False) -> Path:
        """Path of a frame's image (or its ``_gt`` labels)."""
        return self.folder / f"{self.name}_frame{frame:02d}{'_gt' if labels else ''}.nii.gz"

    @property
    def files(self) -> PairFiles:
        """ED (fixed) and ES (moving) images and labels."""
        return self.pair_files("ED")

    def pair_files(self, fixed_frame: Frame) -> PairFiles:
        """Images and labels with ``fixed_frame`` (``"ED"`` or ``"ES"``) as the fixed image and
        the other frame as the moving one."""
        if fixed_frame not in ("ED", "ES"):
            raise ValueError(f"fixed_frame must be 'ED' or 'ES', got {fixed_frame!r}")
        fixed, moving = (self.ed, self.es) if fixed_frame == "ED" else (self.es, self.ed)
        return PairFiles(
            fixed=self.frame_path(fixed),
            moving=self.frame_path(moving),
            fixed_labels=self.frame_path(fixed, labels=True),
            moving_labels=self.frame_path(moving, labels=True),
        )


def read_acdc_patient(folder: str | os.PathLike) -> ACDCPatient:
    """Parse ``folder/Info.cfg`` and check that the ED/ES images and labels exist.

    Raises:
        FileNotFoundError: naming the missing ``Info.cfg`` or frame file.
        ValueError: when ``Info.cfg`` lacks ``ED``, ``ES`` or ``Group``, or a frame is not an integer.
    """
    folder = Path(folder)
    config = folder / "Info.cfg"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing; ACDC patient folders need Info.cfg")
    info = {}
    for line in config.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    missing = [key for key in ("ED", "ES", "Group") if key not in info]
    if missing:
        raise ValueError(f"{config}: has no {', '.join(missing)} entry")
    try:
        ed, es = int(info["ED"]), int(info["ES"])
    except ValueError as error:
        raise ValueError(f"{config}: ED/ES are not frame numbers ({info['ED']!r}, {info['ES']!r})") from error
    patient = ACDCPatient(folder.name, folder, info["Group"], ed, es, info)
    for path in (patient.files.fixed, patient.files.moving, patient.files.fixed_labels, patient.files.moving_labels):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; incomplete ACDC patient folder {folder}")
    return patient


class ACDCDataset(PairDataset):
    """ACDC ED (fixed) / ES (moving) pairs with labels, preprocessed as in the paper, or ES (fixed) /
    ED (moving) pairs with ``fixed_frame="ES"``.

    Args:
        root: folder of ``patientNNN/`` folders (e.g. ``.../acdc/training``).
        split: ``"train"`` (all but `ACDC_VALIDATION_PATIENTS`), ``"val"`` or ``"all"``.
        spatial_dims: 3 for volumes ``(1, D, H, W)``, 2 for model-grid slices ``(1, H, W)``.
        patients: optional subset of the split, as names (``"patient001"``) or numbers (``1``).
        skip_empty_slices: 2D only; leave out slices where both label maps are empty.
        preprocessing: the preprocessing to the model grid.
        fixed_frame: the frame registered onto (``"ED"``, the paper's direction, or ``"ES"``); the
            other frame is the moving image. The model grid is the fixed frame's.

    Items are dicts (see `diffusereg.data.base`) with ``fixed``, ``moving``, ``fixed_labels``,
    ``moving_labels``, ``patient`` and ``group`` (and ``slice`` in 2D). ``dataset.case(i)``
    gives patient ``i``'s original images and `ModelGrid`; ``dataset.patients[i]`` its `ACDCPatient`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "val", "all"] = "train",
        spatial_dims: int = 3,
        patients: list[str | int] | None = None,
        skip_empty_slices: bool = False,
        preprocessing: PaperPreprocessing = PaperPreprocessing(),
        fixed_frame: Frame = "ED",
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: ACDC root folder does not exist")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if fixed_frame not in ("ED", "ES"):
            raise ValueError(f"fixed_frame must be 'ED' or 'ES', got {fixed_frame!r}")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and _PATIENT_FOLDER.fullmatch(p.name))
        if not names:
            raise FileNotFoundError(f"{root}: contains no patientNNN folders")
        if split != "all":
            names = [n for n in names if (n in ACDC_VALIDATION_PATIENTS) == (split == "val")]
        if patients is not None:
            wanted = [p if isinstance(p, str) else f"patient{p:03d}" for p in patients]
            unknown = [p for p in wanted if p not in names]
            if unknown:
                raise ValueError(f"{root}: patients {unknown} are not in the {split!r} split")
            names = wanted
        self.root = root
        self.split = split
        self.fixed_frame = fixed_frame
        self.patients = [read_acdc_patient(root / name) for name in names]
        super().__init__(
            files=[p.pair_files(fixed_frame) for p in self.patients],
            names=names,
            spatial_dims=spatial_dims,
            skip_empty_slices=skip_empty_slices,
            preprocessing=preprocessing,
        )

    def metadata(self, case_index: int) -> dict[str, str]:
        """``patient`` (folder name) and ``group`` (disease group) of a case."""
        patient = self.patients[case_index]
        return {"patient": patient.name, "group": patient.group}
