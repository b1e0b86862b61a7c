"""The trainer with the model zoo's `tiny` preset (meo_ds.models) on 2 CPU ranks, ep=2, ZeRO-2."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_helpers
from train_helpers import CPU_DS, losses, write_config


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("lm", tmp_path_factory.mktemp("lm_demo_models"), max_chars=500_000, vocab_size=2000)


def run_tree(out: Path, data: Path, vocab: int) -> dict:
    return {"task": "lm", "name": "tiny-preset",
            "model": {"preset": "tiny", "vocab_size": vocab, "moe": {"kind": "xmoe", "num_experts": 4}},
            "parallel": {"ep_size": 2},
            "data": {"path": str(data), "seq_len": 64},
            "train": {"steps": 30, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 5},
            "logging": {"out_dir": str(out), "interval": 10}, "eval": {"max_batches": 2},
            "checkpoint": {"save_at_end": False}}


def test_tiny_preset_xmoe_learns_on_two_ranks(lm_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = train_helpers.train(write_config(out / "run.yaml", run_tree(out, lm_data, 2000)), ds_config=CPU_DS)
    loss = losses(out)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    assert "moe[L0:bal" in proc.stdout and "val_loss" in proc.stdout


def test_vocabulary_too_small_for_the_tokenizer_is_a_config_error(lm_data, tmp_path):
    from meo_ds.config import ConfigError
    from meo_ds.preflight import check_data
    from meo_ds.config import run_config_from_dict, _resolve_model_tree

    tree = run_tree(tmp_path, lm_data, 256)
    tree["model"] = _resolve_model_tree(tree["model"], "lm")
    cfg = run_config_from_dict(tree)
    with pytest.raises(ConfigError, match="has 2000 tokens but model.vocab_size=256; set --set model.vocab_size=2000"):
        check_data(cfg)
