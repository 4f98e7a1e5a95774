"""Where pipelines come from: models shipped inside the package, then the Hugging Face Hub.

A short name such as ``"diffusereg/acdc-2d"`` first resolves to the copy bundled with the
package (``diffusereg/pretrained/acdc-2d/``), which loads offline on a fresh install; any other
name is passed on unchanged (a local folder, or a Hub repo id loaded by ``huggingface_hub``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_MODELS", "PRETRAINED_DIR", "bundled_model_path", "resolve_model"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
"""Folder of the bundled pipelines, one ``save_pretrained`` folder each."""

BUNDLED_MODELS: dict[str, str] = {
    "diffusereg/acdc-2d": "acdc-2d",
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
