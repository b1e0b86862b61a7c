"""meo_ds.distributed: a CPU launch leaves no DeepSpeed all-reduce buffer in /dev/shm, whether its
ranks exit normally or die, and collectives keep working after the names are released."""
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
