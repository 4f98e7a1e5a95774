"""Shared machinery of the pair datasets: lazy preprocessing, per-case cache, 2D slicing, items.

Item format (a dict), for every dataset built on `PairDataset`:

- ``fixed``, ``moving``: float32 tensors ``(1, D, H, W)`` (3D) or ``(1, H, W)`` (2D), in ``[0, 1]``
  on the model grid;
- ``fixed_labels``, ``moving_labels``: int64 tensors of the same shape, when the case has labels;
- ``slice``: index along ``D`` of the model grid, for 2D items cut from 3D volumes;
- the dataset's own metadata strings (``patient`` and ``group`` for ACDC, ``case`` for paired lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusereg.data.preprocessing import PaperPreprocessing, PreprocessedPair
from diffusereg.io import Image, read_grid, read_image

__all__ = ["PairCase", "PairDataset", "PairFiles"]


@dataclass(frozen=True)
class PairFiles:
    """Paths of one registration case: fixed and moving images, optional label maps."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    @property
    def has_labels(self) -> bool:
        """True when both label maps are given."""
        return self.fixed_labels is not None and self.moving_labels is not None


@dataclass(frozen=True, eq=False)
class PairCase:
    """One case with its original images and its preprocessed pair.

    Attributes:
        name: the case's identifier (e.g. ``patient001``).
        fixed, moving, fixed_labels, moving_labels: the images as read (original grids).
        preprocessed: arrays on the model grid and the `ModelGrid` that maps back to ``fixed``.
    """

    name: str
    fixed: Image
    moving: Image
    fixed_labels: Image | None
    moving_labels: Image | None
    preprocessed: PreprocessedPair


class PairDataset(Dataset):
    """Base class: a list of fixed/moving cases, preprocessed lazily and cached in memory.

    Subclasses pass the cases' files and names and may override `metadata`. With
    ``spatial_dims=2`` and 3D volumes, items are the model-grid slices along ``D`` that lie
    inside the resampled fixed image (zero-padded slices are left out); with
    ``skip_empty_slices=True`` slices where both label maps are empty are left out too (this
    preprocesses every case's labels when the dataset is built). 2D input images give one item
    per case. The cache is per process (each DataLoader worker fills its own).
    """

    def __init__(
        self,
        files: list[PairFiles],
        names: list[str],
        spatial_dims: int = 3,
        skip_empty_slices: bool = False,
        preprocessing: PaperPreprocessing = PaperPreprocessing(),
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if skip_empty_slices and spatial_dims != 2:
            raise ValueError("skip_empty_slices applies to spatial_dims=2 only")
        if skip_empty_slices and not all(f.has_labels for f in files):
            raise ValueError("skip_empty_slices needs fixed and moving labels for every case")
        self.files = files
        self.names = names
        self.spatial_dims = spatial_dims
        self.skip_empty_slices = skip_empty_slices
        self.preprocessing = preprocessing
        self._cache: dict[int, PreprocessedPair] = {}
        self._index = self._build_index()

    def metadata(self, case_index: int) -> dict[str, str]:
        """Strings added to every item of a case (override in subclasses)."""
        return {"case": self.names[case_index]}

    def _slices(self, case_index: int) -> list[int | None]:
        """Indices along the model grid's ``D`` axis that give the 2D items of one case."""
        grid = read_grid(self.files[case_index].fixed)
        if grid.ndim == 2:
            return [None]
        if self.skip_empty_slices:
            fixed_labels, moving_labels = self.preprocessed_labels(case_index)
            occupied = np.any(fixed_labels > 0, axis=(1, 2)) | np.any(moving_labels > 0, axis=(1, 2))
            return [int(d) for d in np.flatnonzero(occupied)]
        depth_region = self.preprocessing.model_grid(grid).data_region[0]
        return list(range(depth_region.start, depth_region.stop))

    def _build_index(self) -> list[tuple[int, int | None]]:
        """(case index, slice index or None) for every item."""
        if self.spatial_dims == 3:
            for files in self.files:
                if read_grid(files.fixed).ndim != 3:
                    raise ValueError(f"{files.fixed}: is a 2D image; use spatial_dims=2")
            return [(case, None) for case in range(len(self.files))]
        return [(case, d) for case in range(len(self.files)) for d in self._slices(case)]

    def __len__(self) -> int:
        return len(self._index)

    def preprocessed_labels(self, case_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Fixed and moving label maps of a case on the model grid, without touching the images
        (nearest-neighbour resampling only; much faster than the full preprocessing)."""
        files = self.files[case_index]
        if not files.has_labels:
            raise ValueError(f"case {self.names[case_index]} has no label maps")
        if case_index in self._cache:
            pair = self._cache[case_index]
            return pair.fixed_labels, pair.moving_labels
        grid = self.preprocessing.model_grid(read_grid(files.fixed))
        return (
            self.preprocessing.to_model_grid(read_image(files.fixed_labels), grid, "labels"),
            self.preprocessing.to_model_grid(read_image(files.moving_labels), grid, "labels"),
        )

    def case(self, case_index: int) -> PairCase:
        """The original images of a case (read from disk) and its (cached) preprocessed pair.

        ``case_index`` counts cases (see ``names``), not items.
        """
        files = self.files[case_index]
        fixed, moving = read_image(files.fixed), read_image(files.moving)
        fixed_labels = read_image(files.fixed_labels) if files.fixed_labels else None
        moving_labels = read_image(files.moving_labels) if files.moving_labels else None
        if case_index not in self._cache:
            self._cache[case_index] = self.preprocessing(fixed, moving, fixed_labels, moving_labels)
        return PairCase(self.names[case_index], fixed, moving, fixed_labels, moving_labels, self._cache[case_index])

    def preprocessed(self, case_index: int) -> PreprocessedPair:
        """The preprocessed pair of a case (computed on first use, then cached)."""
        if case_index not in self._cache:
            self.case(case_index)
        return self._cache[case_index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        case_index, depth = self._index[index]
        pair = self.preprocessed(case_index)

        def tensor(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
            selected = array if depth is None else array[depth]
            return torch.from_numpy(np.ascontiguousarray(selected, dtype=dtype)[None])

        item: dict[str, torch.Tensor | str | int] = {
            "fixed": tensor(pair.fixed, np.float32),
            "moving": tensor(pair.moving, np.float32),
        }
        if pair.fixed_labels is not None:
            item["fixed_labels"] = tensor(pair.fixed_labels, np.int64)
        if pair.moving_labels is not None:
            item["moving_labels"] = tensor(pair.moving_labels, np.int64)
        if depth is not None:
            item["slice"] = depth
        item.update(self.metadata(case_index))
        return item
