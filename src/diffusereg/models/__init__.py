"""Networks: the DiffuseReg denoiser, a conditional UNet denoiser baseline and the teacher registration net."""

from diffusereg.models.denoiser import DiffuseRegDenoiser
from diffusereg.models.fusion_attention import fusion_attention_mask
from diffusereg.models.interface import (
    PREDICTION_TYPES,
    DenoiserCondition,
    DenoiserOutput,
)
from diffusereg.models.teacher import RegistrationNet
from diffusereg.models.unet_denoiser import ConditionalUNetDenoiser

__all__ = [
    "PREDICTION_TYPES",
    "ConditionalUNetDenoiser",
    "DenoiserCondition",
    "DenoiserOutput",
    "DiffuseRegDenoiser",
    "RegistrationNet",
    "fusion_attention_mask",
]
