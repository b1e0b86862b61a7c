"""Smoke test of bench/bench_moe.py --quick: every row is there and the counted columns make sense.

The script runs in a subprocess (it starts a 1-rank process group, tunes malloc and wraps
all_to_all_single, none of which should leak into the test session). Timing is never asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import build_deepspeed_cpu_ops

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "bench_moe.py"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench_moe") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    build_deepspeed_cpu_ops(env)  # its own timeout: the first build is not the benchmark's time
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout, json.loads(out.read_text())


def expected_names() -> list[str]:
    names = ["dense SwiGLU d_ff=128"]
    names += [f"top-{k} of 8 {mode}" for k in (1, 2) for mode in ("cf 1.25", "dropless")]
    names += [f"xmoe t={t} 64x16 dropless" for t in ("0.5", "0.7", "0.9")]
    names += [f"meo k={k} of {e} L={seq}" for seq in (128, 256) for e in (8, 16) for k in (1, 2, 4, 8)]
    names += ["deepspeed MoE top-2 of 8 cf 1.25", "hf Mixtral top-2 of 8 eager", "hf Mixtral top-2 of 8 grouped_mm"]
    return names


def by_name(result: dict) -> dict:
    return {r["name"]: r for r in result["rows"]}


def test_table_has_every_row(quick_run):
    stdout, result = quick_run
    table_names = [line[:38].rstrip() for line in stdout.splitlines()]
    for name in expected_names():
        assert name in table_names, f"row {name!r} missing from the table:\n{stdout}"
    assert sorted(by_name(result)) == sorted(expected_names())
    assert "machine:" in stdout and "d_model 64" in stdout


def test_dense_is_the_baseline(quick_run):
    rows = by_name(quick_run[1])
    assert rows["dense SwiGLU d_ff=128"]["ratio_to_dense"] == pytest.approx(1.0)
    assert rows["dense SwiGLU d_ff=128"]["flops_per_token"] == 6 * 64 * 128
    for r in rows.values():
        assert r["ms"] > 0 and r["tokens_per_s"] > 0
        assert r["a2a_bytes_per_token"] == 0  # one process: no expert parallelism


def test_meo_flops_flat_in_k_topk_flops_grow(quick_run):
    rows = by_name(quick_run[1])
    d, f = 64, 128
    for seq in (128, 256):
        for e in (8, 16):
            base = rows[f"meo k=1 of {e} L={seq}"]["flops_per_token"]
            for k in (2, 4, 8):
                got = rows[f"meo k={k} of {e} L={seq}"]["flops_per_token"]
                # only the per-sequence merge grows with k: 2 (k-1) d_in d_out / L over the 3 linears
                assert got - base == pytest.approx((k - 1) * 2 * 3 * d * f / seq)
                assert got / base < 1.1
    for mode in ("dropless", "cf 1.25"):
        one, two = (rows[f"top-{k} of 8 {mode}"] for k in (1, 2))
        assert two["flops_per_token"] > 1.8 * one["flops_per_token"]
        assert two["experts_per_token"] > one["experts_per_token"]
    assert rows["top-2 of 8 dropless"]["experts_per_token"] == pytest.approx(2.0)


def test_xmoe_experts_per_token_fall_with_threshold(quick_run):
    rows = by_name(quick_run[1])
    low, mid, high = (rows[f"xmoe t={t} 64x16 dropless"] for t in ("0.5", "0.7", "0.9"))
    assert low["experts_per_token"] < mid["experts_per_token"] < high["experts_per_token"]
    assert low["flops_per_token"] < high["flops_per_token"]
