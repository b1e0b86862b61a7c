"""meo_ds.distributed: a CPU launch leaves no DeepSpeed all-reduce buffer in /dev/shm, whether its
ranks exit normally or die, and collectives keep working after the names are released; and the
tests' own launcher (tests/distributed.run_ranks) kills every rank of a launch past its timeout."""
import glob
import re

import pytest

from tests.distributed import REPO_ROOT, run_ranks

WORKER = REPO_ROOT / "tests" / "workers" / "shm_worker.py"


@pytest.mark.parametrize("mode", ["clean", "die"])
def test_no_shm_buffer_left_behind(mode):
    proc = run_ranks(WORKER, 2, [mode], timeout=120)
    assert proc.stdout.count("all_reduce ok") == 2, proc.stdout[-2000:]
    port = re.search(r"port (\d+)", proc.stdout).group(1)
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


def test_seam_reduces_on_the_communication_device_and_returns_host_values(monkeypatch):
    """The seam hands each collective a tensor on comm_device() (here forced to "meta", which is
    not where host values live) and gives back host tensors / Python numbers."""
    import torch

    import meo_ds.distributed as seam

    class Reached(Exception):
        pass

    seen = []

    def fake_all_reduce(tensor, op=None, group=None):
        seen.append((tensor.device.type, tensor.dtype, op))
        raise Reached

    # One process without a group: values come back unchanged, on the host.
    out = seam.all_reduce([1.5, 2.0])
    assert out.tolist() == [1.5, 2.0] and out.device.type == "cpu" and out.dtype == torch.float64
    assert seam.all_reduce_max_int(7) == 7
    with pytest.raises(ValueError, match="op 'mean' is unknown"):
        seam.all_reduce([1.0], op="mean")
    monkeypatch.setattr(seam, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(seam.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(seam.dist, "all_reduce", fake_all_reduce)
    for call in (lambda: seam.all_reduce([1.0, 2.0]), lambda: seam.all_reduce(torch.ones(3), op="max"),
                 lambda: seam.all_reduce_max_int(3)):
        with pytest.raises(Reached):
            call()
    ops = seam.dist.ReduceOp
    assert seen == [("meta", torch.float64, ops.SUM), ("meta", torch.float64, ops.MAX), ("meta", torch.int64, ops.MAX)]


def test_each_rank_selects_its_local_gpu_before_the_process_group_starts(monkeypatch):
    """On a GPU node rank LOCAL_RANK must use device LOCAL_RANK from its first collective on (NCCL's
    communicator, parallelize's groups, barriers), before deepspeed.initialize would select it."""
    import deepspeed
    import deepspeed.accelerator
    import torch

    import meo_ds.distributed as seam

    class FakeGPU:
        current = 0

        def device_name(self):
            return "cuda"

        def set_device(self, index):
            self.current = index

        def current_device(self):
            return self.current

        def communication_backend_name(self):
            return "nccl"

    gpu, device_at_init = FakeGPU(), []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: gpu)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: device_at_init.append(gpu.current))
    monkeypatch.setattr(seam, "release_cpu_allreduce_buffer", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    seam.init_distributed()
    assert device_at_init == [3]
    assert seam.rank_device() == torch.device("cuda", 3)


def test_extension_cache_is_the_environments_own_unless_the_user_chose_one(monkeypatch, tmp_path):
    """DeepSpeed's ops build per Python environment (sys.prefix), not in torch's directory that every
    environment shares; init_distributed sets it, an explicit TORCH_EXTENSIONS_DIR wins."""
    import sys

    import meo_ds.distributed as seam

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    here = seam.extension_cache_dir()
    assert here.parent == tmp_path / "meo_ds" / "torch_extensions"
    assert seam.use_environment_extension_cache() == str(here) and seam.os.environ["TORCH_EXTENSIONS_DIR"] == str(here)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other_env"))
    assert seam.extension_cache_dir() != here  # another environment, another directory
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert seam.use_environment_extension_cache() == str(tmp_path / "mine")


def test_a_launch_past_its_timeout_fails_and_leaves_no_rank_behind(tmp_path):
    """The harness (tests/distributed.run_ranks): ranks stuck past the timeout are all killed, so a
    hung multi-rank test cannot hold cores for the rest of the suite."""
    import signal
    import time
    from pathlib import Path

    worker = tmp_path / "stuck_worker.py"
    worker.write_text("import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(600)\n")

    def stuck(*_):
        raise TimeoutError("run_ranks did not return within 90 s of a 15 s timeout")

    before = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(90)
    try:
        with pytest.raises(AssertionError, match="did not end within 15 s; every rank was killed") as failure:
            run_ranks(worker, 2, timeout=15)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    pids = [int(p) for p in re.findall(r"pid (\d+)", str(failure.value))]
    assert len(pids) == 2  # both ranks had started, and their output is in the failure
    time.sleep(0.5)
    for pid in pids:  # gone, or a zombie whose reaper (the container's init) has not collected it yet
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX", f"rank pid {pid} still runs"
