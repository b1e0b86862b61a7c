"""The shipped run configs (launch/configs/*.yaml) and the model sizes they may leave to the corpus.

  every config    loads and validates with data.path pointing at a prepared corpus of its task;
                  one left `auto` gets its vocabulary and longest sequence from that corpus
  small_lm.yaml   trains 3 steps on 2 CPU ranks against a 2000-piece corpus: config.json and the
                  checkpoint's saved run config hold the numbers (resume/export rebuild the model)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_helpers
from distributed import REPO_ROOT
from test_train_dist import lm_data  # noqa: F401  (a fixture: the demo LM corpus, vocabulary 2000)
from train_helpers import CPU_DS

CONFIGS = sorted((REPO_ROOT / "launch" / "configs").glob("*.yaml"))
AUTO_CONFIGS = {"small_lm.yaml", "small_mt.yaml"}


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("mt", tmp_path_factory.mktemp("mt_demo"), pairs=2000, vocab_size=400)


def corpus_vocab(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def longest_pair(data: Path) -> int:
    from meo_ds.data import MTDataset

    splits = json.loads((data / "manifest.json").read_text())["splits"]
    return max(max(int(d.src_lens.max()), int(d.tgt_lens.max())) for d in (MTDataset(data, s) for s in splits))


def test_the_small_configs_are_shipped():
    assert AUTO_CONFIGS <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, lm_data, mt_data):
    from meo_ds.config import load_run_config
    from meo_ds.preflight import check_data

    task = load_run_config(str(path)).task
    data = lm_data if task == "lm" else mt_data
    cfg = load_run_config(str(path), [f"data.path={data}"]).validate()
    if path.name not in AUTO_CONFIGS:
        assert cfg.unresolved_sizes() == []
        return
    assert cfg.unresolved_sizes() == ["vocab_size", "max_seq_len"]
    check_data(cfg)
    assert cfg.unresolved_sizes() == []
    assert cfg.model.vocab_size == corpus_vocab(data) and cfg.model.vocab_size not in (8000, 1000, 256)
    assert cfg.model.max_seq_len == (cfg.data.seq_len if task == "lm" else longest_pair(mt_data) + 1)
    assert cfg.to_dict()["model"]["vocab_size"] == cfg.model.vocab_size
    dense = load_run_config(str(path), [f"data.path={data}", "model.moe=null"]).validate()
    assert dense.model.moe is None and dense.moe_configs() == []


def test_auto_is_only_for_the_sizes_the_corpus_knows():
    from meo_ds.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="model.d_model=auto: only model.vocab_size and model.max_seq_len can be auto"):
        load_run_config(str(REPO_ROOT / "launch" / "configs" / "small_lm.yaml"), ["model.d_model=auto"])


def test_a_run_with_auto_sizes_saves_the_numbers(lm_data, tmp_path):
    from meo_ds import checkpoint as ckpt
    from meo_ds.config import load_run_config
    from meo_ds.preflight import check_checkpoints, check_data, saved_run_config

    out = tmp_path / "run"
    sets = [f"data.path={lm_data}", f"logging.out_dir={out}", "data.seq_len=32", "train.micro_batch_size=4",
            "train.steps=3", "train.warmup_steps=1", "eval.max_batches=2", "checkpoint.interval=0"]
    config = REPO_ROOT / "launch" / "configs" / "small_lm.yaml"
    train_helpers.train(config, CPU_DS, sets, timeout=300)
    written = json.loads((out / "config.json").read_text())["model"]
    assert (written["vocab_size"], written["max_seq_len"]) == (2000, 32)
    saved = saved_run_config(ckpt.resolve("auto", out / "checkpoints"), "checkpoint.resume")
    assert (saved["model"]["vocab_size"], saved["model"]["max_seq_len"]) == (2000, 32)
    again = load_run_config(str(config), sets + ["train.steps=4"])
    check_data(again, 2)
    check_checkpoints(again, 2)  # the resume's pre-flight: same model, same data stream
