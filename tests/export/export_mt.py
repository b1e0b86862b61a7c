"""Shared by the translation export tests: what transformers' generate() returns for our tokens."""
from __future__ import annotations

import torch


def hf_generated(tokens: list[list[int]], bos: int, eos: int, pad: int, max_new_tokens: int) -> torch.Tensor:
    """The greedy generate() output that matches meo_ds translate()'s tokens (bos/eos stripped): the
    start token, the tokens, eos when it came within max_new_tokens, then padding to the longest row."""
    rows = [[bos] + t + ([eos] if len(t) < max_new_tokens else []) for t in tokens]
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])
