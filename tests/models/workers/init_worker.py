"""Rank worker: the initial model does not depend on the expert-parallel layout. Built from the
same seed, once left whole (ep=1) and once parallelized at ep=world, every non-expert parameter
is bit-identical and local expert i of ep rank r is bit-identical to global expert r*El + i of
the ep=1 model; no two experts of a layer start equal. Argument: TASK ('lm' or 'translation')."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "moe", "workers")))

from common import PREFIX, finish, global_to_local, init_dist, script_args  # noqa: E402

from meo_ds.models import LMConfig, MTConfig, build_model  # noqa: E402
from meo_ds.moe import MoEConfig  # noqa: E402
from meo_ds.parallel import parallelize  # noqa: E402


def make(task: str):
    if task == "lm":
        moe = MoEConfig(kind="topk", num_experts=4, top_k=2)
        cfg = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe=moe)
    else:
        moe = MoEConfig(kind="xmoe", num_experts=4, activation="gelu")
        cfg = MTConfig(vocab_size=32, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, moe=moe,
                       moe_in="both", moe_every=1, moe_offset=0)
    torch.manual_seed(1234)
    return build_model(cfg)


def main() -> None:
    task = script_args()[0]
    rank, world = init_dist()
    ref = make(task).state_dict()
    ours = parallelize(make(task), world).state_dict()  # built from the same seed, then sharded
    want = global_to_local(ref, rank, 4 // world)
    assert ours.keys() == want.keys()
    worst = max((ours[k] - want[k]).abs().max().item() for k in ours)
    assert worst == 0.0, f"rank {rank}: initial state differs from ep=1 by {worst}"
    # No two experts of a layer start equal (the old bug: global experts i and i + E/2 at ep=2).
    experts = {}
    for key, value in ref.items():
        if PREFIX in key and key.endswith("w1.weight"):
            head, tail = key.split(PREFIX)
            experts.setdefault(head, []).append(value)
    for head, weights in experts.items():
        for i in range(len(weights)):
            for j in range(i + 1, len(weights)):
                assert not torch.equal(weights[i], weights[j]), f"{head}: experts {i} and {j} start equal"
    print(f"rank {rank} {task}: ep={world} initial state equals ep=1 (max diff {worst}), "
          f"{sum(len(w) for w in experts.values())} experts distinct", flush=True)
    finish()


if __name__ == "__main__":
    main()
