"""diffusereg: deformable image registration by denoising diffusion of the deformation field.

The main names are importable from the top level; they load lazily so that ``import diffusereg``
(and ``diffusereg --version``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

DEFAULT_STEPS = 3
"""Sampling steps when none are asked for (the pipeline call, ``diffusereg register`` and ``demo``,
the watch page): chosen for the shipped model on the validation patients (docs/evaluation.md)."""

_LAZY = {
    "DiffuseRegPipeline": "diffusereg.pipelines",
    "DiffuseRegPipelineOutput": "diffusereg.pipelines",
    "ModelGridBatch": "diffusereg.pipelines",
    "default_scheduler": "diffusereg.schedulers",
    "DiffuseRegDenoiser": "diffusereg.models",
    "ConditionalUNetDenoiser": "diffusereg.models",
    "RegistrationNet": "diffusereg.models",
    "Guide": "diffusereg.guidance",
    "FunctionGuide": "diffusereg.guidance",
    "SmoothnessGuidance": "diffusereg.guidance",
    "FoldGuidance": "diffusereg.guidance",
    "DirectionGuidance": "diffusereg.guidance",
    "OrganMaskGuidance": "diffusereg.guidance",
    "SimilarityGuidance": "diffusereg.guidance",
    "EarlyStopping": "diffusereg.callbacks",
    "TrajectoryRecorder": "diffusereg.callbacks",
    "Image": "diffusereg.io",
    "read_image": "diffusereg.io",
    "write_image": "diffusereg.io",
}

__all__ = ["DEFAULT_STEPS", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffusereg' has no attribute {name!r}")
