"""Shared by tests/gpu: the CUDA accelerator in-process, trainer launches on GPUs, run configs.

tests/conftest.py makes DeepSpeed default to its CPU accelerator for the whole session; the GPU
tests select CUDA explicitly: `cuda_accelerator()` for in-process code, DS_ACCELERATOR=cuda in
the environment of launched ranks.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

from meo_ds.distributed import free_port
from tests.distributed import REPO_ROOT, launch_env
from train_helpers import small_lm_run

AUDIT_WORKER = REPO_ROOT / "tests" / "workers" / "collective_audit.py"
ZERO2_BF16 = str(REPO_ROOT / "ds_configs" / "zero2_bf16.json")
VOCAB = 1000
# kind -> MoE section (every layer MoE: top-k exports as a native Mixtral): top-k capacity,
# XMoE dropless (grouped GEMM in bf16), MEO.
KINDS = {
    "topk": {"kind": "topk", "dispatch": "capacity"},
    "xmoe": {"kind": "xmoe", "dispatch": "dropless", "threshold": 0.6},
    "meo": {"kind": "meo", "noisy_gating": True, "segment_len": 8},
}


@contextlib.contextmanager
def cuda_accelerator() -> Iterator[None]:
    """DeepSpeed's CUDA accelerator for the block (the session default is the CPU one)."""
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    previous = real_accelerator.ds_accelerator
    real_accelerator.set_accelerator(CUDA_Accelerator())
    try:
        yield
    finally:
        real_accelerator.ds_accelerator = previous


def lm_config(out: Path, data: Path, kind: str, ep: int = 1, steps: int = 12, **sections) -> Path:
    model = {"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
             "max_seq_len": 64, "moe_every": 1, "moe_offset": 0,
             "moe": {"num_experts": 4, "top_k": 2, **KINDS[kind]}}
    return small_lm_run(out, data, model, {"parallel": {"ep_size": ep},
                                           "train": {"steps": steps, "warmup_steps": 2, "seed": 5},
                                           "checkpoint": {"keep_last": 1}}, sections)


def train_on_gpus(configs: Sequence[Path], num_gpus: int = 1, ds_config: str = ZERO2_BF16,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """The runs, one after another, on `num_gpus` GPU ranks through the deepspeed launcher (NCCL),
    with every collective audited (tests/workers/collective_audit.py)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
           "--master_port", str(free_port()), str(AUDIT_WORKER), "--deepspeed_config", ds_config,
           *map(str, configs)]
    proc = subprocess.run(cmd, env=launch_env({"DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "4"}), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + "\n" + proc.stderr)[-8000:]
    return proc
