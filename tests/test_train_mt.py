"""Translation through the trainer on 2 CPU ranks, ep=2, ZeRO-2: the demo parallel task is learnt.

Model: tests/workers/tiny_mt.py (real meo_ds.moe top-k layers in the encoder, greedy decoding;
the model zoo's beam search is not used here). Measured on 2 cores: BLEU 82.4 / chrF 91.9 on
200 validation pairs after 300 steps (~30 s of training); the floors leave a wide margin.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_helpers
from train_helpers import CPU_DS, metrics, write_config

SCRIPT = train_helpers.REPO_ROOT / "tests" / "workers" / "tiny_mt.py"
BLEU_FLOOR, CHRF_FLOOR = 50.0, 70.0


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("mt", tmp_path_factory.mktemp("mt_demo"))


def test_tiny_translation_model_learns_the_demo_task(mt_data, tmp_path):
    out = tmp_path / "mt"
    out.mkdir()
    config = write_config(out / "run.yaml", {
        "task": "translation", "name": "tiny-mt",
        "model": {"vocab_size": 512, "moe": {"num_experts": 4, "top_k": 2, "ep_size": 2}},
        "data": {"path": str(mt_data), "max_tokens": 1024},
        "train": {"steps": 300, "micro_batch_size": 1, "lr": 3e-3, "warmup_steps": 30, "betas": [0.9, 0.98],
                  "weight_decay": 0.0, "seed": 3},
        "logging": {"out_dir": str(out), "interval": 50},
        "checkpoint": {"save_at_end": False},
        "eval": {"max_batches": 4, "bleu_sentences": 200, "max_new_tokens": 48},
    })
    proc = train_helpers.train(config, ds_config=CPU_DS, script=SCRIPT, timeout=300)
    result = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert result["bleu_sentences"] == 200
    assert result["bleu"] > BLEU_FLOOR and result["chrf"] > CHRF_FLOOR, result
    steps = metrics(out)
    assert steps[29]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] == pytest.approx(3e-3 * (30 / 300) ** 0.5)
    assert "bleu" in proc.stdout and "val_loss" in proc.stdout
