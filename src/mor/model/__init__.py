"""The Mixture-of-Recursions model: layers, sharing plans, routers and the causal language model."""

from mor.model.mor import MoRForCausalLM, MoRModel, MoROutput

__all__ = ["MoRForCausalLM", "MoRModel", "MoROutput"]
