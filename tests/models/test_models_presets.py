"""Presets: every shipped preset loads and validates; unknown keys and inconsistent values are clear errors."""
import pytest

from meo_ds.config import ConfigError, build_model_config, preset_dict, preset_dir
from meo_ds.models import ModelConfigError

PRESETS = sorted(p.stem for p in preset_dir().glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    cfg = build_model_config(preset_dict(name), "lm")
    cfg.validate()


def test_xmoe_gpt_matches_paper():
    cfg = build_model_config(preset_dict("xmoe_gpt"), "lm")
    assert (cfg.n_layers, cfg.d_model, cfg.max_seq_len) == (12, 768, 1024)
    assert (cfg.moe.kind, cfg.moe.num_experts, cfg.moe.expert_hidden) == ("xmoe", 64, 384)
    assert [i for i in range(12) if cfg.is_moe_layer(i)] == [1, 3, 5, 7, 9, 11]


def test_unknown_key_and_inconsistent_value():
    tree = dict(preset_dict("tiny"), n_layerz=3)
    with pytest.raises(ConfigError, match="n_layerz"):
        build_model_config(tree, "lm")
    bad = build_model_config(dict(preset_dict("tiny"), n_heads=3), "lm")
    with pytest.raises(ModelConfigError, match="n_heads"):
        bad.validate()
