"""Presets: every shipped preset loads and validates for its task; the paper presets match the
papers; unknown keys, inconsistent values and a preset of the other task are clear errors."""
import pytest

from meo_ds.config import ConfigError, build_model_config, load_run_config, preset_dict, preset_names, read_preset
from meo_ds.models import ModelConfigError, build_model

PRESETS = preset_names()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    task, tree = read_preset(name)
    assert task in ("lm", "translation")
    build_model_config(tree, task).validate()


def test_xmoe_gpt_matches_paper():
    cfg = build_model_config(preset_dict("xmoe_gpt"), "lm")
    assert (cfg.n_layers, cfg.d_model, cfg.max_seq_len) == (12, 768, 1024)
    assert (cfg.moe.kind, cfg.moe.num_experts, cfg.moe.expert_hidden) == ("xmoe", 64, 384)
    assert [i for i in range(12) if cfg.is_moe_layer(i)] == [1, 3, 5, 7, 9, 11]


def test_xmoe_wmt_is_transformer_base_with_small_experts_in_the_encoder():
    cfg = build_model_config(preset_dict("xmoe_wmt"), "translation")
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.encoder_layers, cfg.decoder_layers) == (512, 8, 2048, 6, 6)
    assert (cfg.vocab_size, cfg.label_smoothing, cfg.positions) == (32000, 0.1, "sinusoidal")
    assert (cfg.moe.kind, cfg.moe.num_experts, cfg.moe.expert_hidden, cfg.moe.capacity_factor) == ("xmoe", 64, 1024, 2.0)
    assert [i for i in range(6) if cfg.is_moe_layer("encoder", i)] == [1, 3, 5]
    assert not any(cfg.is_moe_layer("decoder", i) for i in range(6))


def test_tiny_presets_build():
    for name, task in (("tiny", "lm"), ("mt_tiny", "translation")):
        model = build_model(build_model_config(preset_dict(name), task))
        assert model.param_counts()["total"] < 2_000_000


def test_unknown_key_and_inconsistent_value():
    tree = dict(preset_dict("tiny"), n_layerz=3)
    with pytest.raises(ConfigError, match="n_layerz"):
        build_model_config(tree, "lm")
    bad = build_model_config(dict(preset_dict("tiny"), n_heads=3), "lm")
    with pytest.raises(ModelConfigError, match="n_heads"):
        bad.validate()


def test_preset_of_the_other_task_is_a_clear_error(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("task: lm\nmodel: {preset: mt_tiny}\ndata: {path: x}\n")
    with pytest.raises(ConfigError, match="'translation' model but the run's task is 'lm'.*tiny"):
        load_run_config(str(run))
