"""Datasets of fixed/moving pairs and the paper's preprocessing (and its inverse).

- `PaperPreprocessing`: resample to 1.5 x 1.5 x 3.15 mm, scale intensities to [0, 1],
  centre crop/pad to 32 x 128 x 128; its `ModelGrid` maps images and fields back.
- `ACDCDataset`: ACDC ED (fixed) / ES (moving) pairs with labels (or ES fixed: ``fixed_frame``),
  fixed train/val split.
- `PairedDataset`: pairs listed in a CSV or JSON file.
"""

from diffusereg.data.acdc import ACDC_VALIDATION_PATIENTS, ACDCDataset, ACDCPatient, read_acdc_patient
from diffusereg.data.base import PairCase, PairDataset, PairFiles
from diffusereg.data.paired import PairedDataset, read_pair_list
from diffusereg.data.preprocessing import (
    ModelGrid,
    PaperPreprocessing,
    PreprocessedPair,
    resample_to_grid,
    scale_intensities,
)

__all__ = [
    "ACDC_VALIDATION_PATIENTS",
    "ACDCDataset",
    "ACDCPatient",
    "ModelGrid",
    "PairCase",
    "PairDataset",
    "PairFiles",
    "PairedDataset",
    "PaperPreprocessing",
    "PreprocessedPair",
    "read_acdc_patient",
    "read_pair_list",
    "resample_to_grid",
    "scale_intensities",
]
