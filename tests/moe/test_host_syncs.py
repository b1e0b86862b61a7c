"""Host synchronisations per MoE layer forward (one process, ep_size 1), counted on the CPU with
tests/moe/host_syncs.py; tests/gpu/test_gpu_moe.py checks the same numbers with CUDA's own
sync debug mode.

Allowed, and nothing else: the dropless per-expert counts (.tolist(): the split sizes of the
expert segments and of the all-to-all), and with a padding mask the selection of the real
tokens (nonzero: their number shapes the routed batch and the capacity). MEO needs none.
Before this was pinned the same forwards cost 13-15 syncs (top-k, XMoE) and 10 (MEO).
With ep_size 2, capacity mode adds the EP group's max capacity and dropless the exchanged
counts (tests/moe/workers/ep_equivalence.py counts those).
"""
from __future__ import annotations

import pytest
import torch

from host_syncs import count_host_syncs
from meo_ds.moe import MoEConfig, build_moe_layer

D, F = 16, 32
KINDS = {
    "topk capacity": dict(kind="topk", dispatch="capacity"),
    "topk dropless": dict(kind="topk", dispatch="dropless"),
    "xmoe capacity": dict(kind="xmoe", dispatch="capacity", threshold=0.7),
    "xmoe dropless": dict(kind="xmoe", dispatch="dropless", threshold=0.7),
    "meo": dict(kind="meo", noisy_gating=True),
    "meo causal": dict(kind="meo", noisy_gating=True, segment_len=4),
}
# (no padding mask, with a padding mask)
ALLOWED = {
    "topk capacity": ({}, {"nonzero": 1}),
    "topk dropless": ({"tolist": 1}, {"tolist": 1, "nonzero": 1}),
    "xmoe capacity": ({}, {"nonzero": 1}),
    "xmoe dropless": ({"tolist": 1}, {"tolist": 1, "nonzero": 1}),
    "meo": ({}, {}),
    "meo causal": ({}, {}),
}


def layer_for(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(KINDS[name])
    return build_moe_layer(MoEConfig(num_experts=4, top_k=2, **kw), D, F, causal="segment_len" in kw).train()


@pytest.mark.parametrize("name", list(KINDS))
def test_forward_syncs_only_where_the_all_to_all_needs_it(name):
    layer = layer_for(name)
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    for padding, want in zip((None, mask), ALLOWED[name]):
        layer(x, padding)  # first call outside the count (lazy set-up)
        with count_host_syncs() as syncs:
            out = layer(x, padding)
        assert dict(syncs) == want, f"{name}, padding mask {padding is not None}: host syncs {dict(syncs)}, allowed {want}"
        stats = out.stats
        for field in ("expert_load", "num_tokens", "dropped_fraction", "experts_per_token_mean",
                      "experts_per_token_hist", "balance_loss", "z_loss"):
            value = getattr(stats, field)
            assert torch.is_tensor(value) and value.device == x.device, f"{name}: RoutingStats.{field} is {value!r}"
        assert int(stats.num_tokens) == (16 if padding is None else 13)


@pytest.mark.parametrize("name", ["topk capacity", "xmoe capacity"])
def test_capacity_forward_and_backward_run_without_reading_the_device(name):
    """On the meta device any read of a value (item, int, nonzero, bincount, boolean masks) raises:
    capacity-mode top-k and XMoE train a step without one."""
    with torch.device("meta"):
        layer = layer_for(name)
        x = torch.randn(2, 8, D, requires_grad=True)
    out = layer(x)
    (out.hidden.sum() + out.aux_loss).backward()
    assert x.grad.shape == x.shape and out.stats.expert_load.device.type == "meta"


def test_the_counter_sees_each_kind_of_sync():
    t = torch.tensor([0, 2, 1])
    with count_host_syncs() as syncs:
        int(t[0]), float(t[1]), t.sum().item(), t.tolist(), bool(t.any())
        t.nonzero(), torch.bincount(t), t[t > 0]
    assert dict(syncs) == {"int": 1, "float": 1, "item": 1, "tolist": 1, "bool": 1, "nonzero": 1, "bincount": 1,
                           "getitem": 1}
