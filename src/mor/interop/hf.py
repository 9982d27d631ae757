"""``transformers`` Auto classes for MoR checkpoints.

:func:`register` (``mor.interop.register_auto_classes()``) registers ``model_type="mor"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so that a folder written by ``MoRForCausalLM.save_pretrained`` (config.json with
``"model_type": "mor"``, weights ``model.*`` and ``lm_head.*`` in model.safetensors) loads with
``AutoModelForCausalLM.from_pretrained(folder)``. Importing this module registers nothing::

    from mor.interop import register_auto_classes
    from transformers import AutoModelForCausalLM
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained("checkpoints/mor-135m")
    logits = model(input_ids).logits

The wrapper holds a :class:`MoRForCausalLM` and registers its ``model`` and ``lm_head`` under the same names, so
checkpoints need no renaming; ``save_pretrained`` of the wrapper writes the mor format again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from mor.config import MoRConfig
from mor.model import MoRForCausalLM
from mor.model.layers import RMSNorm, RotaryEmbedding

MOR_FIELDS = tuple(f.name for f in dataclasses.fields(MoRConfig))
# Fields PretrainedConfig manages itself: passed on to it rather than set by us.
_SHARED_FIELDS = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class MoRHFConfig(PretrainedConfig):
    """A :class:`MoRConfig` as a ``transformers`` configuration; every MoRConfig field is an attribute."""

    model_type = "mor"

    def __init__(self, **kwargs: Any) -> None:
        defaults = dataclasses.asdict(MoRConfig())
        values = {name: kwargs.pop(name, defaults[name]) for name in MOR_FIELDS}
        for name, value in values.items():
            if name not in _SHARED_FIELDS:
                setattr(self, name, value)
        super().__init__(**{name: values[name] for name in _SHARED_FIELDS}, **kwargs)

    def to_mor_config(self) -> MoRConfig:
        return MoRConfig(**{name: getattr(self, name) for name in MOR_FIELDS})


class MoRHFForCausalLM(PreTrainedModel):
    """``transformers`` face of :class:`MoRForCausalLM`: ``forward`` returns a ``CausalLMOutput`` (logits, loss)."""

    config_class = MoRHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRHFConfig) -> None:
        super().__init__(config)
        core = MoRForCausalLM(config.to_mor_config())
        self.model, self.lm_head = core.model, core.lm_head
        # Not a registered submodule: its modules are registered above under the checkpoint's names.
        self.__dict__["core"] = core
        self.post_init()

    def train(self, mode: bool = True) -> MoRHFForCausalLM:
        super().train(mode)
        self.core.training = mode  # the core picks top-k (train) or causal (eval) routing from this flag
        return self

    def _init_weights(self, module: nn.Module) -> None:
        # Runs for weights the checkpoint does not hold and for the non-persistent rotary frequencies.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(self.config.hidden_size // self.config.num_attention_heads, self.config.rope_theta)
            module.inv_freq = fresh.inv_freq.to(module.inv_freq.device)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the mor checkpoint format, which both this class and ``MoRForCausalLM.from_pretrained`` read.
        transformers' options (sharding, hub upload...) are not supported."""
        if kwargs:
            raise TypeError(f"MoR checkpoints are written by MoRForCausalLM.save_pretrained, which takes no options; "
                            f"got {sorted(kwargs)}")
        self.core.save_pretrained(save_directory)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        document_ids: Tensor | None = None,
        routing: str | None = None,
        max_recursions: int | None = None,
        **_: Any,
    ) -> CausalLMOutput:
        out = self.core(input_ids, labels=labels, attention_mask=attention_mask, document_ids=document_ids,
                        routing=routing, max_recursions=max_recursions)
        return CausalLMOutput(loss=out.loss, logits=out.logits)


def register() -> None:
    """Register the classes with the Auto factories (idempotent)."""
    try:
        AutoConfig.register("mor", MoRHFConfig)
        AutoModelForCausalLM.register(MoRHFConfig, MoRHFForCausalLM)
    except ValueError:  # already registered by an earlier call
        pass
