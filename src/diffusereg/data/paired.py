"""Generic fixed/moving pairs listed in a CSV or JSON file.

CSV: a header row with the columns ``fixed``, ``moving`` and optionally ``fixed_labels``,
``moving_labels`` and ``name``. JSON: a list of objects with the same keys. Relative paths are
resolved against the list file's folder. When a label column/key is used, every row must give it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from diffusereg.data.base import PairDataset, PairFiles
from diffusereg.data.preprocessing import PaperPreprocessing

__all__ = ["PairedDataset", "read_pair_list"]

_REQUIRED = ("fixed", "moving")
_OPTIONAL = ("fixed_labels", "moving_labels", "name")


def _read_rows(list_file: Path) -> list[dict[str, str]]:
    """The list file's rows as dicts of strings (empty CSV cells dropped)."""
    suffix = list_file.suffix.lower()
    if suffix == ".csv":
        with list_file.open(newline="") as stream:
            rows = csv.DictReader(stream)
            return [{k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()} for row in rows]
    if suffix == ".json":
        try:
            rows = json.loads(list_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{list_file}: invalid JSON ({error})") from error
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{list_file}: must hold a JSON list of objects")
        return [{str(k): str(v) for k, v in row.items() if v is not None} for row in rows]
    raise ValueError(f"{list_file}: unsupported list file; use .csv or .json")


def read_pair_list(list_file: str | os.PathLike) -> tuple[list[PairFiles], list[str]]:
    """Parse a pair list: the files of each pair and its name (``name`` column, else ``pairNNNN``).

    Raises:
        FileNotFoundError: the list file or a listed file is missing (named, with its row).
        ValueError: a required column is missing, a column is unknown, or rows differ in which
            label columns they give.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: pair list does not exist")
    rows = _read_rows(list_file)
    if not rows:
        raise ValueError(f"{list_file}: lists no pairs")
    label_keys = {key for key in ("fixed_labels", "moving_labels") if key in rows[0]}
    files, names = [], []
    for number, row in enumerate(rows, start=1):
        where = f"{list_file}: row {number}"
        missing = [key for key in _REQUIRED if key not in row]
        if missing:
            raise ValueError(
                f"{where}: missing {', '.join(missing)} (columns: fixed, moving[, fixed_labels, moving_labels, name])"
            )
        unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ValueError(f"{where}: unknown columns {unknown}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
        row_label_keys = {key for key in ("fixed_labels", "moving_labels") if key in row}
        if row_label_keys != label_keys:
            raise ValueError(
                f"{where}: label columns {sorted(row_label_keys)} differ from row 1's {sorted(label_keys)}"
            )
        paths = {key: list_file.parent / row[key] for key in ("fixed", "moving", *label_keys)}
        for key, path in paths.items():
            if not path.exists():  # a file, or a DICOM series folder
                raise FileNotFoundError(f"{where}: {key} file {path} does not exist")
        files.append(PairFiles(**paths))
        names.append(row.get("name", f"pair{number:04d}"))
    return files, names


class PairedDataset(PairDataset):
    """Fixed/moving pairs from a CSV or JSON list, preprocessed like ACDC.

    Args:
        list_file: ``.csv`` or ``.json`` pair list (see the module docstring).
        spatial_dims: 3 for volumes ``(1, D, H, W)``; 2 for model-grid slices ``(1, H, W)`` of
            3D volumes, or whole 2D images.
        skip_empty_slices: 2D only; leave out slices where both label maps are empty.
        preprocessing: the preprocessing to the model grid.

    Items are dicts (see `diffusereg.data.base`) with ``fixed``, ``moving``, the label maps when
    listed, and ``case`` (the pair's name).
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        spatial_dims: int = 3,
        skip_empty_slices: bool = False,
        preprocessing: PaperPreprocessing = PaperPreprocessing(),
    ) -> None:
        files, names = read_pair_list(list_file)
        self.list_file = Path(list_file)
        super().__init__(files, names, spatial_dims, skip_empty_slices, preprocessing)
