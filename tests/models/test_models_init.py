"""Initialisation is a function of the seed and each parameter's global identity, not of the
expert-parallel layout (2 real CPU ranks)."""
from pathlib import Path

import pytest

from tests.distributed import run_ranks

WORKER = Path(__file__).parent / "workers" / "init_worker.py"


@pytest.mark.parametrize("task", ["lm", "translation"])
def test_ep2_initial_state_equals_ep1(task):
    proc = run_ranks(WORKER, 2, [task], timeout=120)
    assert proc.stdout.count("initial state equals ep=1") == 2, proc.stdout[-2000:]
