"""Up-training initialisations (MOR_SPEC 3.2): which original layers each shared layer starts from."""

import pytest
import torch
from helpers import make, tokens, uneven_norms

from mor import MoRConfig, MoRForCausalLM
from mor.interop import INITS, source_layers, to_recursive
from mor.model.sharing import layer_plan

SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")


def vanilla(layers: int = 8, seed: int = 0, **overrides) -> MoRForCausalLM:
    """A vanilla model whose norm gains differ per layer, so that every tensor identifies its layer."""
    return uneven_norms(make(seed=seed, num_hidden_layers=layers, **overrides))


def recursive_config(layers: int, sharing: str, nr: int) -> MoRConfig:
    return MoRConfig.from_preset("tiny", num_hidden_layers=layers, sharing=sharing, num_recursions=nr)


# ---------------------------------------------------------------------------------------------- source layers
@pytest.mark.parametrize("layers, sharing, nr, init, expected", [
    # SmolLM-135M shape, Middle-Cycle Nr=3: B = ceil(28 / 3) = 10 over layers 1..28.
    (30, "middle_cycle", 3, "stepwise", [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]),
    (30, "middle_cycle", 3, "lower", list(range(1, 11))),
    (30, "middle_cycle", 3, "upper", list(range(19, 29))),
    # SmolLM-360M shape, Nr=3: linspace(1, 30, 10) = 1, 4.22, 7.44, 10.67, 13.89, 17.11, 20.33, 23.56, 26.78, 30.
    (32, "middle_sequence", 3, "stepwise", [1, 4, 7, 11, 14, 17, 20, 24, 27, 30]),
    (32, "middle_cycle", 2, "upper", list(range(16, 31))),
    # Cycle over all 8 layers, B = 4: linspace(0, 7, 4) = 0, 2.33, 4.67, 7.
    (8, "cycle", 2, "stepwise", [0, 2, 5, 7]),
    (8, "sequence", 2, "lower", [0, 1, 2, 3]),
    (8, "sequence", 2, "upper", [4, 5, 6, 7]),
    # linspace(0, 9, 3) = 0, 4.5, 9: half rounds to even.
    (10, "cycle", 4, "stepwise", [0, 4, 9]),
])
def test_selection_inits_pick_the_spec_layers(layers, sharing, nr, init, expected):
    assert source_layers(recursive_config(layers, sharing, nr), init) == [[layer] for layer in expected]


@pytest.mark.parametrize("layers, sharing, nr, expected", [
    # The reference example: 6 layers, 3 recursions -> 0-2-4 and 1-3-5 (cycle), 0-1, 2-3, 4-5 (sequence).
    (6, "cycle", 3, [[0, 2, 4], [1, 3, 5]]),
    (6, "sequence", 3, [[0, 1, 2], [3, 4, 5]]),
    (8, "middle_cycle", 3, [[1, 3, 5], [2, 4, 6]]),
    (8, "middle_sequence", 3, [[1, 2, 3], [4, 5, 6]]),
    # 28 middle layers, B = 10, 30 positions: the positions past layer 28 have no original layer.
    (30, "middle_cycle", 3, [[1 + i, 11 + i, 21 + i] for i in range(8)] + [[9, 19], [10, 20]]),
    (30, "middle_sequence", 3, [[1 + 3 * i, 2 + 3 * i, 3 + 3 * i] for i in range(9)] + [[28]]),
])
def test_average_groups_follow_the_sharing_rule_over_the_original_layers(layers, sharing, nr, expected):
    assert source_layers(recursive_config(layers, sharing, nr), "average") == expected


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("nr", [2, 3, 4])
def test_every_original_shared_layer_is_averaged_exactly_once(sharing, nr):
    config = recursive_config(11, sharing, nr)
    groups = source_layers(config, "average")
    first = 1 if config.is_middle else 0
    assert len(groups) == config.recursion_block_size and all(groups)
    assert sorted(layer for group in groups for layer in group) == list(range(first, 11 - first))


def test_random_init_is_a_seeded_sorted_subset():
    config = recursive_config(30, "middle_cycle", 3)
    chosen = [group[0] for group in source_layers(config, "random", seed=7)]
    assert chosen == sorted(set(chosen)) and len(chosen) == 10 and 1 <= chosen[0] and chosen[-1] <= 28
    assert source_layers(config, "random", seed=7) == source_layers(config, "random", seed=7)
    assert any(source_layers(config, "random", seed=s) != source_layers(config, "random", seed=7) for s in range(3))


def test_single_shared_layer_every_init_takes_the_middle_layer():
    config = recursive_config(3, "middle_cycle", 2)  # one middle layer, B = 1
    assert all(source_layers(config, init) == [[1]] for init in INITS)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        source_layers(recursive_config(8, "cycle", 2), "middle")
    with pytest.raises(ValueError, match="needs a vanilla model"):
        to_recursive(MoRForCausalLM(recursive_config(8, "cycle", 2)), "cycle", 2, "stepwise")
    with pytest.raises(ValueError, match="sharing must be one of"):
        to_recursive(vanilla(), "none", 2, "stepwise")
    with pytest.raises(ValueError, match=r"\['hidden_size'\] fix the backbone"):
        to_recursive(vanilla(), "cycle", 2, "stepwise", hidden_size=32)


# ---------------------------------------------------------------------------------------------- weights
def _layer_state(model: MoRForCausalLM, index: int) -> dict[str, torch.Tensor]:
    return model.model.layers[index].state_dict()


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("init", INITS)
def test_converted_layers_hold_the_chosen_source_weights(sharing, init):
    source = vanilla(layers=8)
    model = to_recursive(source, sharing, 3, init, seed=3)
    config = model.config
    assert (config.sharing, config.num_recursions, config.router) == (sharing, 3, "none")
    groups = source_layers(config, init, seed=3)
    offset = 1 if config.is_middle else 0
    for i, group in enumerate(groups):
        new = _layer_state(model, offset + i)
        for name, value in new.items():
            expected = torch.stack([_layer_state(source, layer)[name] for layer in group]).mean(0)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-7, msg=f"shared layer {i} {name}")
    if config.is_middle:
        for new_index, old_index in ((0, 0), (len(model.model.layers) - 1, 7)):
            for name, value in _layer_state(model, new_index).items():
                assert torch.equal(value, _layer_state(source, old_index)[name])
    for name in ("embed_tokens.weight", "norm.weight"):
        assert torch.equal(model.model.state_dict()[name], source.model.state_dict()[name])
    with torch.no_grad():
        assert torch.isfinite(model(tokens(2, 16)).logits).all()


def test_untied_head_is_copied_and_dtype_kept():
    source = vanilla(tie_word_embeddings=False).to(torch.bfloat16)
    model = to_recursive(source, "middle_cycle", 2, "upper")
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _unrolled_vanilla(recursive: MoRForCausalLM) -> MoRForCausalLM:
    """A vanilla model whose layer at each position is a copy of the shared layer the recursive model runs there."""
    cfg = recursive.config.replace(sharing="none", num_recursions=1, num_hidden_layers=recursive.config.num_effective_layers)
    model = MoRForCausalLM(cfg).eval()
    state = {k: v for k, v in recursive.state_dict().items() if not k.startswith("model.layers.")}
    for position, layer in enumerate(layer_plan(recursive.config).layer_of):
        for name, value in _layer_state(recursive, layer).items():
            state[f"model.layers.{position}.{name}"] = value.clone()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("sharing, inits", [
    ("cycle", ["lower", "upper", "average"]),
    ("middle_cycle", ["lower", "upper", "average"]),
    ("sequence", ["average"]),
    ("middle_sequence", ["average"]),
])
def test_converting_an_unrolled_recursive_model_recovers_it(sharing, inits):
    """Where the original layers already repeat the shared block, the right initialisation is the identity."""
    torch.manual_seed(0)
    recursive = MoRForCausalLM(recursive_config(8, sharing, 3)).eval()  # 6 or 9 effective layers
    unrolled = _unrolled_vanilla(recursive)
    with torch.no_grad():
        expected = recursive(tokens(2, 16)).logits
        torch.testing.assert_close(unrolled(tokens(2, 16)).logits, expected)
        for init in inits:
            converted = to_recursive(unrolled, sharing, 3, init).eval()
            assert converted.config.num_effective_layers == unrolled.config.num_hidden_layers
            torch.testing.assert_close(converted(tokens(2, 16)).logits, expected, msg=init)


@pytest.mark.parametrize("router", ["expert", "token"])
def test_mor_conversion_initialises_routers_and_trains(router):
    source = vanilla()
    model = to_recursive(source, "middle_cycle", 3, "stepwise", router=router, kv_cache="share", seed=5).train()
    assert (model.config.router, model.config.kv_cache) == (router, "share")
    routers = [p for n, p in model.named_parameters() if "router" in n]
    assert routers
    weights = torch.cat([p.detach().flatten() for p in routers])
    assert abs(weights.mean().item()) < 0.01 and 0.015 < weights.std().item() < 0.025  # N(0, 0.02)
    again = to_recursive(source, "middle_cycle", 3, "stepwise", router=router, kv_cache="share", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    out = model(tokens(2, 16), labels=tokens(2, 16))
    out.loss.backward()
    assert all(p.grad is not None for p in model.model.layers.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers if p.requires_grad)
