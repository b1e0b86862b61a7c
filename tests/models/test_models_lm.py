"""LM: causal masking, cached == uncached, learning a copy task, parameter counts, bad input."""
import pytest
import torch

from meo_ds.models import LMConfig, build_model
from meo_ds.moe import MoEConfig

KINDS = [None, "topk", "xmoe", "meo"]


def tiny(kind, **kw) -> LMConfig:
    moe = None if kind is None else MoEConfig(kind=kind, num_experts=4, top_k=2, aux_loss_coef=0.01)
    return LMConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                    moe=moe, moe_every=1, moe_offset=0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_masking(kind):
    torch.manual_seed(0)
    m = build_model(tiny(kind)).eval()
    a = torch.randint(0, 32, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 32, (2, 7))
    la, lb = m(a).logits, m(b).logits
    assert torch.allclose(la[:, :9], lb[:, :9], atol=1e-5)
    assert not torch.allclose(la[:, 9:], lb[:, 9:], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_full(kind):
    torch.manual_seed(0)
    m = build_model(tiny(kind)).eval()
    ids = torch.randint(0, 32, (2, 12))
    full = m(ids).logits
    cache = m.new_cache()
    steps = [m(ids[:, :5], cache=cache).logits]
    for t in range(5, 12):
        steps.append(m(ids[:, t:t + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_successor_task_loss_falls(kind):
    torch.manual_seed(0)
    m = build_model(tiny(kind))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        # counting sequences: the next token is the current one + 1 (mod vocab)
        ids = (torch.randint(0, 32, (8, 1)) + torch.arange(16)) % 32
        tgt = ids[:, 1:]
        out = m(ids[:, :-1], targets=tgt)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first or out.loss.item()
    assert out.loss.item() < 0.5 * first, (first, out.loss.item())
    if kind is not None:
        assert len(out.stats) == 2 and out.aux_loss.dim() == 0


def test_param_counts_dense_and_topk():
    c = tiny(None)
    m = build_model(c)
    d, ff, V, L = 32, 64, 32, 2
    attn = d * d * 2 + d * 16 * 2  # q,o full; k,v with 2 kv heads of dim 8
    per_layer = attn + 3 * d * ff + 2 * d
    assert m.param_counts()["total"] == 2 * V * d + L * per_layer + d
    mt = build_model(tiny("topk"))
    counts = mt.param_counts()
    moe_layer = 4 * 3 * d * ff + 4 * d  # 4 experts + router
    assert counts["total"] == 2 * V * d + L * (attn + moe_layer + 2 * d) + d
    assert counts["active"] == counts["total"] - L * 2 * 3 * d * ff
    # flops: dense, seq 16: 3 x (head + per layer projections + attention + ffn)
    fwd = 2 * d * V + L * (2 * attn + 4 * 16 * d + 6 * d * ff)
    assert m.flops_per_token(16) == 3 * fwd


def test_bad_input():
    m = build_model(tiny(None))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.full((1, 4), 32))
    with pytest.raises(ValueError, match="non-empty"):
        m(torch.zeros(0, 4, dtype=torch.long))


def test_meo_packed_documents_restart_their_gates():
    """reset_at_doc_boundaries: a packed document (segment_ids, position_ids) computes what it
    computes alone, MEO's causal gate summaries included."""
    cfg = tiny("meo")
    cfg.moe.segment_len = 3
    torch.manual_seed(0)
    m = build_model(cfg).double().eval()
    for name, p in m.named_parameters():
        if name.endswith(("gate_weight", "default_summary")):
            torch.nn.init.normal_(p, std=1.0)
    ids = torch.randint(0, 32, (1, 12))
    segment_ids = torch.tensor([[0] * 5 + [1] * 7])
    position_ids = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed = m(ids, segment_ids=segment_ids, position_ids=position_ids).logits
        alone = m(ids[:, 5:]).logits
    torch.testing.assert_close(packed[:, 5:], alone, rtol=1e-10, atol=1e-10)
