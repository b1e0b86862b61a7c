"""Run a script on several real ranks through the `deepspeed` launcher (CPU, gloo).

Multi-rank tests write a small worker script (or use one under tests/), launch it here, and
assert on what the ranks wrote to `out_dir` or on the exit status: the workers themselves
raise on any mismatch, so a failing rank fails the test with its traceback.

Every CPU launch environment (`launch_env`) first makes sure DeepSpeed's CPU communication op is
built, once per test session, in a process of its own with its own timeout
(`build_deepspeed_cpu_ops`): the first build takes ~35 s on an idle 2-core machine and ~4 min
under load, and would otherwise land inside whichever test launches ranks first and eat its
timeout. The op lives in this environment's extension cache (tests/conftest.py sets
TORCH_EXTENSIONS_DIR as meo_ds.distributed does for runs), so later sessions only load it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from meo_ds.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS_BUILD_TIMEOUT_S = 900  # the first build of the op: ~35 s idle, ~4 min on 2 loaded cores; margin
_ops_build: dict[str, str] = {}  # "error": "" once built; the failure's text, so it is not retried per test


def build_deepspeed_cpu_ops(env: dict) -> None:
    """Build (or load from the extension cache) DeepSpeed's CPU shared-memory communication op with
    DeepSpeed's own builder call, the one deepspeed.init_distributed makes; once per session."""
    if "error" not in _ops_build:
        code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
        proc = subprocess.run([sys.executable, "-c", code], env={**env, "DS_ACCELERATOR": "cpu"}, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=OPS_BUILD_TIMEOUT_S)
        _ops_build["error"] = "" if proc.returncode == 0 else (
            f"building DeepSpeed's CPU communication op failed (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-5000:]}")
    if _ops_build["error"]:
        raise AssertionError(_ops_build["error"])


def launch_env(extra: dict | None = None) -> dict:
    """The environment of a launched test process (CPU ranks unless `extra` says otherwise); for CPU
    ranks, DeepSpeed's CPU op is built first (module docstring)."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    if env["DS_ACCELERATOR"] == "cpu":
        build_deepspeed_cpu_ops(env)
    return env


def run_ranks(
    script: str | Path,
    num_ranks: int,
    args: Sequence[str] = (),
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Launch `script` on `num_ranks` CPU ranks with the deepspeed launcher and wait for it.

    Past `timeout` seconds the launcher and every rank are killed (they run in a session of their
    own) and the test fails with their output: ranks stuck in a collective would otherwise outlive
    the test, holding cores and memory for the rest of the suite.
    """
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(num_ranks),
        "--master_port", str(free_port()),
        str(script), *args,
    ]
    proc = subprocess.Popen(cmd, env=launch_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{num_ranks}-rank run of {script} did not end within {timeout} s; every rank was "
                             f"killed:\n{_tail(stdout, stderr)}") from None
    except BaseException:  # interrupted: the ranks go too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{num_ranks}-rank run of {script} failed (exit {proc.returncode}):\n"
                             f"{_tail(stdout, stderr)}")
    return proc


def _tail(stdout: str, stderr: str) -> str:
    """The end of a launch's output, for a failure message."""
    return (stdout + "\n" + stderr)[-8000:]


def run_ranks_without_launcher(argv: Sequence[str], num_ranks: int, timeout: float = 120,
                               env: dict | None = None,
                               rank_args: Sequence[Sequence[str]] = ()) -> list[subprocess.CompletedProcess]:
    """Start `argv` once per rank with the rank variables a scheduler sets (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT, as srun or torchrun would) and wait for every one. Unlike the
    deepspeed launcher, nothing kills the others when one rank exits, so a test sees what each
    rank does on its own: whether it exits, with what status and message. `rank_args[r]` (if
    given) is appended to rank r's argv."""
    base = launch_env(env)
    base.update(WORLD_SIZE=str(num_ranks), LOCAL_WORLD_SIZE=str(num_ranks), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([*argv, *(rank_args[r] if rank_args else ())], cwd=REPO_ROOT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(num_ranks)]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results
