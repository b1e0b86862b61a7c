"""Helpers for the trainer tests: write run configs, launch meo_ds.train on CPU ranks, read metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil
import yaml

from distributed import REPO_ROOT, launch_env
from meo_ds.distributed import free_port

TRAIN_SCRIPT = REPO_ROOT / "tests" / "workers" / "train_worker.py"
CPU_DS = str(REPO_ROOT / "ds_configs" / "cpu_fp32.json")
CPU_DS_ZERO0 = str(REPO_ROOT / "ds_configs" / "cpu_fp32_zero0.json")


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def small_lm_run(out: Path, data: Path, model: dict, *overrides: dict, path: Optional[Path] = None) -> Path:
    """The run config (written to `path`, default out/run.yaml) of a small LM run on `data` with the
    model mapping `model`: seq_len 32, micro-batch 4, lr 3e-3, no periodic checkpoints, logs in
    `out` every 4 steps, 2 evaluation batches. Each mapping of `overrides`, in order, updates the
    sections it names key by key."""
    out.mkdir(parents=True, exist_ok=True)
    tree = {
        "task": "lm", "name": out.name, "model": model,
        "data": {"path": str(data), "seq_len": 32},
        "train": {"micro_batch_size": 4, "lr": 3e-3},
        "checkpoint": {"interval": 0},
        "logging": {"out_dir": str(out), "interval": 4},
        "eval": {"max_batches": 2},
    }
    for sections in overrides:
        for key, value in sections.items():
            tree[key] = {**tree.get(key, {}), **value}
    return write_config(path or out / "run.yaml", tree)


def wait_for_step(proc: subprocess.Popen, out_dir: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl in `out_dir` reaches `step`; AssertionError with the run's output if it
    ends or times out first."""
    deadline = time.time() + timeout
    while not any(m["step"] >= step for m in metrics(out_dir)):
        if proc.poll() is not None or time.time() > deadline:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"run ended or timed out before step {step}:\n{((stdout or '') + (stderr or ''))[-5000:]}")
        time.sleep(0.05)


def launch_cmd(config: Path, ds_config: str, overrides: Sequence[str] = (), num_ranks: int = 2,
               script: Optional[Path] = None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), str(script or TRAIN_SCRIPT), "--config", str(config), "--deepspeed_config", ds_config]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def train(config: Path, ds_config: str = CPU_DS, overrides: Sequence[str] = (), num_ranks: int = 2,
          timeout: float = 240, expect_rc: Optional[int] = 0, script: Optional[Path] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(config, ds_config, overrides, num_ranks, script), env=launch_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and (proc.returncode == 0) != (expect_rc == 0):
        tail = (proc.stdout + "\n" + proc.stderr)[-6000:]
        raise AssertionError(f"training exited {proc.returncode}, expected {expect_rc}:\n{tail}")
    return proc


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out_dir)}


def rank_pids(launcher_pid: int, rank: int) -> list[int]:
    procs = psutil.Process(launcher_pid).children(recursive=True)
    return [p.pid for p in procs if f"--local_rank={rank}" in " ".join(p.cmdline())]


def train_and_signal(config: Path, out_dir: Path, at_step: int, rank: int = 1, sig: int = signal.SIGTERM,
                     ds_config: str = CPU_DS, overrides: Sequence[str] = (), timeout: float = 240,
                     script: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Launch, wait until step `at_step` is logged, send `sig` to one rank only, wait for the end."""
    proc = subprocess.Popen(launch_cmd(config, ds_config, overrides, 2, script), env=launch_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while not any(m["step"] >= at_step for m in metrics(out_dir)):
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"run ended or timed out before step {at_step}:\n{proc.communicate()[0][-5000:]}")
            time.sleep(0.05)
        for pid in rank_pids(proc.pid, rank):
            os.kill(pid, sig)
        out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
