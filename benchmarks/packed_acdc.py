"""Reading ``benchmarks/pack_acdc_3d.py``'s file: the packed ACDC volumes as the trainer's datasets
(volumes or labelled slices) and as :func:`diffusereg.evaluation.evaluate` reads a dataset, with
neither the ACDC files nor SimpleITK (what ``benchmarks/gpu_budget.py`` trains and scores on)."""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusereg.data import ModelGrid, PaperPreprocessing, PreprocessedPair
from diffusereg.io import Grid

IMAGE_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels")
Item = dict[str, Any]


class Items(Dataset):
    """A list of items as a dataset."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]


def labelled_slices(volumes: list[Item]) -> list[Item]:
    """2D items of the slices where either frame holds a label (``skip_empty_slices``)."""
    items = []
    for item in volumes:
        for d in range(item["fixed"].shape[1]):
            if item["fixed_labels"][0, d].any() or item["moving_labels"][0, d].any():
                items.append({**{key: item[key][:, d] for key in IMAGE_KEYS},
                              "patient": item["patient"], "group": item["group"], "slice": d})
    return items


class PackedCases:
    """Packed volumes as :func:`diffusereg.evaluation.evaluate` reads a dataset: case names, groups
    and preprocessed pairs on the model grid (the packed arrays are that grid; the original
    images are not shipped, so the pairs' grids are the model grid itself)."""

    spatial_dims = 3

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.names = [item["patient"] for item in items]
        shape = tuple(items[0]["fixed"].shape[1:])
        grid = Grid(shape, PaperPreprocessing().spacing, (0.0, 0.0, 0.0), tuple(np.eye(3).flatten()))
        self.grid = ModelGrid(grid, grid, (0, 0, 0), grid)

    def metadata(self, index: int) -> dict[str, str]:
        return {"patient": self.items[index]["patient"], "group": self.items[index]["group"]}

    def preprocessed(self, index: int) -> PreprocessedPair:
        arrays = [self.items[index][key][0].numpy() for key in IMAGE_KEYS]
        return PreprocessedPair(*arrays, grid=self.grid)


@dataclass(frozen=True)
class PackedData:
    """The packed volumes, items as :mod:`diffusereg.data` gives them: ``fixed``, ``moving``
    ``(1, D, H, W)`` float32 in ``[0, 1]``, labels int64, ``patient`` and ``group``."""

    train: list[Item]
    val: list[Item]

    def dataset(self, split: str, spatial_dims: int, max_items: int | None = None) -> Items:
        """A split as the trainer reads it: the volumes (3D) or their labelled slices (2D)."""
        chosen = self.train if split == "train" else self.val
        return Items((labelled_slices(chosen) if spatial_dims == 2 else chosen)[:max_items])


def load_data(path: str, smoke: bool) -> PackedData:
    """Read a ``benchmarks/pack_acdc_3d.py`` file; ``smoke`` crops every volume to its central 64 x 64."""
    with lzma.open(path, "rb") as f:
        names, groups, n_train = np.load(f), np.load(f), int(np.load(f)[0])
        fixed = np.cumsum(np.load(f), axis=1, dtype=np.uint8)
        moving = np.cumsum(np.load(f), axis=1, dtype=np.uint8)
        fixed_labels, moving_labels = np.load(f), np.load(f)
    items = []
    for i in range(len(names)):
        item = {
            "fixed": torch.from_numpy(fixed[i]).float()[None] / 255.0,
            "moving": torch.from_numpy(moving[i]).float()[None] / 255.0,
            "fixed_labels": torch.from_numpy(fixed_labels[i].astype(np.int64))[None],
            "moving_labels": torch.from_numpy(moving_labels[i].astype(np.int64))[None],
            "patient": str(names[i]), "group": str(groups[i]),
        }
        if smoke:
            item.update({key: item[key][:, :, 32:96, 32:96].contiguous() for key in IMAGE_KEYS})
        items.append(item)
    return PackedData(items[:n_train], items[n_train:])
