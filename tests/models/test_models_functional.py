"""meo_ds/models/functional.py (norm, positions, attention math shared with the exported model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meo_ds.models import functional as fn


def test_rms_norm_hand_case_and_dtype():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    out = fn.rms_norm(x, torch.tensor([1.0, 2.0]), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 8.0]]) / 12.5**0.5)
    assert fn.rms_norm(x.bfloat16(), torch.ones(2, dtype=torch.bfloat16), 1e-5).dtype == torch.bfloat16


def test_rope_scores_depend_on_the_relative_position_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        rq = fn.apply_rope(q, torch.tensor([[m]]), 100.0)
        rk = fn.apply_rope(k, torch.tensor([[n]]), 100.0)
        return (rq * rk).sum().item()

    assert abs(score(5, 2) - score(13, 10)) < 1e-6 and abs(score(5, 2) - score(2, 5)) > 1e-3  # angles in fp32
    x = torch.randn(2, 3, 4, 8, generator=g)
    rows = torch.arange(4).expand(2, 4)
    assert torch.equal(fn.apply_rope(x, rows, 1e4), fn.apply_rope(x, rows[:1], 1e4))  # [1, L] serves every row
    torch.testing.assert_close(fn.apply_rope(x, rows, 1e4).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_sinusoidal_positions():
    emb = fn.sinusoidal_positions(torch.tensor([0, 1]), 4)  # w = (1, 1/100)
    torch.testing.assert_close(emb, torch.tensor([[0.0, 0.0, 1.0, 1.0],
                                                  [torch.tensor(1.0).sin(), torch.tensor(0.01).sin(),
                                                   torch.tensor(1.0).cos(), torch.tensor(0.01).cos()]]))


def test_grouped_query_attention_shares_each_kv_head_with_consecutive_query_heads():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
               torch.randn(2, 2, 5, 8, generator=g))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out = fn.attend(q, k, v, mask)
    for head in range(4):
        want = F.scaled_dot_product_attention(q[:, head], k[:, head // 2], v[:, head // 2], attn_mask=mask)
        torch.testing.assert_close(out[:, head], want)
