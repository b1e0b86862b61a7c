"""meo_ds.parallel: expert parallelism applied to a built model (parallelize, ep_size_problems).

In-process: the checks that need no process group (the shard step itself, and every bad layout
named with its fix). On 2 real CPU ranks (tests/workers/parallel_worker.py): the shards of a
parallelized model are the built model's experts, the layers hold DeepSpeed's groups, MEO is
untouched, and deepspeed.initialize refuses a model that was not parallelized.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meo_ds.models import LMConfig, build_model
from meo_ds.moe import MoEConfig, MoELayer
from meo_ds.moe.experts import deferred_experts
from meo_ds.parallel import ParallelizeError, ep_size_problems, parallelize
from tests.distributed import run_ranks

WORKER = Path(__file__).parent / "workers" / "parallel_worker.py"
D, F = 8, 12


def test_shard_keeps_the_experts_of_its_ep_rank_and_tags_them():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4), D, F)
    built = list(layer.experts.deepspeed_experts)
    weights = [e.w1.weight.clone() for e in built]
    layer.shard_experts(2, 1)
    kept = list(layer.experts.deepspeed_experts)
    assert kept[0] is built[2] and kept[1] is built[3]  # the same modules: nothing re-initialised
    assert torch.equal(kept[0].w1.weight, weights[2]) and torch.equal(kept[1].w1.weight, weights[3])
    assert (layer.ep_size, layer.num_local_experts, layer.expert_group_name) == (2, 2, "ep_size_2")
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in layer.experts.parameters())
    assert sorted(k.split(".")[3] for k in layer.state_dict() if "expert" in k) == ["0"] * 3 + ["1"] * 3
    with pytest.raises(RuntimeError, match="already sharded"):
        layer.shard_experts(2, 0)


@pytest.mark.parametrize("ep,rank", [(1, 0), (2, 1), (4, 3)])
def test_deferred_experts_take_no_memory_until_sharded_and_start_as_an_eager_build(ep, rank):
    """The trainer builds under deferred_experts(): experts on the meta device, and shard_experts
    materialises the kept ones only, with the eager build's values; every other parameter (and the
    RNG stream after the build) is the eager build's too."""
    cfg = LMConfig(vocab_size=40, d_model=D, n_layers=2, n_heads=2, d_ff=F, max_seq_len=16,
                   moe=MoEConfig(num_experts=4, top_k=2), moe_every=1, moe_offset=0)
    torch.manual_seed(3)
    eager = build_model(cfg)
    eager_next = torch.rand(())
    torch.manual_seed(3)
    with deferred_experts():
        deferred = build_model(cfg)
    assert torch.equal(torch.rand(()), eager_next)
    experts = [p for n, p in deferred.named_parameters() if ".deepspeed_experts." in n]
    assert experts and all(p.is_meta for p in experts)
    assert not any(p.is_meta for n, p in deferred.named_parameters() if ".deepspeed_experts." not in n)
    with pytest.raises(RuntimeError, match="call meo_ds.parallel.parallelize"):
        deferred(torch.randint(0, 40, (1, 8)))
    for model in (eager, deferred):
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.shard_experts(ep, rank)
    want, got = eager.state_dict(), deferred.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tagged = [p for layer in deferred.modules() if isinstance(layer, MoELayer) for p in layer.experts.parameters()]
    assert len(tagged) == 2 * 3 * 4 // ep and all(p.group_name == f"ep_size_{ep}" for p in tagged)


@pytest.mark.parametrize("ep,rank", [(3, 0), (2, 2), (0, 0)])
def test_shard_refuses_a_layout_that_does_not_fit(ep, rank):
    with pytest.raises(ValueError, match=f"cannot give ep rank {rank} of {ep} its share of 4 experts"):
        MoELayer(MoEConfig(num_experts=4), D, F).shard_experts(ep, rank)


def test_ep_size_problems_name_the_fix():
    topk, meo = MoEConfig(num_experts=6), MoEConfig(kind="meo", num_experts=4)
    assert ep_size_problems(2, [topk], 4) == []
    assert ep_size_problems(1, [], 3) == [] and ep_size_problems(1, [meo], 1) == []
    assert ep_size_problems(4, [topk], 6) == [
        "num_experts=6 is not divisible by ep_size=4; choose a parallel.ep_size that divides the number of experts",
        "world size 6 is not divisible by ep_size=4; launch a multiple of 4 ranks or change parallel.ep_size",
    ]
    assert "(meo) move weights, not tokens" in ep_size_problems(2, [meo], 2)[0]
    assert "no top-k or XMoE layer" in ep_size_problems(2, [], 2)[0]
    assert ep_size_problems(0, [topk]) == ["parallel.ep_size=0 must be an integer >= 1"]


def test_parallelize_checks_the_model_before_the_process_group():
    with pytest.raises(ParallelizeError, match="num_experts=6 is not divisible by ep_size=4"):
        parallelize(MoELayer(MoEConfig(num_experts=6), D, F), 4)
    dense = build_model(LMConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    with pytest.raises(ParallelizeError, match="no top-k or XMoE layer"):
        parallelize(dense, 2)
    assert parallelize(dense, 1) is dense  # nothing to shard: no process group needed


def test_parallelize_needs_the_process_group_and_the_engine_a_parallelized_layer():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group exists in this test process")
    layer = MoELayer(MoEConfig(num_experts=4), D, F)
    with pytest.raises(ParallelizeError, match=r"needs the process group: call meo_ds.distributed.init_distributed\(\)"):
        parallelize(layer, 2)
    assert layer.ep_size == 1 and len(layer.experts.deepspeed_experts) == 4  # a refused call changes nothing
    with pytest.raises(RuntimeError, match=r"was not parallelized; call meo_ds.parallel.parallelize\(model, ep_size\) "
                                           r"after deepspeed.init_distributed\(\) and before deepspeed.initialize\(\)"):
        layer.set_deepspeed_parallelism(False)


def test_parallelized_shards_are_the_built_models_experts_on_two_ranks():
    proc = run_ranks(WORKER, 2, timeout=240)
    for rank in (0, 1):
        first = rank * 2
        assert f"rank {rank}: ep=1 shard equals experts 0..3 of the built model" in proc.stdout
        assert f"rank {rank}: ep=2 shard equals experts {first}..{first + 1} of the built model" in proc.stdout
        assert f"rank {rank}: MEO model untouched" in proc.stdout
        assert f"rank {rank}: deepspeed.initialize refuses an unparallelized model" in proc.stdout
