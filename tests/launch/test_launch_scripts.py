"""The launch recipes (launch/*.sh, launch/slurm.sbatch) run as a user runs them, on CPU ranks.

  stop        SIGTERM to launch/cpu.sh's pid mid-run       -> the ranks save a checkpoint, every
              process of the job exits (none orphaned), the script exits 0
  two nodes   launch/multi_node.sh started once per "node" (NODE_RANK 0 and 1, one CPU rank each,
              ep 2 spanning both) trains and checkpoints; a second invocation resumed from its
              step-4 checkpoint repeats its steps 5-8 exactly
  SLURM       launch/slurm.sbatch with MEO_DRY_RUN=1 under fake SLURM variables prints the srun
              command and each node's rank commands, which parse back to the trainer's arguments
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil

from distributed import REPO_ROOT, launch_env
from meo_ds.distributed import free_port
from test_train_dist import lm_data, lm_run  # noqa: F401  (lm_data is a fixture)
from train_helpers import CPU_DS, losses, metrics, write_config

LAUNCH = REPO_ROOT / "launch"


def tiny_demo_args(data: Path, out: Path, *extra: str) -> list[str]:
    """launch/configs/demo_lm.yaml shrunk to the test corpus and a few seconds per run."""
    sets = [f"data.path={data}", "model.vocab_size=2000", f"logging.out_dir={out}", "data.seq_len=32",
            "train.micro_batch_size=4", "logging.interval=2", "eval.interval=0", "eval.at_end=false", *extra]
    args = ["--config", str(LAUNCH / "configs" / "demo_lm.yaml"), "--deepspeed_config", CPU_DS]
    for item in sets:
        args += ["--set", item]
    return args


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=launch_env(env), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            kill_all(psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        proc.kill()


def test_sigterm_to_the_launch_script_saves_and_leaves_no_process(lm_data, tmp_path):
    out = tmp_path / "stop"
    proc = start([str(LAUNCH / "cpu.sh"), *tiny_demo_args(lm_data, out, "train.steps=500", "debug.step_sleep_s=0.3",
                                                          "checkpoint.interval=0")],
                 {"MASTER_PORT": str(free_port())})
    job = []
    try:
        deadline = time.time() + 120
        while not any(m["step"] >= 3 for m in metrics(out)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.05)
        job = psutil.Process(proc.pid).children(recursive=True)  # (runner,) launch, 2 ranks
        assert sum("--local_rank=" in " ".join(p.cmdline()) for p in job) == 2, [p.cmdline() for p in job]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(job, timeout=5)
        left = [" ".join(p.cmdline()[2:5]) for p in alive]
    finally:
        kill_tree(proc)
        kill_all(job)
    text = proc.stdout.read()
    assert not left, f"left running after the script exited: {left}"
    assert proc.returncode == 0, text[-4000:]
    assert "[launch] TERM: SIGTERM to the ranks" in text
    stopped = max(losses(out))
    assert 3 <= stopped < 500 and f"stopping on SIGTERM after step {stopped}" in text, text[-3000:]
    tag = out / "checkpoints" / f"step_{stopped:08d}"
    assert (out / "checkpoints" / "latest").read_text() == tag.name and (tag / "COMPLETE").is_file()


def two_nodes(args: list[str], tmp_path: Path) -> list[str]:
    """launch/multi_node.sh on two "nodes" of this machine, one CPU rank each; their outputs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [start([str(LAUNCH / "multi_node.sh"), *args], dict(env, NODE_RANK=str(rank))) for rank in (0, 1)]
    try:
        texts = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node)
    for node, text in zip(nodes, texts):
        assert node.returncode == 0, text[-4000:]
    return texts


def test_two_nodes_without_ssh_train_checkpoint_and_resume_exactly(lm_data, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    texts = two_nodes(tiny_demo_args(lm_data, a, "train.steps=8", "checkpoint.interval=4"), tmp_path)
    assert "world=2 ep=2" in texts[0] and "--node_rank=1" in texts[1]
    assert (a / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    texts = two_nodes(tiny_demo_args(lm_data, b, "train.steps=8", "checkpoint.interval=4",
                                     f"checkpoint.resume={a / 'checkpoints' / 'step_00000004'}"), tmp_path)
    assert f"resumed exactly from {a / 'checkpoints' / 'step_00000004'} at step 4" in texts[0]
    first, resumed = losses(a), losses(b)
    assert sorted(first) == list(range(1, 9)) and sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {s: first[s] for s in resumed}, (first, resumed)


def test_slurm_dry_run_prints_each_nodes_rank_commands(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\n"
                                   "[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    args = ["--config", "run.yaml", "--deepspeed_config", "ds_configs/zero2_bf16.json", "--set", "data.path=/data/my lm"]
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", MEO_DRY_RUN="1", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="2", MASTER_PORT="29611")
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "environment: MASTER_ADDR=gpu07 MASTER_PORT=29611 WORLD_SIZE=4"
    srun = shlex.split(lines[1].removeprefix("srun command: "))
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"] and srun[5:] == ["_", *args]
    assert 'RANK="${SLURM_PROCID}" LOCAL_RANK="${SLURM_LOCALID}"' in srun[4] and 'python -m meo_ds.train "$@"' in srun[4]
    expected = [("gpu07", 0, 0), ("gpu07", 1, 1), ("gpu08", 2, 0), ("gpu08", 3, 1)]
    assert len(lines) == 2 + len(expected)
    for line, (node, rank, local) in zip(lines[2:], expected):
        host, command = line.split(": ", 1)
        assert host == node
        assert shlex.split(command) == [f"RANK={rank}", f"LOCAL_RANK={local}", "python", "-m", "meo_ds.train", *args]
