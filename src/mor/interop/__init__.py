"""Hugging Face interop and up-training: import Llama checkpoints (safetensors, PyTorch, GGUF), convert vanilla
models to Recursive/MoR ones with the paper's initialisations, export to ``LlamaForCausalLM`` and load MoR
checkpoints through ``transformers``' Auto classes.

``transformers`` is imported only where needed (GGUF import, :func:`register_auto_classes`).
"""

from typing import TYPE_CHECKING

from mor._lazy import lazy_exports

if TYPE_CHECKING:
    from mor.interop.llama import UnsupportedCheckpointError, export_hf, load_hf_llama
    from mor.interop.recursive import INITS, source_layers, to_recursive


def register_auto_classes() -> None:
    """Make ``transformers.AutoModelForCausalLM.from_pretrained`` load MoR checkpoints (``model_type="mor"``)."""
    from mor.interop.hf import register

    register()


__all__ = ["INITS", "UnsupportedCheckpointError", "export_hf", "load_hf_llama", "register_auto_classes",
           "source_layers", "to_recursive"]
lazy_exports(__name__, {"mor.interop.llama": ("UnsupportedCheckpointError", "export_hf", "load_hf_llama"),
                        "mor.interop.recursive": ("INITS", "source_layers", "to_recursive")})
