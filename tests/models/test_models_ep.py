"""ep=2 on 2 real CPU ranks: the MoE models' loss and gradients equal the single-process model's."""
from pathlib import Path

import pytest

from tests.distributed import run_ranks

WORKER = Path(__file__).parent / "workers" / "ep_worker.py"


@pytest.mark.parametrize("task", ["lm", "translation"])
@pytest.mark.parametrize("kind", ["topk", "xmoe"])
def test_ep2_matches_single_process(kind, task):
    proc = run_ranks(WORKER, 2, [kind, task], timeout=120)
    assert proc.stdout.count("gradients match ep=1") == 2, proc.stdout[-2000:]
