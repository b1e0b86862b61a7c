"""LM generation with a KV cache (and per-MoE-layer state): greedy or sampling."""
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
