"""Presets: every shipped preset loads and validates for its task; the paper presets match the
papers; unknown keys, inconsistent values and a preset of the other task are clear errors."""
import pytest
import torch

from meo_ds.config import ConfigError, build_model_config, load_run_config, preset_dict, preset_names, read_preset
from meo_ds.models import ModelConfigError, build_model
from meo_ds.moe import MoELayer, expert_capacity

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
    # GeLU experts with biases, no z-loss (SwiGLU and z-loss stay options of MoEConfig).
    assert (cfg.moe.activation, cfg.moe.z_loss_coef, cfg.moe.aux_loss_coef) == ("gelu", 0.0, 0.01)


XMOE_PRESETS = [("xmoe_gpt", "lm"), ("xmoe_wmt", "translation")]


@pytest.mark.parametrize("name,task", XMOE_PRESETS)
def test_xmoe_presets_compute_no_more_than_the_dense_ffn(name, task):
    """Capacity: E * C expert rows (of width expert_hidden) for S tokens cost at most the dense
    FFN's S rows of width d_ff; dropless runs are bounded per token by max_k the same way."""
    cfg = build_model_config(preset_dict(name), task)
    moe = cfg.moe
    assert moe.dispatch == "capacity" and moe.max_k is not None
    for tokens in (512, 8192):  # tokens per micro-batch and rank
        for factor in (moe.capacity_factor, moe.eval_capacity_factor):
            rows = moe.num_experts * expert_capacity(tokens, 1, moe.num_experts, factor, moe.min_capacity)
            assert rows * moe.expert_hidden <= tokens * cfg.d_ff
    assert moe.max_k * moe.expert_hidden <= cfg.d_ff


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_xmoe_gpt_layer_at_initialisation_stays_within_the_bound(dispatch):
    """A freshly initialised xmoe_gpt layer (near-uniform router) runs at most max_k = 8 experts
    per token, not the ~58 of 64 that the 0.9 threshold alone would pick."""
    cfg = build_model_config(preset_dict("xmoe_gpt"), "lm")
    cfg.moe.dispatch = dispatch
    torch.manual_seed(0)
    layer = MoELayer(cfg.moe, cfg.d_model, cfg.d_ff).train()
    with torch.no_grad():
        out = layer(torch.randn(2, 256, cfg.d_model))
    assert out.stats.experts_per_token_mean <= cfg.moe.max_k
    assert out.stats.experts_per_token_mean >= (4 if dispatch == "capacity" else cfg.moe.max_k)


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
