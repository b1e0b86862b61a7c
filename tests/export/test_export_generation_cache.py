"""Remote-code exports decode incrementally: generate() with the cache (the default) feeds one token
per step and returns the tokens of generate(use_cache=False), which re-runs the whole prefix; each
cached step's logits equal the full forward's. LM: XMoE, MEO sequence- and token-level (causal
segments, so the gate sums carried in MeoCache matter), one left-padded row. Translation: MoE in
encoder and decoder (MEO decoder gates read earlier segments and the source); greedy and beam search.
"""
from __future__ import annotations

import sys

import pytest
import torch

from meo_ds.export import remote
from meo_ds.models import LMConfig, MTConfig, build_model
from meo_ds.moe import MoEConfig

V, BOS, PAD = 120, 2, 0
NEW = 24
MOE = {  # segment_len 3: the generated tokens cross many MEO segments
    "xmoe": dict(kind="xmoe", threshold=0.6, max_k=3),
    "meo_sequence": dict(kind="meo", segment_len=3),
    "meo_token": dict(kind="meo", segment_len=3, meo_level="token"),
}


def _randomize_gates(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_weight", "default_summary")) or ".token_block." in name:
                p.normal_(0.0, 1.0)  # zero-initialised: make MEO's routing and token block matter
            elif ".linears." in name:
                p.add_(torch.randn_like(p), alpha=0.1)  # MEO's experts start equal: make them differ


def _lm(kind: str):
    cfg = LMConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                   moe=MoEConfig(num_experts=4, top_k=2, **MOE[kind]), moe_every=1, moe_offset=0)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    _randomize_gates(ours)
    return remote.build_hf_model("lm", cfg, ours.state_dict())


def _mt(kind: str):
    cfg = MTConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, encoder_layers=2, decoder_layers=3,
                   max_seq_len=64, dropout=0.0, moe=MoEConfig(num_experts=4, top_k=2, **MOE[kind]), moe_in="both",
                   moe_every=1, moe_offset=0, positions="rope" if kind == "xmoe" else "sinusoidal")
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    _randomize_gates(ours)
    return remote.build_hf_model("translation", cfg, ours.state_dict())


class FedTokens:
    """Counts the tokens the (target) embedding is fed, per forward call."""

    def __init__(self, embedding: torch.nn.Module):
        self.calls: list[int] = []
        self.handle = embedding.register_forward_hook(lambda mod, args, out: self.calls.append(args[0].shape[1]))


def _stepwise_logits(model, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, **extra) -> torch.Tensor:
    """Logits of ids fed as the prompt, then one token per forward with the returned cache."""
    key = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
    mask_key = "decoder_attention_mask" if model.config.is_encoder_decoder else "attention_mask"
    out = model(**{key: ids[:, :prompt_len], mask_key: mask[:, :prompt_len]}, use_cache=True, **extra)
    logits, cache = [out.logits], out.cache
    for t in range(prompt_len, ids.shape[1]):
        out = model(**{key: ids[:, t : t + 1], mask_key: mask[:, : t + 1]}, cache=cache, use_cache=True, **extra)
        logits.append(out.logits)
        assert out.cache is cache
    return torch.cat(logits, dim=1)


def _assert_same_math(got: torch.Tensor, want: torch.Tensor) -> None:
    """Cached and full forward add the same numbers in another order (attention over one query, the
    MEO gate sums accumulated step by step): equal up to rounding, within 1e-4 of the logits' scale
    in fp32 and 1e-12 in fp64 (where an error in the math could not hide)."""
    scale = want.abs().max().item()
    assert want.std() > 0.1  # not a comparison of near-constant logits
    rel = 1e-12 if want.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=rel * scale)
    print(f"{want.dtype}: max |cached - full| = {(got - want).abs().max().item():.2g} (logit scale {scale:.3g})")


@pytest.mark.parametrize("kind", MOE)
def test_lm_cached_generation_equals_uncached(kind: str) -> None:
    hf = _lm(kind)
    prompt = torch.randint(4, V, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = PAD, 0  # a left-padded row
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    fed = FedTokens(hf.model.embed_tokens)
    cached = hf.generate(prompt, use_cache=True, **kw)
    assert fed.calls == [5] + [1] * (NEW - 1)  # the prompt once, then one token per step
    fed.handle.remove()
    uncached = hf.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 5 + NEW) and torch.equal(cached, uncached), (cached, uncached)

    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], 1)
    for dtype in (torch.float32, torch.float64):
        model = hf.to(dtype)
        with torch.no_grad():
            full = model(cached, attention_mask=full_mask).logits
            steps = _stepwise_logits(model, cached, full_mask, prompt_len=5)
        _assert_same_math(steps, full)


def _sources() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = PAD, 0  # right-padded source
    return ids, mask


@pytest.mark.parametrize("kind", MOE)
def test_translation_cached_generation_equals_uncached(kind: str) -> None:
    hf = _mt(kind)
    src, mask = _sources()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, do_sample=False)
    fed = FedTokens(hf.model.embed_tokens)  # shared source/target table: the encoder's call comes first
    greedy = hf.generate(src, num_beams=1, use_cache=True, **kw)
    assert fed.calls == [7] + [1] * NEW  # the source once, then one decoder token per step
    fed.handle.remove()
    assert greedy.shape == (2, 1 + NEW)
    assert torch.equal(greedy, hf.generate(src, num_beams=1, use_cache=False, **kw))
    beams = hf.generate(src, num_beams=3, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw)
    plain = hf.generate(src, num_beams=3, use_cache=False, output_scores=True, return_dict_in_generate=True, **kw)
    assert torch.equal(beams.sequences, plain.sequences)
    torch.testing.assert_close(beams.sequences_scores, plain.sequences_scores, rtol=1e-5, atol=1e-5)

    for dtype in (torch.float32, torch.float64):
        model = hf.to(dtype)
        with torch.no_grad():
            encoded = model.get_encoder()(input_ids=src, attention_mask=mask)
            full = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=greedy).logits
            steps = _stepwise_logits(model, greedy, torch.ones_like(greedy), prompt_len=1, encoder_outputs=encoded,
                                     attention_mask=mask)
        _assert_same_math(steps, full)


def test_meo_layers_refuse_a_cache_without_gate_sums() -> None:
    from transformers import DynamicCache

    hf = _lm("meo_sequence")
    with pytest.raises(TypeError, match="MeoCache"):
        hf(torch.tensor([[5, 6, 7]]), cache=DynamicCache(), use_cache=True)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_meo_decoding_merges_sparsely_exactly_as_the_library(level: str) -> None:
    """Decoding one sequence merges one group per segment (the merged weights are kept for its later
    steps): with 8 experts and k = 2 both the library and the export merge only the 2 selected
    experts (functional.sparse_merge_pays), so each step's logits are bit for bit the library's (a
    dense merge rounds its 8-term sum differently)."""
    cfg = LMConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                   moe=MoEConfig(num_experts=8, top_k=2, kind="meo", segment_len=3, meo_level=level),
                   moe_every=1, moe_offset=0)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    _randomize_gates(ours)
    hf = remote.build_hf_model("lm", cfg, ours.state_dict())
    ids = torch.randint(4, V, (1, 12), generator=torch.Generator().manual_seed(3))
    merges = []  # per merge: whether it read the selected experts only
    modeling = __import__(type(hf).__module__, fromlist=["merged_forward"])
    functional = sys.modules[modeling.merged_forward.__module__]
    real = functional.merge_weights
    functional.merge_weights = lambda gates, weight, top_idx=None: merges.append(top_idx is not None) or real(
        gates, weight, top_idx)
    try:
        with torch.no_grad():
            theirs = _stepwise_logits(hf, ids, torch.ones_like(ids), prompt_len=4)
    finally:
        functional.merge_weights = real
    cache = ours.new_cache()
    with torch.no_grad():
        mine = torch.cat([ours(ids[:, :4], cache=cache).logits]
                         + [ours(ids[:, t:t + 1], cache=cache).logits for t in range(4, 12)], 1)
    assert torch.equal(theirs, mine), (theirs - mine).abs().max()
    # 2 layers x 3 linears merge for the prompt (positions 0-3), then once per segment entered:
    # positions 4 (segment 1; the prompt keeps no merged weights), 6 and 9, not at each of 8 steps.
    # Every merge reads the 2 selected experts only.
    assert merges == [True] * (6 + 3 * 6)
