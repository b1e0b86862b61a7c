"""Process-group start-up, and the one seam for collectives on values the package makes itself.

The trainer, evaluation, the MoE capacity exchange and the benchmarks reduce small values of
their own over ranks: step flags and loss sums, gradient norms, routing loads, validation sums,
capacity maxima, timings. Those collectives go through `all_reduce` / `all_reduce_max_int` here
and nowhere else: they move the values to `comm_device()` (the accelerator's current device,
which is where NCCL needs them on GPUs; the CPU under gloo), reduce them there, and hand back a
host tensor or a Python number. Reading the result back is the one host synchronisation each
call costs, so callers reduce once per step / log interval / evaluation, not per value.
Collectives on model tensors (the all-to-all in moe/dispatch.py, DeepSpeed's gradient
reductions) already live on the device and stay where they are.
tests/test_collectives.py fails when any other module issues a collective of its own.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


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


def comm_device() -> torch.device:
    """Where the seam's collectives run: the accelerator's current device (cpu under gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce(values: Union[torch.Tensor, Sequence[float]], op: str = "sum", group=None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reduce `values` (a tensor on any device, or a list of numbers) over `group` (default: all
    ranks) with op "sum", "max" or "min"; returns the result as a host tensor of `dtype`.

    Without an initialised process group the values come back unchanged (one process)."""
    if op not in _OPS:
        raise ValueError(f"all_reduce: op {op!r} is unknown; use one of {sorted(_OPS)}")
    t = torch.as_tensor(values, dtype=dtype).to(comm_device(), dtype)
    if dist.is_available() and dist.is_initialized():
        t = t.clone() if t is values else t  # never reduce the caller's tensor in place
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t.cpu()


def all_reduce_max_int(value: int, group=None) -> int:
    """The largest of the ranks' `value` over `group` as a Python int (one host sync)."""
    return int(all_reduce([value], op="max", group=group, dtype=torch.int64)[0])
