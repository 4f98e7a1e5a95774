"""Pipelines: inputs in, sampling loop, outputs out; the model-grid batch between them; loading one."""

from diffusereg.pipelines.layout import ModelGridBatch
from diffusereg.pipelines.loading import ModelNotFoundError, load_pipeline
from diffusereg.pipelines.pipeline_diffusereg import DiffuseRegPipeline, DiffuseRegPipelineOutput

__all__ = ["DiffuseRegPipeline", "DiffuseRegPipelineOutput", "ModelGridBatch", "ModelNotFoundError", "load_pipeline"]
