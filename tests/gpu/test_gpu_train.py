"""The real trainer on GPUs (NCCL, bf16, ZeRO-2), through the deepspeed launcher, every collective
audited (tests/workers/collective_audit.py); skipped without CUDA.

- each MoE kind trains 12 bf16 steps on 1 GPU: finite losses that decrease, a clean audit;
- the GPU-trained checkpoints export (meo-export) and load on the CPU, in a process that sees no
  GPU, and transformers gives meo_ds's logits and greedy tokens (tests/export/fresh_check.py);
- with 2+ GPUs: top-k at ep=2 gives ep=1's losses step for step (bf16 tolerance).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_helpers import KINDS, VOCAB, lm_config, train_on_gpus  # noqa: E402
from test_collectives import check_audit  # noqa: E402
from tests.distributed import REPO_ROOT, launch_env  # noqa: E402
from tests.export.export_fresh import run_fresh_check  # noqa: E402
from train_helpers import losses  # noqa: E402

STEPS = 12


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("lm", tmp_path_factory.mktemp("gpu_lm"), max_chars=300_000, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trained(lm_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_runs")
    train_on_gpus([lm_config(root / kind, lm_data, kind, steps=STEPS) for kind in KINDS])
    return root


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_bf16_zero2_on_one_gpu(trained, kind):
    out = trained / kind
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1)), f"steps logged: {sorted(loss)}"
    assert all(v is not None and v == v and abs(v) < 100 for v in loss.values()), loss
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.1, f"{kind}: loss did not decrease: {first:.3f} -> {last:.3f}"
    log = (out / "train.log").read_text()
    assert "zero=2 precision=bf16" in log and "device=cpu" not in log, log[:2000]
    assert "val_loss" in log and "tok/s" in log
    check_audit(out, 1, ["train_step", "_global_routing_loads", "validation_loss"])


def test_gpu_checkpoints_export_and_load_on_cpu(trained, tmp_path, monkeypatch):
    """meo-export (cast to float32, as for CPU inference) and meo_ds's own loader on the CPU only,
    then transformers in a fresh process without GPU or meo_ds."""
    script = (
        "import sys, json, torch\n"
        "assert not torch.cuda.is_available()\n"
        "from meo_ds.export.cli import main\n"
        "from meo_ds.export.exporter import load_model\n"
        "from tests.export.test_export_end_to_end import _reference\n"
        "root, out, specs = sys.argv[1], sys.argv[2], []\n"
        "for kind in sys.argv[3:]:\n"
        "    ckpt = f'{root}/{kind}/checkpoints'\n"
        "    assert main([ckpt, f'{out}/hf_{kind}', '--dtype', 'float32']) == 0\n"
        "    model = load_model(ckpt)[0]\n"
        "    assert all(p.device.type == 'cpu' for p in model.parameters())\n"
        "    _reference(model, f'{out}/ref_{kind}.pt')\n"
        "    specs.append({'dir': f'{out}/hf_{kind}', 'task': 'lm', 'trust_remote_code': kind != 'topk',\n"
        "                  'ref': f'{out}/ref_{kind}.pt'})\n"
        "print('SPECS', json.dumps(specs))\n"
    )
    env = launch_env({"CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.run([sys.executable, "-c", script, str(trained), str(tmp_path), *KINDS], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    specs = json.loads(proc.stdout.split("SPECS ", 1)[1])
    assert json.loads((tmp_path / "hf_topk" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run_fresh_check(specs, tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ep2_equals_ep1_on_two_gpus(lm_data, tmp_path):
    """Same initial weights (the ep=1 run's step-0 checkpoint), 2 GPU ranks, ZeRO-2 bf16."""
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    train_on_gpus([lm_config(ep1, lm_data, "topk", ep=1, checkpoint={"save_initial": True})], num_gpus=2)
    init = ep1 / "checkpoints" / "step_00000000"
    train_on_gpus([lm_config(ep2, lm_data, "topk", ep=2, checkpoint={"init_from": str(init)})], num_gpus=2)
    a, b = losses(ep1), losses(ep2)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:  # bf16 activations: the two layouts round differently, by far less than this
        assert b[step] == pytest.approx(a[step], rel=3e-2, abs=3e-2), f"step {step}: ep1 {a[step]} vs ep2 {b[step]}"
    check_audit(ep2, 2, ["train_step", "all_reduce_max_int", "_global_routing_loads", "validation_loss"])
