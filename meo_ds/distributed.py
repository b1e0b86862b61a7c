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

    A launch killed before that barrier (a rank killed during start-up) leaves its buffers
    behind; local rank 0 of the next launch removes every buffer of this user that no process
    maps any more (see remove_orphaned_allreduce_buffers).
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
    if os.environ.get("LOCAL_RANK", "0") == "0":
        remove_orphaned_allreduce_buffers()


def remove_orphaned_allreduce_buffers(min_age_s: float = 2.0) -> list[str]:
    """Unlink this user's /dev/shm all-reduce buffers that no live process maps; returns their names.

    A live launch's buffer is mapped by the rank that created it from the moment it exists until
    that rank exits (DeepSpeed writes it in full, then maps it at once; `min_age_s` covers that
    instant), so an unmapped one belongs to a launch whose ranks are all gone. Mappings are read
    from /proc/*/maps of this user's processes (a name we may delete is only ever ours).
    """
    import glob
    import time

    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
    candidates = [p for p in glob.glob(prefix + "*") if _age_s(p, time.time()) >= min_age_s]
    if not candidates:
        return []
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip().removesuffix(" (deleted)")
                              for line in f if prefix in line)
        except (OSError, IndexError):
            continue  # the process exited meanwhile, or is not ours
    removed = []
    for path in candidates:
        if path not in mapped:
            try:
                os.unlink(path)
                removed.append(os.path.basename(path))
            except FileNotFoundError:
                pass
    return removed


def _age_s(path: str, now: float) -> float:
    try:
        return now - os.stat(path).st_mtime
    except FileNotFoundError:
        return -1.0
