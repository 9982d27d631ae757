"""Turn a pretrained vanilla model into a Recursive or Mixture-of-Recursions model (MOR_SPEC 3.2).

The original model has ``L`` layers. The shared block has ``B = config.recursion_block_size`` layers: the ``M``
layers that get shared (all ``L``, or the ``L - 2`` between the unique first and last layer of the middle-*
strategies) divided by ``Nr`` and rounded up. Shared layer ``i`` starts from

- ``stepwise``: original layer ``round(linspace(first, last, B))[i]`` (``first``/``last`` = the ends of the
  shared range: 0 and L-1, or 1 and L-2 for middle-*),
- ``lower``: ``first + i`` (the first B layers), ``upper``: ``last - B + 1 + i`` (the last B layers),
- ``random``: the i-th of a sorted random subset of B layers (seeded),
- ``average``: the mean of the original layers in its *tie group*.

Tie groups follow the sharing rule over the original layers: the shared range is unrolled position by position
(cycle: position ``j`` runs shared layer ``j mod B``; sequence: ``j div Nr``) and original layer ``first + j``
joins the group of the shared layer that position ``j`` runs. When ``B * Nr`` exceeds ``M`` (the block was
rounded up), the positions past ``M`` have no original layer, so the last groups average fewer layers; every
group holds at least one.

The unique first and last layer of middle-* sharing, the embeddings, the final norm and an untied head are
copied unchanged; routers are freshly initialised (N(0, initializer_range), 0.02 by default).
"""

from __future__ import annotations

import random as _random
from typing import Any

import torch

from mor.config import INITS, RECURSIVE_SHARING, MoRConfig
from mor.model import MoRForCausalLM

# Fields that fix the shape of the backbone: the converted model must keep the vanilla model's.
BACKBONE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "tie_word_embeddings")


def source_layers(config: MoRConfig, init: str, seed: int = 0) -> list[list[int]]:
    """For each layer of the shared block, the original layers it is initialised from (one, or the tie group
    that ``average`` takes the mean of). ``config`` is the *recursive* configuration."""
    if config.sharing not in RECURSIVE_SHARING:
        raise ValueError(f"sharing must be one of {RECURSIVE_SHARING}, got {config.sharing!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    first = 1 if config.is_middle else 0
    last = config.num_hidden_layers - 1 - first
    count, block, nr = last - first + 1, config.recursion_block_size, config.num_recursions
    if init == "stepwise":
        # Python's round (half to even), as the reference implementation.
        return [[round(x)] for x in torch.linspace(first, last, block, dtype=torch.float64).tolist()]
    if init == "lower":
        return [[first + i] for i in range(block)]
    if init == "upper":
        return [[last - block + 1 + i] for i in range(block)]
    if init == "random":
        chosen = sorted(_random.Random(seed).sample(range(first, last + 1), block))
        return [[layer] for layer in chosen]
    cycles = config.is_cycle
    groups: list[list[int]] = [[] for _ in range(block)]
    for j in range(count):
        groups[j % block if cycles else j // nr].append(first + j)
    return groups


def to_recursive(
    vanilla_model: MoRForCausalLM,
    sharing: str,
    num_recursions: int,
    init: str,
    router: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> MoRForCausalLM:
    """A Recursive (``router=None``) or MoR (``router="expert"|"token"``) model initialised from ``vanilla_model``.

    ``sharing``: cycle, sequence, middle_cycle (the paper's choice) or middle_sequence. ``init``: stepwise,
    average, lower, upper or random (see the module docstring). ``seed`` drives the ``random`` subset and the
    fresh router weights. ``config_overrides`` set further :class:`MoRConfig` fields (``kv_cache``, ``capacities``,
    ``router_arch``...); the backbone's shape cannot change.
    """
    source = vanilla_model.config
    if source.sharing != "none":
        raise ValueError(f"to_recursive needs a vanilla model (sharing='none'), got sharing={source.sharing!r}")
    if sharing not in RECURSIVE_SHARING:
        raise ValueError(f"sharing must be one of {RECURSIVE_SHARING}, got {sharing!r}")
    fixed = sorted(set(config_overrides) & set(BACKBONE_FIELDS))
    if fixed:
        raise ValueError(f"{fixed} fix the backbone's shape, which comes from the vanilla model and cannot change")
    config = source.replace(sharing=sharing, num_recursions=num_recursions, router=router or "none",
                            **config_overrides)
    groups = source_layers(config, init, seed)

    reference = vanilla_model.model.embed_tokens.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoRForCausalLM(config)  # routers get their N(0, initializer_range) weights here
    model.to(device=reference.device, dtype=reference.dtype)

    old, new = vanilla_model.model, model.model
    with torch.no_grad():
        new.embed_tokens.load_state_dict(old.embed_tokens.state_dict())
        new.norm.load_state_dict(old.norm.state_dict())
        if not config.tie_word_embeddings:
            model.lm_head.load_state_dict(vanilla_model.lm_head.state_dict())
        offset = 0
        if config.is_middle:
            new.layers[0].load_state_dict(old.layers[0].state_dict())
            new.layers[-1].load_state_dict(old.layers[-1].state_dict())
            offset = 1
        for i, group in enumerate(groups):
            states = [old.layers[layer].state_dict() for layer in group]
            mean = {name: torch.stack([s[name].float() for s in states]).mean(0) for name in states[0]}
            new.layers[offset + i].load_state_dict(mean)
    return model.train(vanilla_model.training)
