"""Training DiffuseReg in two stages on Hugging Face Accelerate.

1. :func:`train_teacher`: a one-shot registration network (unsupervised), whose field phi0 is
   cached for every training pair together with its per-axis mean/std.
2. :func:`train_diffusion`: the denoiser, on phi0 noised by the paper's schedule, with the
   objective :func:`diffusion_loss`; saved as a ``DiffuseRegPipeline``.

Configs are YAML files read into :class:`TeacherConfig` / :class:`DiffusionConfig`
(:func:`load_config`); the shared loop is :class:`Trainer`. See ``docs/training.md``.
"""

from diffusereg.training.config import (
    AugmentConfig,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    DiffusionLossConfig,
    LoopConfig,
    OptimConfig,
    TeacherConfig,
    TeacherLossConfig,
    ValidationConfig,
    load_config,
)
from diffusereg.training.data import FieldStatistics, Phi0Cache
from diffusereg.training.diffusion import DiffusionStage, diffusion_stage, train_diffusion
from diffusereg.training.cascade import CascadeStage
from diffusereg.training.objective import DiffusionLoss, RegistrationLoss, diffusion_loss, registration_loss
from diffusereg.training.teacher import TeacherStage, train_teacher, write_phi0_cache
from diffusereg.training.trainer import Stage, Trainer

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "DiffusionLoss",
    "DiffusionLossConfig",
    "CascadeStage",
    "DiffusionStage",
    "FieldStatistics",
    "LoopConfig",
    "OptimConfig",
    "Phi0Cache",
    "RegistrationLoss",
    "Stage",
    "TeacherConfig",
    "TeacherLossConfig",
    "TeacherStage",
    "Trainer",
    "ValidationConfig",
    "diffusion_loss",
    "diffusion_stage",
    "load_config",
    "registration_loss",
    "train_diffusion",
    "train_teacher",
    "write_phi0_cache",
]
