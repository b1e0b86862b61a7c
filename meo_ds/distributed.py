"""Process-group start-up shared by the trainer, the benchmarks and the multi-rank tests.

Timeouts. `init_distributed(timeout_s)` gives the world group that timeout, and also every
group created afterwards: torch's `new_group(ranks)` without a timeout (how DeepSpeed creates
its expert-parallel, expert-data-parallel and data-parallel groups) takes the module default of
`torch.distributed.distributed_c10d` at call time, 30 min for gloo and 10 min for NCCL, so a
stuck rank held the others in an all_to_all for half an hour. We set that default to the run's
timeout before DeepSpeed creates anything (`set_default_group_timeout`), which covers every
group of the run whoever creates it, at any later time, on every backend; passing a timeout to
each call instead would mean re-creating DeepSpeed's group layouts ourselves.

When a collective fails (gloo: a RuntimeError "Timed out waiting ...ms" or "Connection closed
by peer"; NCCL with TORCH_NCCL_BLOCKING_WAIT: a DistBackendError; NCCL's default watchdog
instead aborts the process itself, naming the operation and sequence number),
`describe_collective_failure` turns the exception into one line naming the collective, the
group's ranks, this rank and our call site, read from the traceback.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from torch.distributed import distributed_c10d


def init_distributed(timeout_s: Optional[float] = None) -> None:
    """deepspeed.init_distributed with the accelerator's backend (nccl on GPUs, gloo on CPU), then
    release the CPU all-reduce buffer's name (see release_cpu_allreduce_buffer). Idempotent.
    With `timeout_s`, every process group of this process gets it (module docstring)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    kwargs = {}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        set_default_group_timeout(kwargs["timeout"])
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


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created from now on in this process."""
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(distributed_c10d, name):
            raise RuntimeError(f"torch.distributed.distributed_c10d.{name} is gone in this torch version: "
                               f"meo_ds cannot give DeepSpeed's process groups the run's timeout; "
                               f"update meo_ds/distributed.py:set_default_group_timeout")
        setattr(distributed_c10d, name, timeout)


# How a lost peer shows in a collective's error (gloo; NCCL raises torch.distributed.DistError).
PEER_LOST = ("timed out", "connection closed", "connection reset", "broken pipe")


def describe_collective_failure(err: BaseException) -> Optional[str]:
    """One line naming the collective that timed out or lost a peer, its group's ranks, this rank
    and the calling line of meo_ds; None for any other error (a wrong shape keeps its traceback)."""
    frames = list(traceback.walk_tb(err.__traceback__))
    where = next((i for i, (frame, _) in enumerate(frames) if frame.f_code.co_filename == distributed_c10d.__file__), None)
    text = str(err).strip()
    if where is None or not (isinstance(err, dist.DistError) or any(k in text.lower() for k in PEER_LOST)):
        return None
    collective_frame = frames[where][0]
    group = collective_frame.f_locals.get("group")
    try:
        ranks = dist.get_process_group_ranks(group or distributed_c10d.GroupMember.WORLD)
        rank = dist.get_rank()
    except (RuntimeError, ValueError):  # the default group is already gone
        ranks, rank = "?", os.environ.get("RANK", "?")
    package = str(Path(__file__).resolve().parent)
    ours = [(f, line) for f, line in frames[:where] if f.f_code.co_filename.startswith(package)]
    site = ""
    if ours:
        frame, line = ours[-1]
        site = f" called at {os.path.relpath(frame.f_code.co_filename, os.path.dirname(package))}:{line}"
    reason = (text.splitlines() or [""])[0].split("] ", 1)[-1]  # gloo prefixes its source file and line
    reason = reason.split(". ", 1)[0].rstrip(".")  # gloo appends advice of its own
    return (f"rank {rank}: collective {collective_frame.f_code.co_name} over ranks {ranks}{site} failed: {reason}. "
            f"A rank of that group is stuck or dead (see its log); if it is only slow, raise train.dist_timeout_s")
