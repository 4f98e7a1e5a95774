"""Where pipelines come from, and the checks of their weights before they load.

A short name such as ``"diffusereg/acdc-2d"`` first resolves to the copy bundled with the
package (``diffusereg/pretrained/acdc-2d/``), which loads offline on a fresh install; any other
name is passed on unchanged (a local folder, or a Hub repo id loaded by ``huggingface_hub``).
:func:`check_weights` refuses pickle weights unless trusted and weights that do not match their
config; :func:`load_pipeline` loads a pipeline with one-line errors (what the command line uses).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from diffusereg.validation import RegistrationError


__all__ = ["BUNDLED_MODELS", "PICKLE_SUFFIXES", "PRETRAINED_DIR", "ModelNotFoundError", "WeightsError",
           "bundled_model_path", "check_weights", "load_pipeline", "resolve_model"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
"""Folder of the bundled pipelines, one ``save_pretrained`` folder each."""

BUNDLED_MODELS: dict[str, str] = {
    "diffusereg/acdc-2d": "acdc-2d",
    "diffusereg/acdc-2d-paper": "acdc-2d-paper",
}
"""Short model names and their folders under :data:`PRETRAINED_DIR`."""


def bundled_model_path(name: str) -> Path | None:
    """The bundled folder of ``name`` when the package ships it (``model_index.json`` present), else None."""
    folder = BUNDLED_MODELS.get(name)
    if folder is None:
        return None
    path = PRETRAINED_DIR / folder
    return path if (path / "model_index.json").is_file() else None


def resolve_model(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """``name_or_path`` itself, unless it is a bundled model name: then its bundled folder."""
    bundled = bundled_model_path(str(name_or_path))
    return str(bundled) if bundled is not None else name_or_path


PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files in Python's pickle format, which can run code when loaded."""


class WeightsError(RegistrationError):
    """A saved pipeline's weights are refused: pickle (untrusted), corrupt or truncated, or not
    the tensors its config builds."""


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file (its header only)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path}: weights file is corrupt or truncated ({error})") from error


def _config_shapes(library: str, class_name: str, folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the model ``folder/config.json`` builds (on the meta
    device: no memory, no weights)."""
    model_class = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        model = model_class.from_config(model_class.load_config(folder))
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _shapes_difference(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """How a weights file's tensors differ from the config's (one example), or None."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} tensors the config has no place for, e.g. {extra[0]}"
    for key, shape in found.items():
        if shape != expected[key]:
            return f"{key} has shape {list(shape)}, the config makes it {list(expected[key])}"
    return None


def check_weights(folder: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Check a saved pipeline folder (``save_pretrained`` output) before it loads.

    For each component listed in ``model_index.json``: pickle weight files (``PICKLE_SUFFIXES``)
    without a safetensors file beside them are refused unless ``allow_pickle``; every
    safetensors file must be complete, and, for diffusereg's own models, hold exactly the
    tensors (names and shapes) that the component's ``config.json`` builds. (diffusers would
    otherwise load mismatched weights with a warning, leaving some layers random.)

    Raises:
        WeightsError: naming the file and the problem, one line.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return  # not a saved pipeline; the loader says so
    for component, entry in json.loads(index_file.read_text()).items():
        subfolder = folder / component
        if component.startswith("_") or not isinstance(entry, list) or not subfolder.is_dir():
            continue
        tensor_files = sorted(subfolder.glob("*.safetensors"))
        pickles = sorted(p for p in subfolder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not tensor_files and not allow_pickle:
            raise WeightsError(f"{pickles[0]}: pickle weights can run code when loaded and are refused; convert them "
                               "to safetensors, or pass --trust-pickle-weights (allow_pickle=True) if you trust their "
                               "source")
        found = {key: shape for path in tensor_files for key, shape in _tensor_shapes(path).items()}
        library, class_name = entry
        if tensor_files and str(library).split(".")[0] == "diffusereg":
            difference = _shapes_difference(found, _config_shapes(library, class_name, subfolder))
            if difference is not None:
                raise WeightsError(f"{subfolder}: weights do not match its config.json ({difference})")
