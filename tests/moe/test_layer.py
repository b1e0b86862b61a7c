"""MoELayer (top-k and XMoE) on one process: per-token reference, experts, padding, stats,
DeepSpeed-facing structure and bad input."""
from __future__ import annotations

import re

import pytest
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE

from meo_ds.moe import LocalExperts, MoEConfig, MoEConfigError, MoELayer, build_moe_layer
from meo_ds.moe.experts import GeluExpert, SwiGLUExpert

D, F = 8, 16


def make(kind="topk", dispatch="dropless", **kw) -> MoELayer:
    torch.manual_seed(0)
    own = {"threshold": 0.7} if kind == "xmoe" else {}  # a field of another kind is an error
    cfg = MoEConfig(kind=kind, dispatch=dispatch, num_experts=4, top_k=2, **own, **kw)
    return MoELayer(cfg, D, F).double()


def per_token_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum over chosen j of g_j E_j(x_t), one token at a time, from the router's decision."""
    flat = x.reshape(-1, D)
    r = layer.router(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(r.expert_ids.shape[1]):
            if r.valid[t, j]:
                expert = layer.experts.deepspeed_experts[int(r.expert_ids[t, j])]
                out[t] += r.weights[t, j].double() * expert(flat[t : t + 1])[0]
    return out.view(x.shape)


@pytest.mark.parametrize("kind", ["topk", "xmoe"])
def test_dropless_layer_equals_per_token_reference(kind):
    layer = make(kind)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x).hidden, per_token_reference(layer, x))


def test_swiglu_expert_formula_and_gelu_option():
    torch.manual_seed(0)
    e, x = SwiGLUExpert(D, F), torch.randn(3, D)
    want = (torch.nn.functional.silu(x @ e.w1.weight.t()) * (x @ e.w3.weight.t())) @ e.w2.weight.t()
    torch.testing.assert_close(e(x), want)
    assert all(m.bias is None for m in (e.w1, e.w2, e.w3))
    g = GeluExpert(D, F)
    torch.testing.assert_close(g(x), g.w2(torch.nn.functional.gelu(g.w1(x))))
    assert g.w1.bias is not None


def test_segment_loop_and_grouped_mm_equal_masked_reference():
    torch.manual_seed(0)
    experts = LocalExperts(3, "swiglu", D, F)
    counts = [4, 0, 3]
    x = torch.randn(sum(counts), D)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    want = experts.reference_forward(x, ids)
    torch.testing.assert_close(experts(x, counts), want)
    if hasattr(torch, "_grouped_mm"):  # forward of the grouped GEMM works on CPU fp32
        with torch.no_grad():
            torch.testing.assert_close(experts._grouped_swiglu(x, counts), want, rtol=1e-5, atol=1e-5)
    # Every expert gets a gradient, also the one with no rows.
    experts(x, counts).sum().backward()
    assert experts.deepspeed_experts[1].w1.weight.grad is not None


@pytest.mark.parametrize("kind,dispatch", [("topk", "capacity"), ("xmoe", "dropless"), ("xmoe", "capacity")])
def test_padding_is_not_routed(kind, dispatch):
    layer = make(kind, dispatch)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    out = layer(x, mask)
    assert out.hidden[~mask].abs().max() == 0
    assert out.stats.num_tokens == 8 and int(out.stats.experts_per_token_hist.sum()) == 8
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage in padding changes nothing
    out2 = layer(x2, mask)
    torch.testing.assert_close(out2.hidden, out.hidden)
    torch.testing.assert_close(out2.aux_loss, out.aux_loss)
    # Same as running only the real tokens.
    real = layer(x[mask].view(1, 8, D))
    torch.testing.assert_close(real.hidden[0], out.hidden[mask])
    torch.testing.assert_close(real.aux_loss, out.aux_loss)


def test_aux_loss_is_coefficient_weighted_and_differentiable():
    layer = make("topk", aux_loss_coef=0.5, z_loss_coef=0.25)
    out = layer(torch.randn(1, 4, D, dtype=torch.float64))
    want = 0.5 * out.stats.balance_loss + 0.25 * out.stats.z_loss
    assert out.aux_loss.item() == pytest.approx(want)
    out.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_statistics_count_load_drops_and_experts_per_token():
    layer = make("topk", "capacity", capacity_factor=0.5, min_capacity=1)
    out = layer(torch.randn(2, 8, D, dtype=torch.float64))
    s = out.stats
    assert int(s.expert_load.sum()) == 32  # 16 tokens x k=2, counted before drops
    kept = sum(j * int(n) for j, n in enumerate(s.experts_per_token_hist))
    assert s.dropped_fraction == pytest.approx(1 - kept / 32) and s.dropped_fraction > 0
    assert s.experts_per_token_mean == pytest.approx(kept / 16)
    assert s.extra["capacity"] == 4  # ceil(2 * 16 / 4 * 0.5)
    assert kept <= 4 * 4  # no expert holds more than C


def test_xmoe_stats_histogram_matches_router_choices():
    layer = make("xmoe")
    x = torch.randn(3, 4, D, dtype=torch.float64)
    out = layer(x)
    per_token = layer.router(x.reshape(-1, D)).valid.sum(1)
    assert out.stats.experts_per_token_hist.tolist() == torch.bincount(per_token, minlength=5).tolist()
    assert out.stats.experts_per_token_mean == pytest.approx(per_token.double().mean().item())
    assert out.stats.dropped_fraction == 0 and out.stats.a2a_bytes == 0


def test_deepspeed_sees_an_moe_layer_with_checkpointable_expert_keys():
    layer = make("topk", noisy_gating=True)
    assert isinstance(layer, DeepSpeedMoE)
    assert (layer.num_experts, layer.num_local_experts, layer.ep_size, layer.expert_group_name) == (4, 4, 1, "ep_size_1")
    keys = list(layer.state_dict())
    expert_keys = [k for k in keys if "expert" in k]
    assert len(expert_keys) == 4 * 3 and len(keys) == len(expert_keys) + 2  # + router weight, noise weight
    assert all(re.match(r"deepspeed_moe\.experts\.deepspeed_experts\.[0-3]\.w[123]\.weight$", k) for k in expert_keys)
    for p in layer.experts.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"
    assert not hasattr(layer.router.weight, "allreduce")


def test_build_moe_layer_factory():
    cfg = MoEConfig(kind="xmoe", num_experts=8, expert_hidden=4)
    layer = build_moe_layer(cfg, D, F)
    assert isinstance(layer, MoELayer) and layer.experts.deepspeed_experts[0].w1.out_features == 4
    assert build_moe_layer(MoEConfig(kind="topk"), D, F).experts.deepspeed_experts[0].w1.out_features == F
    from meo_ds.moe.meo import MEOLayer

    assert isinstance(build_moe_layer(MoEConfig(kind="meo"), D, F, causal=True), MEOLayer)


def test_output_keeps_input_dtype():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4), D, F).bfloat16()
    out = layer(torch.randn(2, 3, D, dtype=torch.bfloat16))
    assert out.hidden.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_experts=4, top_k=5), "top_k=5 must be between 1 and num_experts=4"),
        (dict(kind="xmoe", threshold=0.0), r"threshold=0.0 must lie in \(0, 1\]"),
        (dict(kind="xmoe", threshold=1.2), r"threshold=1.2 must lie in \(0, 1\]"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0 must be > 0"),
    ],
)
def test_bad_config_fails_at_construction(kw, match):
    with pytest.raises(MoEConfigError, match=match):
        MoELayer(MoEConfig(**kw), D, F)


@pytest.mark.parametrize(
    "x,mask,err,match",
    [
        (torch.randn(4, D), None, ValueError, r"\[batch, seq, d_model=8\], got shape \(4, 8\)"),
        (torch.randn(2, 3, D + 1), None, ValueError, "d_model=8"),
        (torch.ones(2, 3, D, dtype=torch.long), None, TypeError, "floating-point"),
        (torch.randn(2, 3, D), torch.ones(3, 2, dtype=torch.bool), ValueError, "padding_mask must be a bool tensor of shape \\(2, 3\\)"),
        (torch.randn(2, 3, D), torch.ones(2, 3), ValueError, "padding_mask must be a bool"),
    ],
)
def test_bad_input_is_a_clear_error(x, mask, err, match):
    layer = MoELayer(MoEConfig(num_experts=4), D, F)
    with pytest.raises(err, match=match):
        layer(x, mask)


def test_expert_parallel_layer_without_its_group_says_how_to_fix():
    layer = MoELayer(MoEConfig(num_experts=4), D, F)
    layer.shard_experts(2, 0)  # what parallelize does first; the group is its second step
    with pytest.raises(RuntimeError, match=r"sharded for ep_size=2 but has no expert-parallel group; apply "
                                           r"meo_ds.parallel.parallelize\(model, ep_size\)"):
        layer(torch.randn(1, 2, D))
