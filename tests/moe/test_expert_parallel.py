"""Expert parallelism and DeepSpeed integration on real CPU ranks (gloo, deepspeed launcher).

The workers under tests/moe/workers/ raise on any mismatch; see their docstrings for what each
compares. Capacity mode is compared per rank (C comes from each rank's own real-token count).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed import REPO_ROOT, launch_env, run_ranks

WORKERS = Path(__file__).parent / "workers"


def test_ep2_layer_equals_single_process_layer_outputs_and_grads():
    """top-k and XMoE, capacity and dropless, plus uneven routing (all to expert 0, a rank with no tokens)
    and shared ranks (every token's experts on one rank)."""
    proc = run_ranks(WORKERS / "ep_equivalence.py", 2, timeout=240)
    for case in ("topk/capacity", "topk/dropless", "xmoe/capacity", "xmoe/dropless"):
        for rank in (0, 1):
            assert f"rank {rank} {case} ok" in proc.stdout
            assert f"rank {rank} uneven {case} ok" in proc.stdout
            assert f"rank {rank} shared {case} ok" in proc.stdout


def _expert_files(ckpt: Path) -> list[str]:
    return sorted(p.name for p in (ckpt / "t").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))


def test_deepspeed_zero_0_1_2_step_matches_reference_and_checkpoint_reloads_at_ep1(tmp_path):
    proc = run_ranks(WORKERS / "ds_train.py", 2, [str(tmp_path), "1", "0,1,2"], timeout=300)
    for stage in (0, 1, 2):
        assert f"rank 0 ZeRO-{stage} ep=2 edp=1: matches the reference" in proc.stdout
    want = [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)]
    assert _expert_files(tmp_path / "ckpt") == want
    # Each file holds exactly one expert, under its global id.
    keys = torch.load(tmp_path / "ckpt" / "t" / want[3], weights_only=False).keys()
    assert keys and all(".deepspeed_moe.experts.deepspeed_experts.3." in k for k in keys)
    proc = run_ranks(WORKERS / "ds_load.py", 1, [str(tmp_path)], timeout=300)
    assert "rank 0: 2 outputs equal after reload at ep=1" in proc.stdout


def test_four_ranks_ep2_times_edp2_zero_steps_match_reference(tmp_path):
    proc = run_ranks(WORKERS / "ds_train.py", 4, [str(tmp_path), "2", "0,1,2"], timeout=400)
    for stage in (0, 1, 2):
        for rank in range(4):
            assert f"rank {rank} ZeRO-{stage} ep=2 edp=2: matches the reference" in proc.stdout


def test_world_size_not_divisible_by_ep_size_is_a_clear_error():
    code = (
        "import torch.distributed as dist, tempfile\n"
        "from meo_ds.moe import MoEConfig, MoELayer\n"
        "from meo_ds.parallel import ParallelizeError, parallelize\n"
        "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1)\n"
        "layer = MoELayer(MoEConfig(num_experts=4), 8, 16)\n"
        "try:\n    parallelize(layer, 2)\n"
        "except ParallelizeError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=launch_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert "ERR" in proc.stdout, proc.stdout + proc.stderr
    assert "world size 1 is not divisible by ep_size=2" in proc.stdout


def test_two_ranks_ep1_plain_data_parallel_experts_match_reference(tmp_path):
    proc = run_ranks(WORKERS / "ds_train.py", 2, [str(tmp_path), "2", "0,2"], timeout=300)
    for stage in (0, 2):
        assert f"rank 1 ZeRO-{stage} ep=1 edp=2: matches the reference" in proc.stdout
