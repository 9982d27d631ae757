import pytest

from mor import MoRConfig


@pytest.mark.parametrize(
    "preset, sharing, nr, unique, effective",
    [
        ("smollm-135m", "middle_cycle", 3, 12, 32),  # 1+10+1: layers added, not dropped
        ("smollm-360m", "middle_cycle", 2, 17, 32),
        ("smollm-360m", "middle_cycle", 3, 12, 32),
        ("smollm-360m", "middle_cycle", 4, 10, 34),  # 1+8+1, two extra layers
        ("smollm-730m", "middle_cycle", 3, 10, 26),
        ("smollm-1.7b", "middle_cycle", 3, 10, 26),
        ("smollm-360m", "cycle", 3, 11, 33),
        ("smollm-360m", "sequence", 2, 16, 32),
        ("smollm-360m", "none", 1, 32, 32),
    ],
)
def test_effective_depth_follows_the_paper(preset, sharing, nr, unique, effective):
    cfg = MoRConfig.from_preset(preset, sharing=sharing, num_recursions=nr)
    assert cfg.num_unique_layers == unique
    assert cfg.num_effective_layers == effective


def test_default_capacities_and_gates():
    cfg = MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=3, router="expert")
    assert cfg.step_capacities == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert (cfg.gate_func, cfg.gate_alpha) == ("sigmoid", 0.1)
    token = cfg.replace(router="token", capacities=None)
    assert (token.gate_func, token.gate_alpha) == ("softmax", 1.0)


@pytest.mark.parametrize(
    "overrides, field, hint",
    [
        (dict(router="expert"), "router", "middle_cycle"),
        (dict(num_recursions=3), "num_recursions", "sharing"),
        (dict(sharing="middle_cycle", num_recursions=1), "num_recursions", ">= 2"),
        (dict(sharing="middle_cycle", num_recursions=3, router="expert", capacities=[1.0, 0.3, 0.6]), "capacities",
         "non-increasing"),
        (dict(sharing="middle_cycle", num_recursions=3, router="expert", capacities=[1.0, 0.5]), "capacities",
         "one capacity per recursion"),
        (dict(num_attention_heads=5), "num_attention_heads", "do not divide"),
        (dict(num_key_value_heads=3), "num_key_value_heads", "do not divide"),
        (dict(sharing="middle_sequence", num_recursions=2, router="expert"), "router", "middle_cycle"),
        (dict(sharing="swirl", num_recursions=2), "sharing", "middle_cycle"),
        (dict(kv_cache="share"), "kv_cache", "parameter sharing"),
        (dict(sharing="cycle", num_recursions=2, router="expert", router_func="softmax"), "router_func", "sigmoid"),
        (dict(causal_threshold=1.5), "causal_threshold", "between 0 and 1"),
        (dict(capacities=[1.0]), "capacities", "expert-choice"),
    ],
)
def test_invalid_configs_name_the_field_and_a_fix(overrides, field, hint):
    with pytest.raises(ValueError) as error:
        MoRConfig.from_preset("tiny", **overrides)
    assert f"MoRConfig.{field}" in str(error.value)
    assert hint in str(error.value)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        MoRConfig.from_preset("gpt-5")
    with pytest.raises(ValueError, match="unknown MoRConfig field"):
        MoRConfig.from_preset("tiny", num_layers=3)


def test_json_round_trip(tmp_path):
    cfg = MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=3, router="expert",
                                capacities=[1.0, 0.5, 0.25])
    cfg.save(tmp_path / "config.json")
    assert MoRConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("text, expected", [
    ("not json", "{path} is not valid JSON (Expecting value at line 1, column 1); give the config.json of a mor "
                 "checkpoint (written by save_pretrained, training or `mor convert`)"),
    ("[1, 2]", "{path} holds an array, not a JSON object of fields; give the config.json of a mor checkpoint"),
    ('{"num_layers": 3}', "{path}: unknown MoRConfig field(s) ['num_layers']; is this a mor config.json?"),
    ('{"hidden_size": 0}', "{path}: MoRConfig.hidden_size: "),
], ids=["not-json", "not-an-object", "unknown-field", "bad-value"])
def test_a_file_that_is_no_config_is_named_with_the_fix(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        MoRConfig.load(path)
    assert str(error.value).startswith(expected.format(path=path)) and "\n" not in str(error.value)
