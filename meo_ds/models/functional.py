"""Transformer math in plain torch: RMS norm, rotary and sinusoidal positions, grouped-query attention.

One definition serves two callers: meo_ds's own blocks (meo_ds/models/blocks.py) and the exported
remote-code model, which ships this very file as `models_functional.py` next to its
`modeling_meo.py` (meo_ds/export/remote.py copies it; a test checks the copy byte for byte). So
this file imports torch, math and typing only, never meo_ds or DeepSpeed, and holds functions of
tensors, not modules: parameter names belong to each side's own modules.

Conventions: rotary embedding is HF Llama/Mixtral's (rotate_half over the two halves of the head
dimension, inverse frequencies theta^(-2i/d) in fp32); sinusoidal positions are
[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i/(dim/2)) (concatenated, not interleaved); RMS norm
normalises in fp32 and multiplies the weight in the input's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, the mean taken in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the two halves of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, H, L, hd] at positions [B, L] (or [1, L] for every row)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.float()[:, None, :, None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return (x * ang.cos().to(x.dtype)) + (rotate_half(x) * ang.sin().to(x.dtype))


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Absolute sinusoidal embeddings [..., dim] = [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float().unsqueeze(-1) * freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q [B, H, L, hd]; k, v [B, H_kv, S, hd] with H a multiple of H_kv (each kv head serves
    H / H_kv consecutive query heads); mask broadcastable to [B, H, L, S], True = attend.
    Returns [B, H, L, hd].
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
