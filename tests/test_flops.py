"""The FLOP counter must reproduce the paper's token budgets (MOR_SPEC 8, Table 3 and the isoFLOP table)."""

import pytest
import torch

from mor import MoRConfig, MoRForCausalLM
from mor.model.flops import flops_for_tokens, steps_for_budget, tokens_for_budget

BUDGET = 16.5e18


def cfg(preset: str, nr: int = 1, router: str = "none", **kw) -> MoRConfig:
    if nr == 1:
        return MoRConfig.from_preset(preset, **kw)
    return MoRConfig.from_preset(preset, sharing="middle_cycle", num_recursions=nr, router=router, **kw)


@pytest.mark.parametrize(
    "config, derived, paper",
    [
        # (config, tokens in billions derived with the paper's counting rules, the paper's printed figure)
        (cfg("smollm-360m"), 19.79, 19.8),
        (cfg("smollm-360m", 2, "expert"), 26.46, 27),
        (cfg("smollm-360m", 3, "expert"), 29.70, 29.7),
        (cfg("smollm-360m", 4, "expert"), 29.81, 30),
        (cfg("smollm-360m", 4), 18.63, 19),  # Recursive-4, 34 effective layers
        (cfg("smollm-360m", 3, "expert", kv_cache="share"), 30.77, 31),
        (cfg("smollm-360m", 3, "token"), 29.70, 30),
        (cfg("smollm-135m"), 53.28, 53.3),
        (cfg("smollm-135m", 3), 49.95, 50.0),
        (cfg("smollm-135m", 3, "expert"), 76.19, 76.2),
        (cfg("smollm-730m"), 10.09, 10.1),
        (cfg("smollm-730m", 3, "expert"), 14.87, 14.9),
        (cfg("smollm-1.7b"), 4.821, 4.8),
        (cfg("smollm-1.7b", 3), 4.450, 4.5),
        (cfg("smollm-1.7b", 3, "expert"), 6.505, 6.5),
    ],
)
def test_tokens_at_16_5e18_flops_match_the_paper(config, derived, paper):
    tokens = tokens_for_budget(config, BUDGET) / 1e9
    assert tokens == pytest.approx(derived, rel=5e-4)
    assert tokens == pytest.approx(paper, rel=0.025)  # the paper prints two or three significant digits


def test_released_step_counts():
    # Step counts of the released 360M configs (1024 x 2048 tokens per step) that follow from ceil(tokens/step).
    per_step = 1024 * 2048
    assert steps_for_budget(cfg("smollm-360m"), BUDGET, per_step) == 9438
    assert steps_for_budget(cfg("smollm-360m", 2, "expert"), BUDGET, per_step) == 12619
    assert steps_for_budget(cfg("smollm-360m", 4, "expert"), BUDGET, per_step) == 14216
    assert steps_for_budget(cfg("smollm-360m", 4), BUDGET, per_step) == 8883


def test_flops_at_the_vanilla_token_count():
    # Main table: MoR trained on vanilla's ~20B tokens needs 12.3e18 (Nr=2) and 11.0e18 (Nr=3, 4) FLOPs.
    tokens = tokens_for_budget(cfg("smollm-360m"), BUDGET)
    assert flops_for_tokens(cfg("smollm-360m", 2, "expert"), tokens) / 1e18 == pytest.approx(12.34, abs=0.01)
    assert flops_for_tokens(cfg("smollm-360m", 3, "expert"), tokens) / 1e18 == pytest.approx(11.00, abs=0.01)
    assert flops_for_tokens(cfg("smollm-360m", 4, "expert"), tokens) / 1e18 == pytest.approx(10.96, abs=0.01)


@pytest.mark.parametrize("nr, paper_millions", [(1, 315), (2, 167), (3, 118), (4, 98)])
def test_unique_non_embedding_parameters_360m(nr, paper_millions):
    with torch.device("meta"):
        model = MoRForCausalLM(cfg("smollm-360m", nr))
    assert round(model.num_parameters(exclude_embeddings=True) / 1e6) == paper_millions


def test_unrolled_parameter_count():
    with torch.device("meta"):
        model = MoRForCausalLM(cfg("smollm-360m", 3))
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    unique = model.num_parameters(exclude_embeddings=True)
    assert model.num_parameters(exclude_embeddings=True, unique=False) == unique + per_layer * (32 - 12)
