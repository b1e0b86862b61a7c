"""Process-group start-up shared by the trainer, the benchmarks and the multi-rank tests."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch.distributed as dist


def init_distributed(timeout_s: Optional[float] = None) -> None:
    """deepspeed.init_distributed with the accelerator's backend (nccl on GPUs, gloo on CPU), then
    release the CPU all-reduce buffer's name (see release_cpu_allreduce_buffer). Idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False, **kwargs)
    release_cpu_allreduce_buffer()


def release_cpu_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory all-reduce.

    Each rank creates /dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}
    (~70 MB) and maps every peer's buffer before init_distributed returns; DeepSpeed never removes
    them, so every CPU launch would leave them in memory until reboot. Once all ranks are past
    init (the barrier), the names are no longer needed: the memory is freed when the last rank
    that maps it exits, however it exits.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass  # a multi-node CPU run (no shm all-reduce), or already released
