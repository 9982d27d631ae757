"""The Mixture-of-Recursions model: layers, sharing plans, routers and the causal language model."""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.model.mor import MoRForCausalLM, MoRModel, MoROutput

__all__ = ["MoRForCausalLM", "MoRModel", "MoROutput"]
lazy_exports(__name__, {"mor.model.mor": tuple(__all__)})
