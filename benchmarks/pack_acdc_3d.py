"""Pack ACDC for a GPU machine that has neither the data nor SimpleITK (the lent device machine).

Preprocesses every pair as the paper does (3D, 32 x 128 x 128, `ACDCDataset`), keeps the ten
validation patients and ``--train-patients`` training patients spread evenly over the five disease
groups, and writes into ``--output``:

- ``acdc3d.xz``: images quantised to uint8 (steps of 1/255 of the [0, 1] range) stored as
  wrap-around differences along depth (they compress ~15 % better), uint8 labels, patient names
  and groups; lzma, read with `numpy.load` (no pickle). 70 patients: about 30 MB.
- ``stubs/SimpleITK`` and ``stubs/nibabel``: import-time stand-ins (any use raises), so that
  ``diffusereg`` imports where those packages are missing; ``benchmarks/gpu_budget.py`` never
  reads or writes image files.

Usage: ``python benchmarks/pack_acdc_3d.py --acdc ../shared/data/acdc/training --output .gpu``
"""

from __future__ import annotations

import argparse
import lzma
from pathlib import Path

import numpy as np

from diffusereg.data import ACDC_VALIDATION_PATIENTS, ACDCDataset

STUB = '''"""Import-time stand-in (benchmarks/pack_acdc_3d.py): this machine lacks the package; any use raises."""
import sys


class _Missing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{__name__} is not installed on this machine")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    stand_in = type(name, (_Missing,), {})
    setattr(sys.modules[__name__], name, stand_in)
    return stand_in
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acdc", default="../shared/data/acdc/training")
    parser.add_argument("--train-patients", type=int, default=60)
    parser.add_argument("--output", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    train_all = [p.name for p in ACDCDataset(args.acdc, split="train", spatial_dims=3).patients]
    chosen = np.round(np.linspace(0, len(train_all) - 1, args.train_patients)).astype(int)
    names = [train_all[i] for i in chosen] + sorted(ACDC_VALIDATION_PATIENTS)
    dataset = ACDCDataset(args.acdc, split="all", spatial_dims=3, patients=names)
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    for index in range(len(dataset)):
        item = dataset[index]
        for key in arrays:
            volume = item[key].numpy()[0]
            arrays[key].append(np.round(volume * 255).astype(np.uint8) if key in ("fixed", "moving")
                               else volume.astype(np.uint8))
    args.output.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.output / "acdc3d.xz", "wb", preset=6) as stream:
        np.save(stream, np.array(names))
        np.save(stream, np.array([p.group for p in dataset.patients]))
        np.save(stream, np.array([args.train_patients]))
        for key in ("fixed", "moving"):
            volumes = np.stack(arrays[key])
            np.save(stream, np.diff(volumes, axis=1, prepend=np.zeros_like(volumes[:, :1])).astype(np.uint8))
        for key in ("fixed_labels", "moving_labels"):
            np.save(stream, np.stack(arrays[key]))
    for package in ("SimpleITK", "nibabel"):
        (args.output / "stubs" / package).mkdir(parents=True, exist_ok=True)
        (args.output / "stubs" / package / "__init__.py").write_text(STUB)
    print(f"{args.output / 'acdc3d.xz'}: {len(names)} patients ({args.train_patients} training)")


if __name__ == "__main__":
    main()
