"""Inference: sampling, cached generation and the continuous depth-wise batching engine."""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.infer.generate import GenerationOutput, generate
    from mor.infer.sampling import SamplingParams

__all__ = ["GenerationOutput", "SamplingParams", "generate"]
lazy_exports(__name__, {"mor.infer.generate": ("GenerationOutput", "generate"),
                        "mor.infer.sampling": ("SamplingParams",)})
