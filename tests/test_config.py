"""LoraConfig: validation messages, matching rules, scaling, serialisation."""

import math

import pytest

from jlora import LoraConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r: rank must be an integer >= 1, got 0"),
        ({"r": 2.5}, "rank must be an integer >= 1"),
        ({"alpha": 0}, "alpha: alpha must be a number > 0, got 0"),
        ({"alpha": -1.0}, "alpha must be a number > 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        (
            {"init": "pissa_niter"},
            "init must be one of ('lora', 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora'), got 'pissa_niter'",
        ),
        ({"target_modules": "q_proj("}, "target_modules: invalid regular expression 'q_proj('"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"exclude_modules": "[k"}, "exclude_modules: invalid regular expression"),
        ({"rank_pattern": {"v(": 4}}, "rank_pattern: invalid regular expression 'v('"),
        ({"rank_pattern": {"v_proj": 0}}, "rank_pattern['v_proj']: rank must be an integer >= 1"),
        ({"alpha_pattern": {"v_proj": 0.0}}, "alpha_pattern['v_proj']: alpha must be a number > 0"),
        ({"layers": [-1]}, "layers must be non-negative layer indices"),
        ({"layers": []}, "layers must be non-negative layer indices"),
        ({"layers_pattern": "("}, "layers_pattern: invalid regular expression"),
        ({"dtype": "float33"}, "dtype: 'float33' is not a dtype"),
    ],
)
def test_invalid_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError) as err:
        LoraConfig(**kwargs)
    assert message in str(err.value)


def test_list_targets_match_path_suffixes_regex_matches_whole_path():
    listed = LoraConfig(target_modules=["q_proj", "attn/o_proj"])
    assert listed.targets("layers_0/attn/q_proj")
    assert listed.targets("layers_0/attn/o_proj")
    assert not listed.targets("layers_0/mlp/o_proj")
    assert not listed.targets("layers_0/attn/q_proj_extra")
    regex = LoraConfig(target_modules=r"layers_\d+/attn/.*")
    assert regex.targets("layers_4/attn/v_proj")
    assert not regex.targets("encoder/layers_4/attn/v_proj")  # must match the whole path


def test_exclude_wins_over_target():
    config = LoraConfig(target_modules=r".*_proj", exclude_modules=["k_proj"])
    assert config.targets("attn/q_proj") and not config.targets("attn/k_proj")


def test_layer_index_from_unrolled_and_list_paths():
    config = LoraConfig()
    assert config.layer_index("layers_11/attn/q_proj") == 11
    assert config.layer_index("model/layers/3/self_attn/q_proj") == 3
    assert config.layer_index("encoder/layer_2/attention/query") == 2
    assert config.layer_index("Dense_1") is None
    assert config.layer_index("lm_head") is None


def test_scale_alpha_over_r_and_rslora_and_patterns():
    config = LoraConfig(r=4, alpha=8, alpha_pattern={"v_proj": 32}, rank_pattern={r"layers_1/.*": 16})
    assert config.scale("attn/q_proj", 4) == 2.0
    assert config.scale("attn/v_proj", 4) == 8.0
    assert config.rank("layers_1/attn/q_proj") == 16 and config.rank("layers_0/attn/q_proj") == 4
    rs = LoraConfig(r=4, alpha=8, use_rslora=True)
    assert rs.scale("q_proj", 4) == 8 / math.sqrt(4) == 4.0


def test_config_is_hashable_and_round_trips_through_a_dict():
    config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, layers=[3, 1], dtype="bfloat16")
    assert hash(config) == hash(LoraConfig(**config.to_dict()))
    assert LoraConfig(**config.to_dict()) == config
    assert config.layers == (1, 3) and config.dtype == "bfloat16"


def test_all_linear_shorthand_targets_all_but_heads_and_saved_modules():
    for given in ("all-linear", "ALL-LINEAR", ["all-linear"]):  # peft lowercases it; the CLI gives a list
        assert LoraConfig(target_modules=given).target_modules == "all-linear"
    config = LoraConfig(target_modules="all-linear", modules_to_save=["score"], exclude_modules=["down_proj"])
    assert config.targets("model/layers_0/attn/q_proj") and config.targets("pooler/dense")
    assert not any(config.targets(p) for p in ("lm_head", "classifier", "score", "model/layers_0/mlp/down_proj"))
    assert LoraConfig(**config.to_dict()) == config


def test_a_quantized_run_adapts_every_linear_layer_unless_told():
    from jlora.finetune import Run

    assert Run().lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert Run(train={"quantize": "bf16"}).lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    for quantize in ("nf4", "int8"):
        assert Run(train={"quantize": quantize}).lora.target_modules == "all-linear"
    assert Run(train={"quantize": "nf4"}, lora={"target_modules": ["q_proj"]}).lora.target_modules == ("q_proj",)
