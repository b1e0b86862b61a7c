"""Translation models built directly (random weights) -> remote-code MeoForSeq2SeqLM: logits and
greedy/beam generate() agree with meo_ds's model for each MoE kind (MoE in encoder and decoder)
and the MTConfig options (separate source vocabulary, untied output, norms, positions, FFNs, GQA)."""
from __future__ import annotations

import pytest
import torch

from meo_ds.export import remote
from meo_ds.models import MTConfig, build_model
from meo_ds.models.generation import translate
from meo_ds.moe import MoEConfig
from tests.export.export_mt import hf_generated

V, BOS, EOS, PAD = 40, 2, 3, 0
STEPS = 12
MOE = dict(num_experts=4, top_k=2, noisy_gating=True)  # noise weights are not exported
CASES = {  # name: (MoE settings, MTConfig settings)
    # MTConfig defaults: layernorm, sinusoidal positions, GELU FFNs with biases, scaled shared+tied embeddings
    "topk": ({"kind": "topk", "activation": "gelu"}, {}),
    "xmoe": ({"kind": "xmoe", "threshold": 0.6, "max_k": 3},
             {"share_embeddings": False, "src_vocab_size": 50, "tie_output": False, "positions": "rope"}),
    "meo": ({"kind": "meo", "meo_level": "token", "segment_len": 3},
            {"norm": "rmsnorm", "positions": "rope", "activation": "swiglu", "bias": False,
             "scale_embeddings": False, "tie_output": False}),
    "meo_gelu": ({"kind": "meo", "activation": "gelu", "segment_len": 3}, {"share_embeddings": False}),
}


def _model(case: str) -> tuple[MTConfig, torch.nn.Module]:
    moe, extra = CASES[case]
    cfg = MTConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, encoder_layers=2, decoder_layers=2,
                   max_seq_len=32, dropout=0.0, moe=MoEConfig(**MOE, **moe), moe_in="both", moe_every=2,
                   moe_offset=1, **extra)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("gate_weight", "default_summary")) or ".token_block." in name:
                p.normal_(0.0, 1.0)  # zero-initialised: make MEO's routing and token block matter
    return cfg, ours


def _sources(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 sources ending with eos, two of them right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 9), generator=g)
    lens = torch.tensor([9, 6, 3])
    mask = torch.arange(9) < lens[:, None]
    ids[torch.arange(3), lens - 1] = EOS
    return ids.masked_fill(~mask, PAD), mask


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_ours(case: str) -> None:
    cfg, ours = _model(case)
    hf = remote.build_hf_model("translation", cfg, ours.state_dict())
    assert (hf.model.src_embed_tokens is None) == cfg.share_embeddings
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == cfg.tie_output
    src, mask = _sources(cfg.source_vocab_size)
    dec = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 10), generator=torch.Generator().manual_seed(2))], 1)
    with torch.no_grad():
        want = ours(src, mask, dec).logits
        got = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        repadded = hf(input_ids=src.masked_fill(~mask, 7), attention_mask=mask.long(), decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(repadded, want, rtol=1e-5, atol=1e-5)


def _mean_logprob(ours: torch.nn.Module, src, mask, sequences: torch.Tensor, eos: int) -> torch.Tensor:
    """Our model's log-probability of each generated sequence (to its first eos) / its length."""
    with torch.no_grad():
        logp = torch.log_softmax(ours(src, mask, sequences[:, :-1]).logits.float(), -1)
    token_logp = logp.gather(-1, sequences[:, 1:, None]).squeeze(-1)
    out = []
    for row, tokens in zip(token_logp, sequences[:, 1:].tolist()):
        n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        out.append(row[:n].sum() / n)
    return torch.stack(out)


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_translate(case: str) -> None:
    cfg, ours = _model(case)
    hf = remote.build_hf_model("translation", cfg, ours.state_dict())
    src, mask = _sources(cfg.source_vocab_size)
    # Untrained models rarely say eos: take as eos a token that row 0 produces at step 4, so that
    # rows ending early (eos, then padding) and rows running to max_new_tokens are both covered.
    eos = translate(ours, src, mask, bos_id=BOS, eos_id=-1, max_new_tokens=4)[0][3]
    want = translate(ours, src, mask, bos_id=BOS, eos_id=eos, max_new_tokens=STEPS)
    assert min(map(len, want)) < STEPS
    kw = dict(attention_mask=mask.long(), max_new_tokens=STEPS, eos_token_id=eos)
    greedy = hf.generate(src, do_sample=False, num_beams=1, **kw)
    assert torch.equal(greedy, hf_generated(want, BOS, eos, PAD, STEPS)), (greedy, want)
    beams = hf.generate(src, num_beams=3, output_scores=True, return_dict_in_generate=True, **kw)
    # beam search ran on our model's probabilities: its scores are our length-normalised log-probabilities
    torch.testing.assert_close(beams.sequences_scores, _mean_logprob(ours, src, mask, beams.sequences, eos),
                               rtol=1e-4, atol=1e-4)
