"""Router math against hand-computed cases.

With router.weight = I (d = E = 4) the logits are the input itself; logits ln(4, 3, 2, 1) give
probabilities (0.4, 0.3, 0.2, 0.1).
"""
from __future__ import annotations

import math

import pytest
import torch

from meo_ds.moe import ThresholdRouter, TopKRouter

LOGITS = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))


def identity_router(cls, **kw):
    router = cls(4, 4, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def test_topk_selects_largest_and_renormalises():
    x = torch.log(torch.tensor([[1.0, 2.0, 4.0, 3.0]]))  # probs .1 .2 .4 .3
    out = identity_router(TopKRouter, k=2)(x)
    assert out.expert_ids.tolist() == [[2, 3]]
    torch.testing.assert_close(out.weights, torch.tensor([[4 / 7, 3 / 7]]))
    torch.testing.assert_close(out.scores, torch.tensor([[0.4, 0.3]]))
    raw = identity_router(TopKRouter, k=3, renormalize=False)(x)
    torch.testing.assert_close(raw.weights, torch.tensor([[0.4, 0.3, 0.2]]))
    assert raw.valid.all()


@pytest.mark.parametrize(
    "threshold,max_k,want",
    [
        (0.6, None, [0.4, 0.3]),  # before = 0, .4, .7, .9: .7 >= .6 stops
        (0.75, None, [0.4, 0.3, 0.2]),
        (0.3, None, [0.4]),  # .4 >= .3 already after the first
        (1e-6, None, [0.4]),  # at least one expert
        (1.0, None, [0.4, 0.3, 0.2, 0.1]),
        (0.9, 2, [0.4, 0.3]),  # capped by max_k
    ],
)
def test_threshold_takes_experts_while_cumulative_before_is_below_t(threshold, max_k, want):
    x = torch.cat([LOGITS, LOGITS[:, [3, 2, 1, 0]]])  # second token: same probs, reversed experts
    out = identity_router(ThresholdRouter, threshold=threshold, max_k=max_k)(x)
    k, slots = len(want), max_k or 4  # always max_k slots (a data-independent shape); `valid` marks the taken ones
    assert out.valid.tolist() == [[True] * k + [False] * (slots - k)] * 2
    assert out.expert_ids[:, :k].tolist() == [list(range(k)), [3, 2, 1, 0][:k]]
    torch.testing.assert_close(out.weights, torch.tensor([want + [0.0] * (slots - k)] * 2))  # raw, not renormalised


def test_threshold_router_pads_tokens_with_fewer_experts():
    confident = torch.log(torch.tensor([[97.0, 1.0, 1.0, 1.0]]))
    out = identity_router(ThresholdRouter, threshold=0.6)(torch.cat([LOGITS, confident]))
    assert out.valid.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert (out.weights[1, 1:] == 0).all() and (out.scores[1, 1:] == 0).all()


def test_balance_and_z_loss_values():
    x = torch.cat([LOGITS, LOGITS])
    topk = identity_router(TopKRouter, k=2)(x)
    # f = (.5, .5, 0, 0) over all routed assignments, P = (.4, .3, .2, .1): 4 * (.2 + .15)
    assert topk.balance_loss.item() == pytest.approx(1.4)
    assert topk.z_loss.item() == pytest.approx(math.log(10.0) ** 2)  # logsumexp = ln(4+3+2+1)
    xmoe = identity_router(ThresholdRouter, threshold=0.9)(x)
    # top-1 assignments only: f = (1, 0, 0, 0) -> 4 * .4
    assert xmoe.balance_loss.item() == pytest.approx(1.6)


def test_losses_of_an_empty_batch_are_zero_and_differentiable():
    router = TopKRouter(4, 4, k=2)
    out = router(torch.zeros(0, 4))
    (out.balance_loss + out.z_loss).backward()
    assert out.balance_loss.item() == 0 and router.weight.grad is not None


def test_noise_and_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(4, 4, k=1, noisy_gating=True, jitter=0.1)
    x = torch.randn(64, 4)
    router.eval()
    clean = router(x).probs
    torch.testing.assert_close(clean, torch.softmax(x @ router.weight.t(), -1))
    router.train()
    assert not torch.allclose(router(x).probs, clean)


def test_router_parameter_names_never_contain_expert():
    for router in (TopKRouter(4, 4, 2, noisy_gating=True), ThresholdRouter(4, 4, 0.9, noisy_gating=True)):
        assert all("expert" not in name for name, _ in router.named_parameters())


def test_router_logits_are_fp32_for_bf16_input():
    out = TopKRouter(4, 4, k=2)(torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.probs.dtype == torch.float32 and out.weights.dtype == torch.float32


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TopKRouter(4, 4, k=5), "k=5 must be between 1 and num_experts=4"),
        (lambda: ThresholdRouter(4, 4, threshold=0.0), r"threshold=0.0 must lie in \(0, 1\]"),
        (lambda: ThresholdRouter(4, 4, threshold=1.5), r"threshold=1.5 must lie in \(0, 1\]"),
        (lambda: ThresholdRouter(4, 4, threshold=0.9, max_k=9), "max_k=9"),
    ],
)
def test_bad_router_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
