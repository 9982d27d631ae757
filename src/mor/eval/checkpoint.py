"""Load a checkpoint directory (``MoRForCausalLM.save_pretrained``) and its tokenizer for evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from mor.data.tokenizer import TextTokenizer, load_tokenizer
from mor.model import MoRForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (as the paper evaluates) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_checkpoint(path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu",
                    dtype: str = "auto") -> tuple[MoRForCausalLM, TextTokenizer]:
    """The model in eval mode on ``device`` and the tokenizer: ``tokenizer`` if given, else the checkpoint's
    own ``tokenizer.json``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory; give the folder that save_pretrained "
                                "wrote (config.json + model.safetensors)")
    if tokenizer is None:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} holds no tokenizer.json; pass the tokenizer the model was trained "
                                    "with (--tokenizer PATH)")
        tokenizer = path
    text_tokenizer = load_tokenizer(tokenizer)
    model = MoRForCausalLM.from_pretrained(path, map_location=device, dtype=resolve_dtype(dtype, device)).eval()
    if text_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {text_tokenizer.path} has {text_tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary holds {model.config.vocab_size}; pass the tokenizer it was trained with")
    return model, text_tokenizer
