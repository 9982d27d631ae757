"""The Mixture-of-Recursions model: layers, sharing plans, routers, the causal language model, its checkpoint
files (:mod:`mor.model.io`) and its FLOP count (:mod:`mor.model.flops`)."""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.model.mor import MoRForCausalLM, MoRModel, MoROutput

__all__ = ["MoRForCausalLM", "MoRModel", "MoROutput"]
lazy_exports(__name__, {"mor.model.mor": tuple(__all__)})
