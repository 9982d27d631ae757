"""A trained model and its tokenizer, ready to use: what ``mor eval``, ``mor generate``, ``mor viz`` and the
lm-evaluation-harness model load.

A mor checkpoint folder (``save_pretrained`` or a training checkpoint, :mod:`mor.model.io`); for ``mor serve``
also a Hugging Face Llama folder or a ``.gguf`` file through the Llama import (:mod:`mor.interop.llama`); or, for
reference numbers of an original model under the same protocol, anything ``transformers.AutoModelForCausalLM``
loads: a Hugging Face folder or a ``.gguf`` file. Device and dtype names (``auto`` included) are resolved here,
once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mor.config import DTYPES
from mor.data.tokenizer import TOKENIZER_FILE, TextTokenizer, load_tokenizer
from mor.integrity import verify_manifest
from mor.model import MoRForCausalLM
from mor.model.io import CONFIG_FILE, WEIGHTS_FILE, is_mor_checkpoint

BACKENDS = ("mor", "transformers")
SERVABLE = "give a mor checkpoint folder, a Hugging Face Llama folder or a .gguf file"  # what llama=True loads


def resolve_device(name: str) -> str:
    """``auto`` is ``cuda`` when a GPU is available, else ``cpu``; any other name is kept."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (as the paper evaluates) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model_and_tokenizer(path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu",
                             dtype: str = "auto", backend: str = "mor", verify: bool = True,
                             llama: bool = False) -> tuple[torch.nn.Module, TextTokenizer]:
    """The model in eval mode on ``device`` and the tokenizer: ``tokenizer`` if given, else the checkpoint's
    own ``tokenizer.json``.

    ``backend="mor"`` loads a mor checkpoint folder as :class:`MoRForCausalLM`; ``backend="transformers"``
    loads a Hugging Face folder or a ``.gguf`` file with ``transformers.AutoModelForCausalLM`` instead.
    ``llama`` (``backend="mor"`` only): a Hugging Face Llama folder or a ``.gguf`` file is also accepted, imported
    by :func:`mor.interop.llama.load_hf_llama` as a vanilla :class:`MoRForCausalLM` with the same logits; its
    tokenizer is the ``tokenizer.json`` in the folder (beside the ``.gguf``). ``verify`` checks the files that a
    ``manifest.json`` in the folder lists (see ``MoRForCausalLM.from_pretrained``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'mor' or 'transformers', got {backend!r}")
    path = Path(path)
    imported = llama and backend == "mor" and not is_mor_checkpoint(path)
    if imported and not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {SERVABLE}")
    gguf = backend == "transformers" and path.is_file() and path.suffix == ".gguf"
    if not (path.is_dir() or gguf or imported):
        expected = ("a Hugging Face checkpoint folder or a .gguf file" if backend == "transformers" else
                    f"the folder that save_pretrained wrote ({CONFIG_FILE} + {WEIGHTS_FILE})")
        raise FileNotFoundError(f"checkpoint {path} is not a directory; give {expected}")
    if backend == "mor" and not imported and not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a mor checkpoint (no {CONFIG_FILE}); give the folder that "
                                f"save_pretrained or training wrote ({CONFIG_FILE} + {WEIGHTS_FILE})")
    own = path.parent if imported and path.is_file() else path  # the folder of the checkpoint's own tokenizer
    if tokenizer is None:
        if gguf or not (own / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{own} holds no {TOKENIZER_FILE}; pass the tokenizer the model was trained "
                                    "with (--tokenizer PATH)")
        tokenizer = own
        if verify:
            verify_manifest(own, [TOKENIZER_FILE])
    text_tokenizer = load_tokenizer(tokenizer)
    torch_dtype = resolve_dtype(dtype, device)
    if backend == "transformers":
        from transformers import AutoModelForCausalLM

        folder, gguf_file = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
        model = AutoModelForCausalLM.from_pretrained(str(folder), **gguf_file, dtype=torch_dtype).to(device).eval()
    elif imported:
        from mor.interop.llama import load_hf_llama

        model = load_hf_llama(path, torch_dtype).to(device).eval()
    else:
        model = MoRForCausalLM.from_pretrained(path, map_location=device, dtype=torch_dtype, verify=verify).eval()
    if text_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {text_tokenizer.path} has {text_tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary holds {model.config.vocab_size}; pass the tokenizer it was trained with")
    return model, text_tokenizer
