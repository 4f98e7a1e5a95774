"""Pipelines: inputs in, sampling loop, outputs out; the model-grid batch between them."""

from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.pipelines.pipeline_diffusereg import DiffuseRegPipeline, DiffuseRegPipelineOutput

__all__ = ["DiffuseRegPipeline", "DiffuseRegPipelineOutput", "ModelGridBatch"]
