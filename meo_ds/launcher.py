"""Starting `meo_ds.train` through the real `deepspeed` launcher (meo-demo, meo-study).

One way to launch: CPU ranks (DS_ACCELERATOR=cpu, OMP threads split between them) when there
are not enough GPUs, otherwise GPUs in bf16; a free rendezvous port per launch; the trainer's
`[meo-train]` lines and errors echoed with the caller's prefix. A hostfile (multi-node) is passed
to the launcher unchanged.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def use_gpus(ranks: int) -> bool:
    """Whether `ranks` local GPUs are there (and DS_ACCELERATOR does not ask for the CPU)."""
    import torch

    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= ranks


def ds_config(gpu: bool) -> dict:
    """ZeRO-2 with a CSV monitor; bf16 and overlapped communication on GPUs."""
    cfg = {"zero_optimization": {"stage": 2, "overlap_comm": gpu, "contiguous_gradients": True},
           "csv_monitor": {"enabled": True, "output_path": "auto", "job_name": "auto"}}
    if gpu:
        cfg["bf16"] = {"enabled": True}
    return cfg


def launch(config_path: Path, ds_path: Path, ranks: int, gpu: bool, overrides: Sequence[str] = (),
           prefix: str = "meo-demo", hostfile: Optional[str] = None, num_nodes: Optional[int] = None) -> int:
    """Run the trainer on `ranks` processes per node; returns the launcher's exit status."""
    from meo_ds.distributed import free_port

    env = dict(os.environ)
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_nodes:
        cmd += ["--num_nodes", str(num_nodes)]
    cmd += ["--master_port", str(free_port()), "--module", "meo_ds.train",
            "--config", str(config_path), "--deepspeed_config", str(ds_path)]
    for item in overrides:
        cmd += ["--set", item]
    print(f"[{prefix}] $ " + ("DS_ACCELERATOR=cpu " if not gpu else "") + " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[meo-train]" in line or "Error" in line or "error" in line:
            print(line, end="", flush=True)
    return proc.wait()
