"""Rank worker for tests/test_parallel.py: meo_ds.parallel.parallelize on real ranks (CPU, gloo).

On every rank: a top-k LM built once and parallelized at ep=world holds exactly the experts
r*El .. r*El+El-1 of the model as built (bit-identical, as local experts 0 .. El-1) and every
other parameter unchanged; the layers describe the layout to DeepSpeed (ep_size, local experts,
group name, parameter tags) and hold DeepSpeed's expert-parallel group of this rank. At ep=1
nothing is dropped. An all-MEO model is left as it was. Parallelizing twice, and handing an
unparallelized model to deepspeed.initialize, are clear errors. Raises on any mismatch.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "moe", "workers")))

from common import PREFIX, finish, global_to_local, init_dist  # noqa: E402

from meo_ds.models import LMConfig, build_model  # noqa: E402
from meo_ds.moe import MoEConfig, MoELayer  # noqa: E402
from meo_ds.parallel import ParallelizeError, parallelize  # noqa: E402


def make(kind: str):
    moe = MoEConfig(kind=kind, num_experts=4, top_k=2)
    torch.manual_seed(7)
    return build_model(LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                                moe=moe, moe_every=1, moe_offset=0))


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_shards(rank: int, ep: int) -> None:
    from deepspeed.utils import groups

    model = make("topk")
    full = snapshot(model)
    parallelize(model, ep)
    ep_rank, local = rank % ep, 4 // ep
    want, got = global_to_local(full, ep_rank, local), model.state_dict()
    if got.keys() != want.keys():
        raise AssertionError(f"ep={ep}: keys {sorted(set(got) ^ set(want))} differ from the built model's shard")
    for key, value in got.items():
        if not torch.equal(value, want[key]):
            raise AssertionError(f"ep={ep}: {key} differs from the built model's")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    group = groups._get_expert_parallel_group(f"ep_size_{ep}")
    for layer in layers:
        assert (layer.ep_size, layer.num_local_experts, layer.expert_group_name) == (ep, local, f"ep_size_{ep}")
        assert layer.ep_group is group and layer.dispatcher.ep_size == ep
        assert torch.distributed.get_rank(group) == ep_rank and torch.distributed.get_world_size(group) == ep
    for name, p in model.named_parameters():
        expert = PREFIX in name
        assert getattr(p, "allreduce", True) is not expert, name
        assert getattr(p, "group_name", None) == (f"ep_size_{ep}" if expert else None), name
    with_experts = sum(PREFIX in k for k in got)
    print(f"rank {rank}: ep={ep} shard equals experts {ep_rank * local}..{ep_rank * local + local - 1} of the built "
          f"model ({with_experts} expert tensors, {len(got) - with_experts} others unchanged)", flush=True)
    try:
        parallelize(model, ep)
    except ParallelizeError as err:
        assert "already parallelized" in str(err), err
    else:
        raise AssertionError("parallelizing twice was accepted")


def check_meo_untouched(rank: int, world: int) -> None:
    model = make("meo")
    before = snapshot(model)
    parallelize(model, 1)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert not any(hasattr(p, "allreduce") or hasattr(p, "group_name") for p in model.parameters())
    try:
        parallelize(model, world)
    except ParallelizeError as err:
        assert "(meo) move weights, not tokens" in str(err), err
    else:
        raise AssertionError("an all-MEO model was sharded")
    print(f"rank {rank}: MEO model untouched", flush=True)


def check_engine_refuses_unparallelized(rank: int) -> None:
    import deepspeed

    model = make("topk")
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(),
                             config={"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    except RuntimeError as err:
        assert "was not parallelized; call meo_ds.parallel.parallelize(model, ep_size)" in str(err), err
    else:
        raise AssertionError("deepspeed.initialize accepted a model that was not parallelized")
    print(f"rank {rank}: deepspeed.initialize refuses an unparallelized model", flush=True)


def main() -> None:
    rank, world = init_dist()
    for ep in sorted({1, world}):
        check_shards(rank, ep)
    check_meo_untouched(rank, world)
    check_engine_refuses_unparallelized(rank)


if __name__ == "__main__":
    main()
    finish()
