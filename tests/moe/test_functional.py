"""meo_ds/moe/functional.py (the math the library and the exported model share) on hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from meo_ds.moe import functional as fn

PROBS = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.3, 0.2, 0.1, 0.4]])


def test_topk_choices_and_their_dense_combine_weights():
    ids, scores, weights = fn.topk_choices(PROBS, 2, renormalize=True)
    assert ids.tolist() == [[1, 3], [3, 0]]
    torch.testing.assert_close(scores, torch.tensor([[0.4, 0.3], [0.4, 0.3]]))
    dense = fn.dense_combine(ids, weights, 4)
    torch.testing.assert_close(dense, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7], [3 / 7, 0.0, 0.0, 4 / 7]]))
    _, _, raw = fn.topk_choices(PROBS, 2, renormalize=False)
    torch.testing.assert_close(fn.dense_combine(ids, raw, 4).sum(-1), torch.tensor([0.7, 0.7]))


def test_threshold_choices_dense_weights_and_max_k():
    ids, valid, weights = fn.threshold_choices(PROBS, 0.6)  # before = 0, .4, .7: two experts each
    assert valid.tolist() == [[True, True, False, False]] * 2
    dense = fn.dense_combine(ids, weights, 4)
    torch.testing.assert_close(dense, torch.tensor([[0.0, 0.4, 0.0, 0.3], [0.3, 0.0, 0.0, 0.4]]))  # raw probabilities
    capped = fn.threshold_choices(PROBS, 0.6, max_k=1)
    assert capped[1].tolist() == [[True], [True]]
    torch.testing.assert_close(fn.dense_combine(capped[0], capped[2], 4), torch.tensor([[0, 0.4, 0, 0], [0, 0, 0, 0.4]]))
    # The library passes max_k = E where the config has none, the export passes None: the same bits.
    probs = torch.softmax(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    for a, b in zip(fn.threshold_choices(probs, 0.9, None), fn.threshold_choices(probs, 0.9, 8)):
        assert torch.equal(a, b)


def test_topk_softmax_gates():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    gates, idx = fn.topk_softmax_gates(logits, 2)
    assert idx.tolist() == [[1, 2]]
    e = torch.tensor(1.0).exp()
    torch.testing.assert_close(gates, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))


def test_gate_logits_add_the_source_term_and_run_in_fp32():
    summary, gate = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)
    logits = fn.gate_logits(summary, gate, torch.full((2, 5), 2.0), torch.ones(4, 5, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.tolist() == [[13.0] * 4] * 2  # 3 + 2 * 5
    with pytest.raises(ValueError, match="reads the source"):
        fn.gate_logits(summary, gate, None, torch.ones(4, 5))


def _tokens(length: int) -> torch.Tensor:
    return torch.arange(1.0, length + 1).view(1, length, 1)  # token p has the value p + 1


def test_sequence_summary_is_the_masked_mean():
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    layout = fn.GroupLayout(mask, causal=False, segment_len=2)
    u = layout.to_groups(torch.cat([_tokens(4), _tokens(4)]))
    summary = fn.gate_summary(u, layout, default=None)
    assert summary.flatten().tolist() == pytest.approx([(1 + 2 + 4) / 3, 0.0])  # an all-padding sequence reads 0


def test_causal_summary_reads_the_earlier_segments_or_the_default():
    mask = torch.tensor([[True, True, True, False, True, True, True]])
    layout = fn.GroupLayout(mask, causal=True, segment_len=2)  # segments [1 2] [3 _] [5 6] [7 pad]
    u = layout.to_groups(_tokens(7))
    summary = fn.gate_summary(u, layout, default=torch.tensor([-1.0]))
    assert summary.flatten().tolist() == pytest.approx([-1.0, 1.5, 2.0, (1 + 2 + 3 + 5 + 6) / 5])
    y = layout.from_groups(layout.zero_padding(u))
    assert y.flatten().tolist() == [1, 2, 3, 0, 5, 6, 7]


def test_causal_summary_restarts_at_each_packed_document():
    mask = torch.ones(1, 6, dtype=torch.bool)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    layout = fn.GroupLayout(mask, causal=True, segment_len=2, doc_ids=doc_ids)  # [1 2] [3 _] | [4 5] [6 _]
    summary = fn.gate_summary(layout.to_groups(_tokens(6)), layout, default=torch.tensor([-1.0]))
    assert summary.flatten().tolist() == [-1.0, 1.5, -1.0, 4.5]
    assert layout.from_groups(layout.to_groups(_tokens(6))).flatten().tolist() == [1, 2, 3, 4, 5, 6]


def test_exclusive_cumsum_reads_no_later_value():
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    out = fn.exclusive_cumsum(values, dim=1)
    assert out.tolist() == [[0.0, 1.0, 3.0, 7.0]]
    assert torch.equal(fn.exclusive_cumsum(torch.tensor([[1.0, 2.0, 4.0, 1e30]]), dim=1), out)  # the last reaches none


def test_source_summary_is_the_masked_mean_of_the_memory():
    memory = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert fn.source_summary(memory, mask).flatten().tolist() == [2.0, 4.0]
    assert fn.source_summary(memory, None).flatten().tolist() == pytest.approx([104 / 3, 4.0])


def test_merged_forward_is_the_gate_weighted_sum_of_the_experts():
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(2, 3, 4, generator=g), torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, generator=g)
    gates = torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.0]])
    want = torch.stack([sum(gates[n, e] * (x[n] @ weight[e].t() + bias[e]) for e in range(3)) for n in range(2)])
    torch.testing.assert_close(fn.merged_forward(x, gates, weight, bias), want)
    torch.testing.assert_close(fn.merged_forward(x, gates, weight, None), want - (gates @ bias).unsqueeze(1))
