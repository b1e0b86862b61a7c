"""Run a script on several real ranks through the `deepspeed` launcher (CPU, gloo).

Multi-rank tests write a small worker script (or use one under tests/), launch it here, and
assert on what the ranks wrote to `out_dir` or on the exit status: the workers themselves
raise on any mismatch, so a failing rank fails the test with its traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from meo_ds.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def launch_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def run_ranks(
    script: str | Path,
    num_ranks: int,
    args: Sequence[str] = (),
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Launch `script` on `num_ranks` CPU ranks with the deepspeed launcher and wait for it."""
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(num_ranks),
        "--master_port", str(free_port()),
        str(script), *args,
    ]
    proc = subprocess.run(cmd, env=launch_env(env), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        tail = (proc.stdout + "\n" + proc.stderr)[-8000:]
        raise AssertionError(f"{num_ranks}-rank run of {script} failed (exit {proc.returncode}):\n{tail}")
    return proc
