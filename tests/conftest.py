"""Shared pytest fixtures: the ACDC data folder, tiny untrained pipelines (``tiny.py``) saved to disk, and the
benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from diffusereg.pipelines import DiffuseRegPipeline
from tiny import save_tiny_pipeline


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    """The ACDC training folder, expected at ``../shared/data/acdc/training`` beside the checkout."""
    root = Path(__file__).resolve().parents[1].parent / "shared/data/acdc/training"
    if not root.is_dir():
        pytest.skip(
            f"ACDC training data not found at {root}; real-data tests need ../shared/data/acdc beside the checkout"
        )
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved untrained 2D pipeline (registers 2D images, and volumes slice by slice)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny", spatial_dims=2)


@pytest.fixture(scope="session")
def tiny_model_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved untrained 3D pipeline (registers volumes only)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny3d", spatial_dims=3)


@pytest.fixture(scope="session")
def coarse_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2D pipeline on a coarse model grid (8 x 8 x 10 mm, 8 x 32 x 32), where the whole
    cardiac phantom fits and a sampling step takes about 0.1 s on a CPU."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "coarse", spatial_dims=2,
                               model_spacing=(8.0, 8.0, 10.0), model_size=(8, 32, 32))


@pytest.fixture(scope="session")
def coarse_tiny_model_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 3D pipeline on a coarse model grid (8 x 8 x 2.5 mm, 32 x 32 x 32: a 3D model
    needs sizes that are multiples of 32), where the whole cardiac phantom fits."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "coarse3d", spatial_dims=3,
                               model_spacing=(8.0, 8.0, 2.5), model_size=(32, 32, 32))


@pytest.fixture(scope="session")
def with_teacher():
    """``with_teacher(model, folder)``: a copy of the saved pipeline ``model`` in ``folder`` with a
    small untrained teacher component; returns ``folder``."""
    from diffusereg.models import RegistrationNet

    def copy_with_teacher(model: Path, folder: Path) -> Path:
        pipe = DiffuseRegPipeline.from_pretrained(model)
        torch.manual_seed(0)
        pipe.register_modules(teacher=RegistrationNet(spatial_dims=pipe.spatial_dims, channels=(8, 8, 8, 8),
                                                      unet_out_channels=8, final_conv_channels=(8,)))
        pipe.save_pretrained(folder)
        return folder

    return copy_with_teacher


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """``benchmark_script(name)``: ``benchmarks/<name>.py`` as a module, registered in ``sys.modules``
    (as its dataclasses need) with ``benchmarks/`` on the path (as running it from the shell puts
    it, for its sibling modules)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str) -> ModuleType:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
