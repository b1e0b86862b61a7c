"""ep=2 on 2 real CPU ranks: the MoE LM's loss and gradients equal the single-process model's."""
from pathlib import Path

import pytest

from tests.distributed import run_ranks

WORKER = Path(__file__).parent / "workers" / "lm_ep_worker.py"


@pytest.mark.parametrize("kind", ["topk", "xmoe"])
def test_lm_ep2_matches_single_process(kind):
    proc = run_ranks(WORKER, 2, [kind], timeout=120)
    assert proc.stdout.count("gradients match ep=1") == 2, proc.stdout[-2000:]
