"""Generation with a KV cache (and per-MoE-layer state): LM greedy or sampling; translation greedy or beam search."""
from __future__ import annotations

from typing import Optional

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B,V] -> next ids [B]; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the fewest tokens reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, use_cache: bool = True,
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """prompt [B,L] -> [B, L + n] (stops early when every row has produced eos_id)."""
    if prompt.dim() != 2 or prompt.numel() == 0:
        raise ValueError(f"prompt must be a non-empty [B, L] tensor, got shape {tuple(prompt.shape)}")
    ids = prompt
    cache = model.new_cache() if use_cache else None
    step_in = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_in if use_cache else ids, cache=cache).logits[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        ids = torch.cat((ids, nxt[:, None]), 1)
        step_in = nxt[:, None]
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
    return ids


# ------------------------------------------------------------------------------- translation
def reorder_cache(cache: list, index: torch.Tensor) -> None:
    """Select rows `index` of every batch-first tensor in a decoder cache (beam reordering)."""

    def select(node):
        if torch.is_tensor(node):
            return node.index_select(0, index)
        if isinstance(node, dict):
            return {k: select(v) for k, v in node.items()}
        return node

    for i, layer in enumerate(cache):
        cache[i] = select(layer)


def _next_logprobs(model: torch.nn.Module, memory: torch.Tensor, src_mask: torch.Tensor, ids: torch.Tensor,
                   cache: Optional[list]) -> torch.Tensor:
    """Log-probabilities [N, V] of the token after `ids` [N, t] (only the last token is fed with a cache)."""
    step_in = ids[:, -1:] if cache is not None else ids
    logits, _, _ = model.decode(memory, src_mask, step_in, cache=cache)
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


@torch.no_grad()
def translate(model: torch.nn.Module, src_ids: torch.Tensor, src_mask: Optional[torch.Tensor] = None, *,
              bos_id: int, eos_id: int, max_new_tokens: int = 128, beam_size: int = 1,
              length_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Translate a batch of sources [B, S] (ending with eos) -> B token lists (without bos/eos).

    beam_size 1 is greedy decoding. Beam search keeps beam_size live hypotheses per sentence and
    finishes a hypothesis when eos is among the beam_size best candidates (so beam 1 is greedy);
    hypotheses are ranked by log-probability / length**length_penalty, length counting the
    generated tokens (eos included). A sentence stops once it has beam_size finished hypotheses;
    after max_new_tokens its live hypotheses (no eos) are ranked with them. Every sentence is decoded in lockstep, so ranks decoding the
    same sources (expert parallelism) run the same number of forwards.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - 1)
    memory, _, _ = model.encode(src_ids, src_mask)
    if src_mask is None:
        src_mask = torch.ones_like(src_ids, dtype=torch.bool)
    if beam_size == 1:
        return _greedy(model, memory, src_mask, bos_id, eos_id, max_new_tokens, use_cache)
    return _beam_search(model, memory, src_mask, bos_id, eos_id, max_new_tokens, beam_size, length_penalty, use_cache)


def _greedy(model, memory, src_mask, bos_id, eos_id, max_new_tokens, use_cache) -> list[list[int]]:
    B = memory.shape[0]
    ids = torch.full((B, 1), bos_id, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    cache = model.new_cache() if use_cache else None
    for _ in range(max_new_tokens):
        nxt = _next_logprobs(model, memory, src_mask, ids, cache).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        ids = torch.cat((ids, nxt[:, None]), 1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return [_strip(row[1:].tolist(), eos_id) for row in ids]


def _beam_search(model, memory, src_mask, bos_id, eos_id, max_new_tokens, K, length_penalty, use_cache):
    B, device = memory.shape[0], memory.device
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)
    ids = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    cache = model.new_cache() if use_cache else None
    for step in range(1, max_new_tokens + 1):
        logp = _next_logprobs(model, memory, src_mask, ids, cache)  # [B*K, V]
        V = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)  # enough to fill K live beams after eos
        beam, token = top_idx // V, top_idx % V
        next_scores = torch.full((B, K), float("-inf"), device=device)
        next_rows = torch.arange(B * K, device=device).view(B, K)  # done sentences keep their rows
        next_tokens = torch.full((B, K), eos_id, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for j in range(2 * K):
                score, row, tok = float(top_scores[b, j]), b * K + int(beam[b, j]), int(token[b, j])
                if score == float("-inf"):
                    break
                if tok == eos_id:
                    if j < K:  # eos counts only among the K best candidates
                        finished[b].append((score / step**length_penalty, ids[row, 1:].tolist()))
                    continue
                next_scores[b, live], next_rows[b, live], next_tokens[b, live] = score, row, tok
                live += 1
                if live == K:
                    break
            done[b] = len(finished[b]) >= K
        if all(done):
            break
        rows = next_rows.view(-1)
        ids = torch.cat((ids.index_select(0, rows), next_tokens.view(-1, 1)), 1)
        scores = next_scores
        if cache is not None:
            reorder_cache(cache, rows)
    for b in range(B):  # out of steps: live hypotheses (no eos) compete with the finished ones
        if not done[b]:
            length = ids.shape[1] - 1  # tokens generated
            for k in range(K):
                if scores[b, k] > float("-inf"):
                    finished[b].append((float(scores[b, k]) / length**length_penalty, ids[b * K + k, 1:].tolist()))
    return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]


def _strip(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
