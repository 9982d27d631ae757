"""Inference: sampling, cached generation and the continuous depth-wise batching engine."""

from mor.infer.generate import GenerationOutput, generate
from mor.infer.sampling import SamplingParams

__all__ = ["GenerationOutput", "SamplingParams", "generate"]
