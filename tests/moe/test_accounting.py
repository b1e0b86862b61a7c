"""Model vs executed FLOPs per kind (issue #13 item 4): what the routing asks for vs what the code runs."""
from __future__ import annotations

import math

import pytest
import torch

from meo_ds import metrics
from meo_ds.models import LMConfig, build_model
from meo_ds.moe import MoEConfig, build_moe_layer

D, F, E = 16, 32, 8
ROUTER = 2 * D * E
EXPERT = 3 * 2 * D * F  # one SwiGLU expert: three matmuls


def routed(cfg: MoEConfig, tokens: int = 40):
    """A layer, its measured routing summary (one forward) and the stats."""
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, D, F).train()
    with torch.no_grad():
        layer.router.weight.mul_(0.01)  # near-uniform router: XMoE takes several experts
    acc = metrics.RoutingAccumulator()
    out = layer(torch.randn(1, tokens, D))
    acc.add([out.stats])
    return layer, acc.summary()[0], out.stats


def counts(layer, summary) -> tuple[float, float]:
    kw = dict(experts_per_token=summary["experts_per_token"], rows_per_token=summary["rows_per_token"])
    return layer.flops_per_token(40, **kw), layer.flops_per_token(40, executed=True, **kw)


def test_xmoe_counts_the_measured_experts_not_one():
    layer, summary, _ = routed(MoEConfig(kind="xmoe", num_experts=E))
    m = summary["experts_per_token"]
    assert m > 2  # a near-uniform router takes several experts per token
    model, executed = counts(layer, summary)
    assert model == pytest.approx(ROUTER + m * EXPERT)
    assert model > layer.flops_per_token(40)  # the unmeasured (nominal, one expert) count
    assert executed == pytest.approx(model)  # dropless: every kept assignment is one computed row


@pytest.mark.parametrize("kind,own", [("topk", {}), ("xmoe", {"max_k": 2})])
def test_capacity_counts_the_padded_rows(kind, own):
    cfg = MoEConfig(kind=kind, num_experts=E, dispatch="capacity", capacity_factor=4.0, **own)
    layer, summary, stats = routed(cfg)
    capacity = stats.extra["capacity"]
    assert summary["rows_per_token"] == pytest.approx(E * capacity / 40)
    model, executed = counts(layer, summary)
    assert model == pytest.approx(ROUTER + summary["experts_per_token"] * EXPERT)
    assert executed == pytest.approx(ROUTER + E * capacity / 40 * EXPERT)
    assert executed > model


def test_meo_executed_counts_the_dense_merge():
    cfg = MoEConfig(kind="meo", num_experts=E, top_k=2, segment_len=8)
    layer = build_moe_layer(cfg, D, F, causal=True)
    # 25 segments x k=2 read more slices than CPU's SPARSE_MERGE_SLICES_PER_EXPERT allow: dense.
    groups = math.ceil(200 / 8)
    merge_difference = groups * 2 * (E - 2) * 3 * D * F / 200  # three linears of D x F
    assert layer.flops_per_token(200, executed=True) - layer.flops_per_token(200) == pytest.approx(merge_difference)


def test_train_flops_per_token_uses_the_interval_routing_and_the_log_line_carries_both():
    moe = MoEConfig(kind="topk", num_experts=4, dispatch="capacity", capacity_factor=2.0)
    model = build_model(LMConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=F, max_seq_len=16, moe=moe))
    acc = metrics.RoutingAccumulator()
    acc.add(model(torch.randint(0, 32, (2, 16))).stats)
    routing = acc.summary()
    flops = metrics.TrainFlops(model, 16).per_token(routing)
    rows = routing[0]["rows_per_token"]  # one MoE layer: E*C rows over 32 tokens, C = ceil(2 * 32 / 4 * 2)
    assert rows == pytest.approx(4 * 32 / 32)
    assert flops["executed_flops_per_token"] - flops["model_flops_per_token"] == pytest.approx(3 * (rows - 2) * EXPERT)
    assert metrics.TrainFlops(model, 16).per_token([])["model_flops_per_token"] == model.flops_per_token(16)
    line = metrics.format_line({"step": 4, "loss": 1.0, "ppl": 2.7, "aux": 0.0, "lr": 1e-3, "tokens_per_s": 10.0,
                                "mfu": 0.5, **flops})
    assert f"flops/tok model {flops['model_flops_per_token']:.4g} executed {flops['executed_flops_per_token']:.4g}" in line
