"""Pipelines: inputs in, sampling loop, outputs out."""

from diffusereg.pipelines.pipeline_diffusereg import DiffuseRegPipeline, DiffuseRegPipelineOutput, default_scheduler

__all__ = ["DiffuseRegPipeline", "DiffuseRegPipelineOutput", "default_scheduler"]
