"""mor: Mixture-of-Recursions language models in PyTorch."""

from mor.config import MoRConfig
from mor.model import MoRForCausalLM, MoROutput

__all__ = ["MoRConfig", "MoRForCausalLM", "MoROutput"]
__version__ = "0.1.0"
