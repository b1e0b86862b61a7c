"""Decoder-only MoE language model (Mixtral architecture when the MoE is top-k SwiGLU)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from meo_ds.moe import build_moe_layer
from meo_ds.models.config import LMConfig


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    stats: list


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B,H,L,hd], positions [B,L]; HF Llama/Mixtral convention (rotate_half)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.float()[:, None, :, None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return (x * ang.cos().to(x.dtype)) + (rotate_half(x) * ang.sin().to(x.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.n_heads, cfg.kv_heads(), cfg.d_model // cfg.n_heads
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kvh * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kvh * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kvh, self.hd).transpose(1, 2)
        q, k = apply_rope(q, positions, self.theta), apply_rope(k, positions, self.theta)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
            cache["k"], cache["v"] = k, v
        rep = self.h // self.kvh
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.h * self.hd))


class DenseFFN(nn.Module):
    """SwiGLU without biases (Llama/Mistral): w2(silu(w1 x) * w3 x)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, is_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = is_moe
        if is_moe:
            self.moe = build_moe_layer(cfg.moe, cfg.d_model, cfg.d_ff, causal=True)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, positions, mask, padding_mask, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), positions, mask, cache))
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.drop(self.ffn(h)), None
        state = cache.setdefault("moe", {}) if cache is not None else None
        out = self.moe(h, padding_mask, state)
        return x + self.drop(out.hidden), out


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("ffn.w2.weight"):
                nn.init.normal_(p, 0.0, resid_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (Attention, DenseFFN)):
            for lin in m.children():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, 0.0, self.cfg.init_std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
        elif m is getattr(self, "lm_head", None):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)

    def _check(self, ids: torch.Tensor, past: int) -> None:
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [B, L] tensor, got shape {tuple(ids.shape)}")
        if past + ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + ids.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got range [{lo}, {hi}]")

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                cache: Optional[list] = None) -> ModelOutput:
        """targets/labels [B,L] are already shifted (target of position t); -100 ignored."""
        targets = labels if targets is None else targets
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        self._check(input_ids, past)
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=input_ids.device).expand(B, L)
        q_pos = torch.arange(past, past + L, device=input_ids.device)
        mask = (torch.arange(past + L, device=input_ids.device)[None, :] <= q_pos[:, None])[None, None]
        if segment_ids is not None and cache is None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        x = self.embed(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        stats = []
        for i, block in enumerate(self.layers):
            x, out = block(x, position_ids, mask, padding_mask, cache[i] if cache is not None else None)
            if out is not None:
                aux = aux + out.aux_loss.float()
                stats.append((f"layers.{i}.moe", out.stats))
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss, aux, stats)

    def new_cache(self) -> list:
        return [dict() for _ in self.layers]

    # ---------------------------------------------------------------- accounting
    def param_counts(self) -> dict:
        """total parameters and parameters active per token (MoE: k experts for top-k)."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for b in self.layers:
            if b.is_moe:
                m = self.cfg.moe
                expert = 3 * self.cfg.d_model * (m.expert_hidden or self.cfg.d_ff)
                used = m.top_k if m.kind == "topk" else 1
                active -= (m.num_experts - used) * expert
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: Optional[int] = None, xmoe_mean_experts: Optional[float] = None) -> float:
        """Training FLOPs per token: 6 x active matmul params + attention 12 n_layers L d (fwd+bwd)."""
        c = self.cfg
        L = seq_len or c.max_seq_len
        hd = c.d_model // c.n_heads
        attn_proj = c.d_model * (c.n_heads * hd) * 2 + c.d_model * (c.kv_heads() * hd) * 2
        fwd = 2 * c.d_model * c.vocab_size
        for b in self.layers:
            fwd += 2 * attn_proj + 2 * 2 * L * c.n_heads * hd  # projections + QK^T and AV (full L)
            if b.is_moe:
                width = c.moe.expert_hidden or c.d_ff
                if c.moe.kind == "meo" and hasattr(b.moe, "flops_per_token"):
                    fwd += b.moe.flops_per_token(L)
                    continue
                k = c.moe.top_k if c.moe.kind == "topk" else (xmoe_mean_experts or 1.0)
                fwd += 2 * c.d_model * c.moe.num_experts + k * 2 * 3 * c.d_model * width
            else:
                fwd += 2 * 3 * c.d_model * c.d_ff
        return 3.0 * fwd


def build_model(cfg) -> nn.Module:
    if isinstance(cfg, LMConfig):
        return MoELM(cfg)
    raise TypeError(f"build_model: unsupported config type {type(cfg).__name__}")
