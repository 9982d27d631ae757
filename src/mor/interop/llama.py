"""Hugging Face Llama checkpoints <-> vanilla and recursive ``MoRForCausalLM``.

Our vanilla state-dict names are Hugging Face Llama's (``model.layers.{i}.self_attn.q_proj.weight``...), so the
weights map one to one; only the configuration needs translating, and whatever our Llama cannot express
(biases, scaled RoPE, other activations, another head size) is refused with the field that asks for it.

Import reads a folder with ``config.json`` and safetensors (single or sharded through
``model.safetensors.index.json``) or ``pytorch_model.bin`` weights without ``transformers``; a GGUF file is
read and dequantized by ``transformers`` (which needs the ``gguf`` and ``accelerate`` packages). Export writes
a ``LlamaForCausalLM`` folder: recursive models are unrolled into one copy of each shared layer per position.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mor.config import MoRConfig, read_json_object
from mor.integrity import safe_torch_load, save_safetensors
from mor.model import MoRForCausalLM
from mor.model.io import INTACT_CONFIG, is_mor_checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint whose architecture our Llama cannot reproduce exactly."""


# ---------------------------------------------------------------------------------------------- configuration
def config_from_hf(hf: dict[str, Any]) -> MoRConfig:
    """The vanilla ``MoRConfig`` of a Hugging Face Llama ``config.json`` (transformers 4 or 5 layout)."""

    def refuse(name: str, message: str) -> None:
        raise UnsupportedCheckpointError(f"config.json field {name!r}: {message}")

    model_type = hf.get("model_type")
    if model_type != "llama":
        refuse("model_type", f"got {model_type!r}; only Llama checkpoints ('llama', e.g. SmolLM, SmolLM2, Llama 2/3 "
                             "without RoPE scaling) can be imported")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        refuse("architectures", f"got {architectures}; only LlamaForCausalLM (a causal language model) is supported")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"got {hf['hidden_act']!r}; our MLP is SwiGLU with SiLU")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            refuse(name, "biases in attention/MLP projections are not supported (our projections have none)")
    # transformers 5 keeps theta and scaling in rope_parameters; 4 has rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        refuse(field, f"RoPE type {rope_type!r} is not supported; only unscaled ('default') rotary embeddings are")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        refuse(missing[0], f"missing ({', '.join(missing)} absent); the file is not a complete Llama config.json")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        refuse("head_dim", f"{head_dim} x {heads} heads != hidden_size {hidden}; our attention uses "
                           "head_dim = hidden_size / num_attention_heads")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # several stop tokens (Llama 3): the first is the end-of-text token
        eos = eos[0] if eos else None
    return MoRConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: MoRConfig, num_layers: int, dtype: torch.dtype) -> dict[str, Any]:
    """A ``LlamaForCausalLM`` config.json in the layout both transformers 4 and 5 read (``rope_theta`` at the
    top level, no scaling)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------- import
def load_hf_llama(path: str | Path, dtype: torch.dtype | None = None) -> MoRForCausalLM:
    """Import a Hugging Face Llama checkpoint as a vanilla :class:`MoRForCausalLM` with identical logits.

    ``path``: a folder with ``config.json`` and ``model.safetensors`` (or shards listed in
    ``model.safetensors.index.json``, or ``pytorch_model.bin``), a ``.gguf`` file, or a folder holding exactly
    one ``.gguf`` file and no ``config.json``. Quantized GGUF tensors are dequantized. ``dtype``: parameter dtype
    of the returned model (default float32).
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path} has no config.json and {len(ggufs)} .gguf files; give a Hugging Face "
                                    "checkpoint folder (config.json + weights) or a single .gguf file")
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        config, state = _read_gguf(path)
    elif path.is_dir():
        config = config_from_hf(read_json_object(path / "config.json", INTACT_CONFIG))
        state = _read_weights(path)
    else:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    model = MoRForCausalLM(config)
    _load_llama_state(model, state, str(path))
    return model.to(dtype or torch.float32).eval()


def load_any_model(path: str | Path) -> MoRForCausalLM:
    """A mor checkpoint folder (``model_type`` "mor" in its config.json), a Hugging Face Llama folder or a GGUF
    file as a model in eval mode."""
    if is_mor_checkpoint(path):
        return MoRForCausalLM.from_pretrained(path).eval()
    return load_hf_llama(path)


def copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files found at ``source`` (a folder, or a tokenizer.json) into ``out``; their names."""
    files = [source] if source.is_file() else [source / name for name in TOKENIZER_FILES]
    copied = []
    for file in files:
        if file.is_file():
            shutil.copyfile(file, out / file.name)
            copied.append(file.name)
    return copied


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS).is_file():
        from safetensors.torch import load_file as load

        files = _weight_files(folder, SAFETENSORS_INDEX, SAFETENSORS)
    elif (folder / BIN_INDEX).is_file() or (folder / BIN).is_file():
        load = _load_bin
        files = _weight_files(folder, BIN_INDEX, BIN)
    else:
        raise FileNotFoundError(f"{folder} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
                                f"{BIN_INDEX}")
    state: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight shard {file} (listed in the index) is missing")
        state.update(load(file))
    return state


def _load_bin(file: Path) -> dict[str, Tensor]:
    return safe_torch_load(file)  # tensors only: no code runs from the file


def _weight_files(folder: Path, index: str, single: str) -> list[Path]:
    if (folder / index).is_file():
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / single]


def _read_gguf(file: Path) -> tuple[MoRConfig, dict[str, Tensor]]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        raise ImportError("reading GGUF needs transformers, gguf and accelerate: "
                          "pip install 'transformers>=4.45' gguf accelerate") from error
    from gguf import GGUFReader

    # transformers maps GGUF names to Llama's, undoes llama.cpp's q/k row permutation and dequantizes.
    hf = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    hf_config = hf.config.to_dict()
    # A GGUF without an output matrix has a tied head; older transformers (4.45) miss that and leave the head random.
    hf_config["tie_word_embeddings"] = all(t.name != "output.weight" for t in GGUFReader(file).tensors)
    return config_from_hf(hf_config), hf.state_dict()


def _load_llama_state(model: MoRForCausalLM, state: dict[str, Tensor], source: str) -> None:
    # Older checkpoints store the rotary frequencies; ours are computed from rope_theta.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied head twice
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise UnsupportedCheckpointError(f"{source}: weights do not match a Llama model of its config: "
                                         + "; ".join(details))
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise UnsupportedCheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the config implies "
                                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


# ---------------------------------------------------------------------------------------------- export
def export_hf(model: MoRForCausalLM, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` folder (``config.json`` + ``model.safetensors``)
    that ``transformers.AutoModelForCausalLM`` loads with identical logits.

    Recursive models are unrolled: every position of the recursion gets its own copy of the shared layer it runs.
    Models with routers are refused: ``transformers`` has no Mixture-of-Recursions architecture; load those
    through ``mor.interop.register_auto_classes()`` instead.
    """
    config = model.config
    if config.router != "none":
        raise UnsupportedCheckpointError(
            f"a model with routers ({config.router}-choice) cannot be written as LlamaForCausalLM: transformers has no "
            "Mixture-of-Recursions architecture, and routing decides per token which layers run. Save it with "
            "save_pretrained() and load it in transformers after mor.interop.register_auto_classes()")
    if config.kv_cache == "share":
        raise UnsupportedCheckpointError(
            "kv_cache='share' reuses the keys/values of the first recursion in later ones, which an unrolled Llama "
            "cannot express; only recursion-wise caching (kv_cache='recursion') models can be exported")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = model.model.layers
    plan = model.model.plan
    state: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = value
    for position, layer in enumerate(plan.layer_of):
        for name, value in layers[layer].state_dict().items():
            state[f"model.layers.{position}.{name}"] = value
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    # Unrolled copies of one shared tensor must be separate storage for safetensors.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    dtype = model.model.embed_tokens.weight.dtype
    tmp = directory / (SAFETENSORS + ".tmp")
    save_safetensors(state, tmp, metadata={"format": "pt"})
    tmp.replace(directory / SAFETENSORS)
    hf_config = config_to_hf(config, plan.num_positions, dtype)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory
