"""Training config validation, LR schedules, FLOP budgets and the shipped experiment configs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import CONFIGS

from mor.cli import main
from mor.train.budget import resolve_budget
from mor.train.config import (ConfigError, RunConfig, ScheduleConfig, apply_override, config_from_dict,
                              load_config)
from mor.train.optim import build_optimizer, parameter_groups
from mor.train.schedule import decay_steps, lr_multiplier, warmup_steps

def minimal(**sections) -> dict:
    config = {"model": {"preset": "tiny"}, "data": {"path": "somewhere"}, "budget": {"steps": 10}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("sections, message", [
    ({"optim": {"lr": "abc"}}, "optim.lr: expected float, got str 'abc'"),
    ({"optim": {"lrr": 1.0}}, "optim.lrr: unknown key"),
    ({"optimizer": {}}, "optimizer: unknown key"),
    ({"run": {"compile": "yes"}}, "run.compile: expected true, false, auto or regional, got 'yes'"),
    ({"batch": {"micro_batch_size": 2.5}}, "batch.micro_batch_size: expected int, got float 2.5"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected 2 values, got 1"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected float, got str 'x'"),
    ({"model": {"hidden": 3}}, "model.hidden: unknown key"),
    ({"model": {"num_recursions": "three"}}, "model.num_recursions: expected int, got str 'three'"),
    ({"model": {"preset": "huge"}}, "model.preset: unknown preset 'huge'"),
    ({"model": {"router": "expert"}}, "model: MoRConfig.router"),
    ({"budget": {"tokens": 100}}, "budget: give exactly one of steps, tokens, flops"),
    ({"schedule": {"kind": "linear"}}, "schedule.kind: got 'linear'"),
    ({"schedule": {"warmup": 1.5}}, "schedule.warmup: a float is a fraction"),
    ({"batch": {"grad_accum": 2, "global_batch_size": 8}}, "batch: give grad_accum or global_batch_size"),
    ({"run": {"strategy": "deepspeed"}}, "run.strategy: got 'deepspeed'"),
])
def test_invalid_configs_name_the_key(sections, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(minimal(**sections))
    assert message in str(error.value)


def test_missing_data_path_is_an_error():
    config = minimal()
    del config["data"]
    with pytest.raises(ConfigError, match="data.path: missing"):
        config_from_dict(config)


def test_types_are_coerced_and_yaml_1_1_exponents_accepted():
    # PyYAML reads "3e-3" and "16.5e18" as strings (YAML 1.1); numeric fields accept them.
    config = config_from_dict(minimal(optim={"lr": "3e-3", "grad_clip": 1}, budget={"steps": None, "flops": "16.5e18"},
                                      schedule={"warmup": 5}))
    assert config.optim.lr == 3e-3 and isinstance(config.optim.grad_clip, float)
    assert config.budget.flops == 16.5e18
    assert config.schedule.warmup == 5 and isinstance(config.schedule.warmup, int)
    assert config_from_dict(minimal(schedule={"warmup": 0.05})).schedule.warmup == 0.05


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    config = load_config(path, ["optim.lr=1e-3", "run.compile=true", "model.num_recursions=3",
                                "model.sharing=middle_cycle", "data.val_split=null"])
    assert config.optim.lr == 1e-3 and config.run.compile is True and config.data.val_split is None
    assert config.model_config().num_recursions == 3
    with pytest.raises(ConfigError, match="optim.lr: expected float, got str 'fast'"):
        load_config(path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "optim.lr")


def test_compile_defaults_to_what_helps_on_the_device():
    run = RunConfig()
    assert run.compile == "auto" and run.compile_mode("cpu") is None and run.compile_mode("cuda") == "regional"
    assert RunConfig(compile=True).compile_mode("cpu") == "whole"
    assert RunConfig(compile=False).compile_mode("cuda") is None
    assert RunConfig(compile="regional").compile_mode("cpu") == "regional" and run.chunked_loss
    # No shipped config forces it, so a CPU try of any of them starts at once instead of compiling for minutes.
    for path in CONFIGS.rglob("*.yaml"):
        assert "compile" not in (yaml.safe_load(path.read_text()).get("run") or {}), path


def test_model_section_preset_with_overrides():
    config = config_from_dict(minimal(model={"sharing": "middle_cycle", "num_recursions": 2, "router": "token",
                                             "hidden_size": 32}))
    model = config.model_config()
    assert (model.hidden_size, model.num_hidden_layers, model.router) == (32, 5, "token")


# ------------------------------------------------------------------------------------------------ schedules
def test_wsd_schedule_key_steps():
    f = lr_multiplier(ScheduleConfig(kind="wsd", warmup=10, decay_fraction=0.2), 100)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(50) == f(79) == 1.0
    assert f(80) == 1.0  # the decay starts at the peak ...
    assert f(90) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1 / 20)  # ... and reaches 0 one step after the last
    floor = lr_multiplier(ScheduleConfig(kind="wsd", warmup=10, min_lr_ratio=0.1), 100)
    assert floor(90) == pytest.approx(0.55)


def test_cosine_and_constant_schedules():
    f = lr_multiplier(ScheduleConfig(kind="cosine", warmup=10), 110)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2 with the default floor 0.1
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    g = lr_multiplier(ScheduleConfig(kind="constant", warmup=4), 50)
    assert [g(s) for s in (0, 3, 4, 49)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("steps, decay", [(9438, 1888), (12619, 2524), (14161, 2832), (14216, 2843), (8883, 1777),
                                          (14672, 2934)])
def test_wsd_decay_lengths_match_released_configs(steps, decay):
    config = ScheduleConfig(kind="wsd", warmup=57, decay_fraction=0.2)
    assert decay_steps(config, steps) == decay
    assert warmup_steps(ScheduleConfig(warmup=0.05), 1144) == 57  # 5% of the 2e18 vanilla budget


def test_schedule_longer_than_training_is_refused():
    with pytest.raises(ValueError, match="exceed the 10 training steps"):
        lr_multiplier(ScheduleConfig(kind="wsd", warmup=9, decay_fraction=0.2), 10)


# ------------------------------------------------------------------------------------------------ budgets
def test_flop_budget_converts_to_tokens_then_steps():
    config = config_from_dict(minimal(budget={"steps": None, "flops": 1e12}, data={"seq_len": 64},
                                      batch={"micro_batch_size": 4, "grad_accum": 3}))
    budget = resolve_budget(config, config.model_config(), world_size=2)
    assert budget.tokens_per_step == 4 * 3 * 2 * 64
    from mor.model.flops import forward_flops_per_token
    per_token = forward_flops_per_token(config.model_config(), seq_len=64)
    assert budget.steps == math.ceil(1e12 / per_token / budget.tokens_per_step)
    assert budget.flops >= 1e12 > budget.flops - budget.tokens_per_step * per_token


def test_token_budget_and_global_batch():
    config = config_from_dict(minimal(budget={"steps": None, "tokens": 10_000}, data={"seq_len": 32},
                                      batch={"micro_batch_size": 2, "global_batch_size": 16}))
    budget = resolve_budget(config, config.model_config(), world_size=4)
    assert budget.grad_accum == 2 and budget.tokens_per_step == 512 and budget.steps == 20
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_budget(config, config.model_config(), world_size=3)


# Released 360M configs (MOR_SPEC 9.3): steps = ceil(tokens / 2,097,152) with the paper's FLOP counting. The
# reconstructed counter lands within 2 steps of every released value and exactly on most.
RELEASED_STEPS = {"vanilla": 9438, "recursive-2": 9438, "recursive-3": 9438, "recursive-4": 8883,
                  "mor-expert-2": 12619, "mor-expert-3": 14161, "mor-expert-4": 14216,
                  "mor-expert-3-kvshare": 14672, "mor-token-3": 14161}
RELEASED_WARMUP = {name: 57 if name.startswith(("vanilla", "recursive")) else 86 for name in RELEASED_STEPS}


@pytest.mark.parametrize("name", sorted(RELEASED_STEPS))
def test_paper_configs_reproduce_released_budgets(name):
    config = load_config(CONFIGS / "paper" / f"{name}.yaml")
    budget = resolve_budget(config, config.model_config(), world_size=4)
    assert budget.tokens_per_step == 1024 * 2048 and budget.grad_accum == 16
    assert abs(budget.steps - RELEASED_STEPS[name]) <= 2
    assert config.budget.flops == 16.5e18 and config.optim.lr == 3e-3 and config.schedule.kind == "wsd"
    assert warmup_steps(config.schedule, budget.steps) == RELEASED_WARMUP[name]


def test_small_configs_share_one_flop_budget():
    configs = {path.stem: load_config(path) for path in sorted((CONFIGS / "small").glob("*.yaml"))}
    assert set(configs) == set(RELEASED_STEPS)
    budgets = {name: resolve_budget(c, c.model_config(), 1) for name, c in configs.items()}
    assert len({c.budget.flops for c in configs.values()}) == 1
    for budget in budgets.values():  # equal FLOPs up to the last partial step
        assert abs(budget.flops - 3e15) <= budget.tokens_per_step * budget.forward_flops_per_token
    assert budgets["mor-expert-3"].tokens > budgets["recursive-3"].tokens  # routing buys more tokens


def test_quickstart_config_trains_the_quickstart_model_on_the_bundled_sample():
    # configs/quickstart.yaml is the `mor quickstart` model, sized for the bundled tokenizer and its own rows.
    from mor.cli.quickstart import QUICKSTART_MODEL
    from mor.data import load_tokenizer, sample_tokenizer_path

    config = load_config(CONFIGS / "quickstart.yaml")
    assert config.model == QUICKSTART_MODEL
    model = config.model_config()
    assert model.vocab_size == load_tokenizer(sample_tokenizer_path()).vocab_size
    assert config.data.seq_len == model.max_position_embeddings


def test_cli_dry_run_and_error_exit_codes(tmp_path, capsys):
    # The plan is printed, then the checks of a real run fail: the paper's data is not prepared here.
    assert main(["train", str(CONFIGS / "paper" / "vanilla.yaml"), "--dry-run", "--world-size", "4"]) == 2
    out, err = capsys.readouterr()
    assert "9,438 steps" in out and "data.path: data/fineweb-edu-dedup is not a prepared token folder" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(optim={"lr": "abc"})))
    assert main(["train", str(bad)]) == 2
    assert "optim.lr: expected float, got str 'abc'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ optimizer
def test_parameter_groups_decay_matrices_and_boost_aux_router():
    from mor import MoRConfig, MoRForCausalLM

    model = MoRForCausalLM(MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=2, router="expert",
                                                 expert_sampling="aux_router"))
    config = config_from_dict(minimal(optim={"lr": 1e-3, "aux_router_lr_mult": 10.0})).optim
    aux = list(model.aux_router_parameters())
    assert aux
    groups = {g["name"]: g for g in parameter_groups(model, aux, config)}
    assert groups["aux_router"]["lr"] == pytest.approx(1e-2)
    assert groups["model"]["weight_decay"] == 0.1 and groups["model_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["model_no_decay"]["params"])  # RMSNorm gains
    assert any(p is model.model.embed_tokens.weight for p in groups["model"]["params"])
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    optimizer = build_optimizer(model, aux, config, torch.device("cpu"))
    assert optimizer.defaults["betas"] == (0.9, 0.95)
