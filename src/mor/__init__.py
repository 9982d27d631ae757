"""mor: Mixture-of-Recursions language models in PyTorch."""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.config import MoRConfig
    from mor.model import MoRForCausalLM, MoROutput

__all__ = ["MoRConfig", "MoRForCausalLM", "MoROutput"]
__version__ = "0.1.0"
lazy_exports(__name__, {"mor.config": ("MoRConfig",), "mor.model.mor": ("MoRForCausalLM", "MoROutput")})
