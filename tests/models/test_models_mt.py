"""Translation model: masking, cached == full decoding, beam search, learning, counts, bad input."""
import itertools
import math

import pytest
import torch

from meo_ds.models import ModelConfigError, MTConfig, build_model
from meo_ds.models.generation import translate
from meo_ds.moe import MoEConfig

KINDS = [None, "topk", "xmoe", "meo"]
V, BOS, EOS, PAD = 24, 2, 3, 0


def tiny(kind, **kw) -> MTConfig:
    own = {"segment_len": 4} if kind == "meo" else {}  # a field of another kind is an error
    moe = None if kind is None else MoEConfig(kind=kind, num_experts=4, top_k=2, noisy_gating=kind == "meo", **own)
    base = dict(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, encoder_layers=2, decoder_layers=2,
                max_seq_len=24, dropout=0.0, moe=moe, moe_in="both", moe_every=1, moe_offset=0)
    base.update(kw)
    return MTConfig(**base)


def model_of(kind, seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model(tiny(kind, **kw)).eval()
    if kind == "meo":  # zero-initialised gates tie every expert; give the gates something to choose
        for name, p in m.named_parameters():
            if name.endswith(("gate_weight", "source_gate")):
                torch.nn.init.normal_(p, std=1.0)
    return m


def sources(b=3, s=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, s), generator=g)
    lens = torch.tensor([s, s - 2, s - 4])[:b]
    mask = torch.arange(s) < lens[:, None]
    ids[torch.arange(b), lens - 1] = EOS
    return ids.masked_fill(~mask, PAD), mask


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_is_causal_and_source_padding_is_ignored(kind):
    m = model_of(kind)
    src, mask = sources()
    dec = torch.randint(4, V, (3, 9))
    base = m(src, mask, dec).logits
    later = dec.clone()
    later[:, 5:] = torch.randint(4, V, (3, 4))
    assert torch.allclose(m(src, mask, later).logits[:, :5], base[:, :5], atol=1e-5)
    assert not torch.allclose(m(src, mask, later).logits[:, 5:], base[:, 5:], atol=1e-3)
    repadded = src.masked_fill(~mask, 7)  # other ids under the padding
    assert torch.allclose(m(repadded, mask, dec).logits, base, atol=1e-5)
    other_src = src.clone()
    other_src[0, 0] = 4 if src[0, 0] != 4 else 5  # the encoder is bidirectional: every position counts
    assert not torch.allclose(m(other_src, mask, dec).logits[0, 0], base[0, 0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full(kind):
    m = model_of(kind)
    src, mask = sources()
    dec = torch.randint(4, V, (3, 11))
    memory, _, _ = m.encode(src, mask)
    full, _, _ = m.decode(memory, mask, dec)
    cache = m.new_cache()
    steps = [m.decode(memory, mask, dec[:, :3], cache=cache)[0]]
    steps += [m.decode(memory, mask, dec[:, t:t + 1], cache=cache)[0] for t in range(3, 11)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beam", [1, 3])
def test_cached_translation_equals_uncached(kind, beam):
    m = model_of(kind)
    src, mask = sources()
    kw = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=12, beam_size=beam, length_penalty=1.0)
    cached = translate(m, src, mask, **kw)
    assert cached == translate(m, src, mask, use_cache=False, **kw)
    assert len(cached) == 3 and all(EOS not in t for t in cached)


def greedy_reference(m, src, mask, steps):
    """Greedy by full recomputation, one sentence at a time."""
    out = []
    for b in range(src.shape[0]):
        ids = [BOS]
        memory, _, _ = m.encode(src[b:b + 1], mask[b:b + 1])
        for _ in range(steps):
            nxt = int(m.decode(memory, mask[b:b + 1], torch.tensor([ids]))[0][0, -1].argmax())
            if nxt == EOS:
                break
            ids.append(nxt)
        out.append(ids[1:])
    return out


def test_beam_one_is_greedy():
    m = model_of("topk")
    src, mask = sources()
    want = greedy_reference(m, src, mask, 10)
    assert translate(m, src, mask, bos_id=BOS, eos_id=EOS, max_new_tokens=10, beam_size=1) == want


def test_wide_beam_finds_the_best_hypothesis_by_enumeration():
    """With a beam wider than every hypothesis there is, beam search is exhaustive: its answer is
    the argmax of log p / length^alpha over all sequences of at most N tokens."""
    torch.manual_seed(0)
    m = build_model(tiny(None, vocab_size=5, max_seq_len=8)).eval()
    src = torch.tensor([[1, 4, 2, EOS]])
    steps, alpha = 3, 0.7
    memory, _, _ = m.encode(src)

    def logp(prefix):
        return torch.log_softmax(m.decode(memory, None, torch.tensor([[BOS] + prefix]))[0][0, -1].double(), -1)

    best, best_tokens = -math.inf, None
    for n in range(1, steps + 1):
        for seq in itertools.product(range(5), repeat=n):
            if EOS in seq[:-1] or (n < steps and seq[-1] != EOS):
                continue
            with torch.no_grad():
                score = sum(float(logp(list(seq[:i]))[seq[i]]) for i in range(n)) / n**alpha
            tokens = list(seq[:-1]) if seq[-1] == EOS else list(seq)
            if score > best:
                best, best_tokens = score, tokens
    got = translate(m, src, None, bos_id=BOS, eos_id=EOS, max_new_tokens=steps, beam_size=5**steps, length_penalty=alpha)
    assert got == [best_tokens]


@pytest.mark.parametrize("kind", KINDS)
def test_reversal_task_loss_falls(kind):
    torch.manual_seed(0)
    m = build_model(tiny(kind, dropout=0.0, label_smoothing=0.1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        body = torch.randint(4, V, (16, 6))
        src = torch.cat([body, torch.full((16, 1), EOS)], 1)
        target = body.flip(1)
        dec = torch.cat([torch.full((16, 1), BOS), target], 1)
        labels = torch.cat([target, torch.full((16, 1), EOS)], 1)
        out = m(src, None, dec, labels)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first or out.nll_loss.item()
    assert out.nll_loss.item() < 0.25 * first, (first, out.nll_loss.item())
    if kind is not None:
        assert len(out.stats) == 4 and {n.split(".")[0] for n, _ in out.stats} == {"encoder", "decoder"}


def test_label_smoothing_and_nll():
    m = model_of(None, label_smoothing=0.0)
    src, mask = sources()
    dec, labels = torch.randint(4, V, (3, 5)), torch.randint(4, V, (3, 5))
    labels[0, 3:] = -100
    out = m(src, mask, dec, labels)
    logp = torch.log_softmax(out.logits.float(), -1)
    keep = labels != -100
    nll = -logp[keep].gather(1, labels[keep][:, None]).mean()
    assert torch.allclose(out.loss, nll, atol=1e-6) and torch.allclose(out.nll_loss, nll, atol=1e-6)
    smoothed = build_model(tiny(None, label_smoothing=0.1)).eval()
    smoothed.load_state_dict(m.state_dict())
    s = smoothed(src, mask, dec, labels)
    uniform = -logp[keep].mean(-1).mean()
    assert torch.allclose(s.loss, 0.9 * nll + 0.1 * uniform, atol=1e-5) and torch.allclose(s.nll_loss, nll, atol=1e-6)


def test_separate_vocabularies_and_moe_placement():
    cfg = tiny("topk", share_embeddings=False, src_vocab_size=40, tie_output=False, moe_in="decoder", moe_every=2, moe_offset=1)
    m = build_model(cfg)
    assert m.src_embed.weight.shape == (40, 32) and m.lm_head.weight is not m.embed.weight
    assert [b.is_moe for b in m.encoder.layers] == [False, False]
    assert [b.is_moe for b in m.decoder.layers] == [False, True]
    src = torch.randint(4, 40, (2, 5))
    assert m(src, None, torch.randint(4, V, (2, 4))).logits.shape == (2, 4, V)
    shared = build_model(tiny(None))
    assert shared.src_embed is None and shared.lm_head.weight is shared.embed.weight
    explicit = build_model(tiny("xmoe", encoder_moe_layers=[0], decoder_moe_layers=[]))
    assert [b.is_moe for b in explicit.encoder.layers] == [True, False] and not any(b.is_moe for b in explicit.decoder.layers)


def test_param_and_flop_counts():
    d, f, H, KV, hd = 32, 64, 4, 2, 8
    m = build_model(tiny(None))
    attn = 2 * (d * H * hd + H * hd) + 2 * (d * KV * hd + KV * hd)  # q,o and k,v with biases
    ffn = d * f + f + f * d + d  # gelu: w1, w2 with biases
    norm = 2 * d
    enc_layer = attn + ffn + 2 * norm
    dec_layer = 2 * attn + ffn + 3 * norm
    assert m.param_counts() == {"total": V * d + 2 * enc_layer + 2 * dec_layer + 2 * norm, "active": m.param_counts()["total"]}
    moe = build_model(tiny("topk", moe_in="encoder"))
    expert = 3 * d * f
    counts = moe.param_counts()
    assert counts["total"] - m.param_counts()["total"] == 2 * (4 * expert + 4 * d - ffn)
    assert counts["total"] - counts["active"] == 2 * 2 * expert  # 2 of 4 experts unused, 2 MoE layers
    S, T = 10, 12
    proj = 2 * (2 * d * H * hd + 2 * d * KV * hd)
    enc = 2 * (proj + 4 * S * H * hd + 2 * 2 * d * f)
    dec = 2 * (proj + 4 * T * H * hd + 4 * d * H * hd + 4 * S * H * hd + 2 * 2 * d * f) + 2 * (4 * d * KV * hd) * S / T
    assert m.flops_per_token(S, T) == pytest.approx(3 * (enc * S / T + dec + 2 * d * V))
    moe_extra = 2 * ((2 * d * 4 + 2 * 6 * d * f) - 2 * 2 * d * f)  # router + k=2 SwiGLU experts instead of gelu FFN
    assert moe.flops_per_token(S, T) == pytest.approx(3 * ((enc + moe_extra) * S / T + dec + 2 * d * V))


def test_bad_input_and_config():
    m = model_of(None)
    src, mask = sources()
    with pytest.raises(ValueError, match="sentences"):
        m(src, mask, torch.randint(4, V, (2, 4)))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.full((1, 30), 5), None, torch.full((1, 2), 5))
    with pytest.raises(ValueError, match="token ids"):
        m(src, mask, torch.full((3, 2), V))
    with pytest.raises(ValueError, match="non-empty"):
        m(torch.zeros(0, 4, dtype=torch.long), None, torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        m(src, mask, torch.full((3, 4), 5), torch.full((3, 5), 5))
    with pytest.raises(ValueError, match="mask"):
        m(src, mask.long(), torch.full((3, 4), 5))
    with pytest.raises(ModelConfigError, match="share_embeddings"):
        tiny(None, src_vocab_size=40).validate()
    with pytest.raises(ModelConfigError, match="decoder_moe_layers"):
        tiny("topk", decoder_moe_layers=[5]).validate()
    with pytest.raises(ValueError, match="beam_size"):
        translate(m, src, mask, bos_id=BOS, eos_id=EOS, beam_size=0)


def test_decoder_meo_gates_read_the_source():
    """A target shorter than segment_len is still routed by its source sentence (meo.py Choices)."""
    m = model_of("meo")
    assert [b.moe.cross for b in m.decoder.layers] == [True, True] and not any(b.moe.cross for b in m.encoder.layers)
    gates = []
    def recorder(route):
        def record(summary, source=None):
            out = route(summary, source)
            gates.append(out[0])
            return out
        return record

    for lin in m.decoder.layers[0].moe.linears.values():
        lin.route = recorder(lin.route)
    src, mask = sources()
    dec = torch.randint(4, V, (3, 3))  # one segment: no earlier target token to route on
    with torch.no_grad():
        m(src, mask, dec)
        first = torch.cat(gates)
        gates.clear()
        m(src.flip(0), mask.flip(0), dec)
    assert not torch.equal(first, torch.cat(gates))
