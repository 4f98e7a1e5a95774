"""Atomic Accelerate checkpoints: ``<root>/checkpoint-<step>/`` written via a temporary folder.

A checkpoint is :meth:`accelerate.Accelerator.save_state` (model, optimizer, LR scheduler,
objects registered for checkpointing such as the EMA weights and the step counter, and every
process's RNG states). It is written to ``<root>/.tmp-checkpoint-<step>`` and renamed when
complete, so a run killed while saving never leaves a half-written ``checkpoint-*``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

__all__ = ["TrainingProgress", "checkpoints", "latest_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"checkpoint-(\d+)")


class TrainingProgress:
    """The optimizer-step counter, saved and restored with a checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest (lowest step) first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _NAME.fullmatch(path.name)]
    return sorted(found, key=lambda path: int(_NAME.fullmatch(path.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint with the highest step, or None."""
    found = checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> Path:
    """Save the accelerator's state as ``root/checkpoint-<step>`` atomically; keep the newest
    ``keep`` checkpoints. Every process must call it (each saves its own RNG state)."""
    final = root / f"checkpoint-{step:08d}"
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
