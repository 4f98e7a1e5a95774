"""Loading a pipeline for the command line and other callers: a bundled name, a folder or a Hub id,
its weights checked first (:mod:`diffusereg.hub`), with one-line errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from diffusereg.hub import WeightsError
from diffusereg.pipelines.pipeline_diffusereg import DiffuseRegPipeline
from diffusereg.validation import RegistrationError

__all__ = ["ModelNotFoundError", "load_pipeline"]


class ModelNotFoundError(RegistrationError):
    """``--model`` names neither a pipeline folder nor a loadable Hugging Face Hub model."""


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' warnings (e.g. "Couldn't connect to the Hub") and its component-loading
    progress bar while a pipeline loads; both settings are restored afterwards."""
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()


def load_pipeline(model: str, device: str | torch.device = "cpu", allow_pickle: bool = False,
                  dtype: str | torch.dtype = torch.float32) -> DiffuseRegPipeline:
    """Load a pipeline from a bundled name, a folder (``save_pretrained`` output) or a Hub id.

    Args:
        model: the name, folder or Hub id.
        device: where the pipeline runs.
        allow_pickle: also load pickle weights (``.bin``); they can run code when loaded, so only
            for weights from a source you trust (see :meth:`DiffuseRegPipeline.from_pretrained`).
        dtype: the networks' weights and arithmetic (diffusers' ``dtype``), e.g. ``"bfloat16"``; the
            pipeline keeps fields, warps and outputs in float32.

    Raises:
        ModelNotFoundError: ``model 'NAME' not found: REASON``, one line.
        WeightsError: pickle weights (not allowed), corrupt or truncated weights, weights that do
            not match the config; naming the file.
        RegistrationError: ``device`` is CUDA but no CUDA device is available.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RegistrationError(f"device {device}: no CUDA device is available; use --device cpu")
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if not path.is_dir() and looks_like_path:
        raise ModelNotFoundError(f"model {model!r} not found: no such folder")
    try:
        with _quiet_loading():
            pipe = DiffuseRegPipeline.from_pretrained(str(path) if path.is_dir() else model, allow_pickle=allow_pickle,
                                                      dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    except WeightsError:
        raise
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 240 else reason[:237] + "..."
        where = "the folder is not a saved pipeline" if path.is_dir() else (
            "not a folder, and not loadable from the Hugging Face Hub or its local cache")
        raise ModelNotFoundError(f"model {model!r} not found: {where} ({reason})") from error
    return pipe.to(device)
