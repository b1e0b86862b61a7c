"""Capacity priority and dropping, combine math, dropless vs capacity (ep_size = 1)."""
from __future__ import annotations

import pytest
import torch

from meo_ds.moe import LocalExperts, RouterOutput, TokenDispatcher, capacity_slots, expert_capacity


def route(ids, scores, weights=None, valid=None) -> RouterOutput:
    ids = torch.tensor(ids)
    scores = torch.tensor(scores)
    weights = scores if weights is None else torch.tensor(weights)
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else torch.tensor(valid)
    zero = torch.zeros(())
    return RouterOutput(ids, weights, scores, valid, torch.zeros(ids.shape[0], 2), zero, zero)


# token 0: experts (0, 1) p (.6, .4); token 1: (0, 1) p (.9, .1); token 2: (1, 0) p (.7, .3)
THREE_TOKENS = route([[0, 1], [0, 1], [1, 0]], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])


def test_capacity_formula():
    assert expert_capacity(10, 2, 4, 1.25, 4) == 7  # ceil(2 * 10 / 4 * 1.25) = ceil(6.25)
    assert expert_capacity(10, 1, 4, 1.0, 4) == 4  # ceil(2.5) = 3 < min_capacity
    assert expert_capacity(0, 2, 4, 1.0, 0) == 0


def test_first_choices_before_second_choices_then_by_probability():
    keep, slot = capacity_slots(THREE_TOKENS, num_experts=2, capacity=1)
    # Expert 0 first choices: token 1 (.9) before token 0 (.6). Expert 1 first choice: token 2.
    # Second choices come after all first choices: token 0 (.4) then token 1 (.1) to expert 1,
    # token 2 to expert 0.
    assert slot.tolist() == [[1, 1], [0, 2], [0, 2]]
    assert keep.tolist() == [[False, False], [True, False], [True, False]]
    keep2, _ = capacity_slots(THREE_TOKENS, num_experts=2, capacity=2)
    assert keep2.tolist() == [[True, True], [True, False], [True, False]]


def test_invalid_slots_take_no_capacity():
    r = route([[0, 1], [0, 1]], [[0.9, 0.05], [0.8, 0.1]], valid=[[True, False], [True, True]])
    keep, slot = capacity_slots(r, num_experts=2, capacity=1)
    assert keep.tolist() == [[True, False], [False, True]]  # token 1's second choice gets expert 1's slot 0


def experts_and_tokens(num_experts=2, d=4):
    torch.manual_seed(0)
    return LocalExperts(num_experts, "swiglu", d, 6).double(), torch.randn(3, d, dtype=torch.float64)


def manual_combine(experts, x, r, keep):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.expert_ids.shape[1]):
            if keep[t, j]:
                e = int(r.expert_ids[t, j])
                out[t] += r.weights[t, j].double() * experts.deepspeed_experts[e](x[t : t + 1])[0]
    return out


def test_capacity_combine_drops_assignments_and_zeroes_fully_dropped_tokens():
    experts, x = experts_and_tokens()
    disp = TokenDispatcher(2, 1, "capacity", capacity_k=2, capacity_factor=0.25, eval_capacity_factor=0.25, min_capacity=1)
    out, info = disp(x, THREE_TOKENS, experts, training=True)
    assert info.capacity == 1  # ceil(2 * 3 / 2 * .25) = 1
    assert out[0].abs().max() == 0  # token 0 lost both experts: zero output (residual only)
    torch.testing.assert_close(out, manual_combine(experts, x, THREE_TOKENS, info.keep))


def test_dropless_equals_manual_sum_and_capacity_without_drops():
    experts, x = experts_and_tokens()
    dropless, info = TokenDispatcher(2, 1, "dropless", 2, 1.0, 1.0, 0)(x, THREE_TOKENS, experts, training=True)
    assert info.keep.all()
    torch.testing.assert_close(dropless, manual_combine(experts, x, THREE_TOKENS, info.keep))
    roomy, info = TokenDispatcher(2, 1, "capacity", 2, 10.0, 10.0, 0)(x, THREE_TOKENS, experts, training=True)
    assert info.keep.all()
    torch.testing.assert_close(roomy, dropless)


def test_train_and_eval_capacity_factors():
    experts, x = experts_and_tokens()
    disp = TokenDispatcher(2, 1, "capacity", 2, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    assert disp(x, THREE_TOKENS, experts, training=True)[1].capacity == 3
    assert disp(x, THREE_TOKENS, experts, training=False)[1].capacity == 6


def test_gradients_flow_to_inputs_weights_and_combine_weights():
    experts, x = experts_and_tokens()
    x.requires_grad_(True)
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]], dtype=torch.float64, requires_grad=True)
    r = route([[0, 1], [0, 1], [1, 0]], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])
    r.weights = w
    out, _ = TokenDispatcher(2, 1, "dropless", 2, 1.0, 1.0, 0)(x, r, experts, training=True)
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0
    assert all(p.grad is not None for p in experts.parameters())


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="dispatch mode 'pad'"):
        TokenDispatcher(2, 1, "pad", 2, 1.0, 1.0, 0)


def naive_slots(r: RouterOutput, num_experts: int) -> dict:
    """Walk assignments in priority order (choice rank, then probability desc, then token) by hand."""
    t_count, k = r.expert_ids.shape
    items = [(j, -float(r.scores[t, j]), t) for t in range(t_count) for j in range(k) if r.valid[t, j]]
    filled, slots = [0] * num_experts, {}
    for j, _, t in sorted(items):
        e = int(r.expert_ids[t, j])
        slots[(t, j)] = filled[e]
        filled[e] += 1
    return slots


@pytest.mark.parametrize("seed", range(5))
def test_capacity_slots_equal_a_naive_priority_walk(seed):
    g = torch.Generator().manual_seed(seed)
    t_count, k, num_experts = 13, 3, 4
    probs = torch.softmax(torch.randn(t_count, num_experts, generator=g), -1)
    scores, ids = torch.sort(probs, descending=True)
    valid = torch.rand(t_count, k, generator=g) < 0.7
    valid[:, 0] = True
    r = route(ids[:, :k].tolist(), scores[:, :k].tolist(), valid=valid.tolist())
    keep, slot = capacity_slots(r, num_experts, capacity=3)
    want = naive_slots(r, num_experts)
    assert {key: int(slot[key]) for key in want} == want
    assert keep.tolist() == [[bool(valid[t, j]) and want.get((t, j), 99) < 3 for j in range(k)] for t in range(t_count)]
