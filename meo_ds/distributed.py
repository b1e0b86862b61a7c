"""Process-group start-up, its timeouts, and the one seam for collectives on values the package makes itself.

The trainer, evaluation, the MoE capacity exchange and the benchmarks reduce small values of
their own over ranks: step flags and loss sums, gradient norms, routing loads, validation sums,
capacity maxima, timings, checkpoint checksums. Those collectives go through `all_reduce` /
`all_reduce_max_int` (tensors and numbers) and `all_gather_objects` (small records) here and nowhere else: they move the values to `comm_device()` (the accelerator's current device,
which is where NCCL needs them on GPUs; the CPU under gloo), reduce them there, and hand back a
host tensor or a Python number. Reading the result back is the one host synchronisation each
call costs, so callers reduce once per step / log interval / evaluation, not per value.
Collectives on model tensors (the all-to-all in moe/dispatch.py, DeepSpeed's gradient
reductions) already live on the device and stay where they are.
tests/test_collectives.py fails when any other module issues a collective of its own.

`free_port` gives a single-machine launch (meo-train without a launcher, the demo, the benchmark,
the tests) its MASTER_PORT.

DeepSpeed's C++ ops (on CPU: the shared-memory all-reduce `deepspeed_shm_comm`, built by
`deepspeed.init_distributed`) are compiled by torch on first use into TORCH_EXTENSIONS_DIR,
whose default (~/.cache/torch_extensions/py311_cpu) every Python environment of the user shares:
an environment with another torch or DeepSpeed rebuilds the op there, and the next run of this
one rebuilds it back (35 s on an idle 2-core machine, ~4 min under load). `init_distributed`
therefore points TORCH_EXTENSIONS_DIR, unless it is set, at `extension_cache_dir()`: a directory
of this environment's own (keyed by sys.prefix, under the user's cache, which is always
writable). Every rank of a run computes the same directory; tests/conftest.py sets it for the
test processes that start DeepSpeed without this module.

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

import hashlib
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def exit_process(code: int) -> NoReturn:
    """End a rank process with `code` now: flush stdout, stderr and logging, then os._exit.

    The entry points of launched ranks (`meo-train`, `meo-eval`) end through this, after their own
    barrier and destroy_process_group on success (or none, when a peer is gone). Ordinary
    interpreter teardown is where it can go wrong: C++ objects of gloo and DeepSpeed's comm ops
    still alive then can abort the process ("terminate called without an active exception",
    SIGABRT: the launcher reports 250 and kills the peers), so a run that finished and saved looked
    failed, and a rank stopping on a failed collective lost its own status (4). Nothing is left
    for teardown to do: files are written and closed, run-directory locks are released by main,
    and the shared-memory buffers were unlinked after start-up."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more can be said on it
    logging.shutdown()
    os._exit(code)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS picks it): MASTER_PORT of a one-machine launch.
    Another process may take it before the launch binds it; launches here are few and short."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extension_cache_dir() -> Path:
    """This Python environment's own build directory for torch's JIT C++ extensions (DeepSpeed's
    ops): <XDG_CACHE_HOME or ~/.cache>/meo_ds/torch_extensions/<env name>-<sha256(sys.prefix)[:12]>."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return root / "meo_ds" / "torch_extensions" / f"{Path(sys.prefix).name}-{key}"


def use_environment_extension_cache() -> str:
    """Set TORCH_EXTENSIONS_DIR to extension_cache_dir() unless it is set; the directory in use."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache_dir()))


def init_distributed(timeout_s: Optional[float] = None) -> None:
    """deepspeed.init_distributed with the accelerator's backend (nccl on GPUs, gloo on CPU), then
    release the CPU all-reduce buffer's name (see release_cpu_allreduce_buffer). Idempotent.
    With `timeout_s`, every process group of this process gets it (module docstring). DeepSpeed's
    ops build into this environment's extension cache (use_environment_extension_cache)."""
    use_environment_extension_cache()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rank_device()  # NCCL's communicator and every collective before deepspeed.initialize use this rank's GPU
    kwargs = {}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        set_default_group_timeout(kwargs["timeout"])
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False, **kwargs)
    release_cpu_allreduce_buffer()


def rank_device() -> torch.device:
    """This process's device, made the accelerator's current one: device LOCAL_RANK of the
    accelerator (the launcher's local rank), or the CPU. DeepSpeed selects it only inside
    deepspeed.initialize; without it every rank of a node would start on GPU 0."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(acc.device_name(), acc.current_device())


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


def all_gather_objects(obj: object, group=None) -> list:
    """Every rank's picklable `obj` over `group`, in rank order ([obj] without a process group).

    For small host-side records (checksums, per-rank problems), never tensors. torch pickles
    them into byte tensors on the current device, which DeepSpeed's init set for NCCL."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


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


def describe_collective_failure(err: BaseException, timeout_setting: str = "train.dist_timeout_s") -> Optional[str]:
    """One line naming the collective that timed out or lost a peer, its group's ranks, this rank
    and the calling line of meo_ds; None for any other error (a wrong shape keeps its traceback).
    `timeout_setting`: the user's knob for the timeout, named in the advice."""
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
    # The innermost meo_ds frame outside this module: the caller of the seam, not the seam itself.
    ours = [(f, line) for f, line in frames[:where]
            if f.f_code.co_filename.startswith(package) and f.f_code.co_filename != __file__]
    site = ""
    if ours:
        frame, line = ours[-1]
        site = f" called at {os.path.relpath(frame.f_code.co_filename, os.path.dirname(package))}:{line}"
    reason = (text.splitlines() or [""])[0].split("] ", 1)[-1]  # gloo prefixes its source file and line
    reason = reason.split(". ", 1)[0].rstrip(".")  # gloo appends advice of its own
    return (f"rank {rank}: collective {collective_frame.f_code.co_name} over ranks {ranks}{site} failed: {reason}. "
            f"A rank of that group is stuck or dead (see its log); if it is only slow, raise {timeout_setting}")


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
