"""Transformer blocks shared by the language model and the translation model.

One pre-norm block serves both: self-attention (causal or not), optional cross-attention, and
an FFN that is dense or any MoE layer of meo_ds.moe. What differs between the models (norm,
biases, activation, rotary or absolute positions) is a `BlockSpec`.

Parameter names are part of the checkpoint format (and of the export mapping in
meo_ds/export/layout.py): attn_norm, attn.{q,k,v,o}_proj, cross_norm, cross_attn.*, ffn_norm,
ffn.{w1,w2,w3} (dense) or moe.* (MoE).

KV cache: one dict per layer, {"k", "v"} for self-attention (grown each call), {"cross_k",
"cross_v"} (computed once from the encoder output) and "moe" (the MoE layer's own state, used
by MEO's causal segment gates).

The math of norms, positions and attention is in meo_ds/models/functional.py (pure torch, shipped
with remote-code exports); this file holds the modules and their parameter names.

A block never asks which MoE kind it holds: it builds the layer through meo_ds.moe's registry
(`build_moe_layer`), passes every layer the same context, and delegates FLOP and parameter
accounting to the layer (`flops_per_token`, `inactive_params`; see meo_ds/moe/layer.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meo_ds.models.functional import apply_rope, attend, rms_norm
from meo_ds.moe import MoEConfig, MoEOutput, build_moe_layer

Norm = Literal["rmsnorm", "layernorm"]
Activation = Literal["swiglu", "gelu"]


@dataclass(frozen=True)
class BlockSpec:
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "swiglu"  # dense FFN: swiglu (w1, w3, w2) or gelu (w1, w2)
    bias: bool = False  # biases in attention projections and the dense FFN
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2), whatever `bias` says
    rope_theta: Optional[float] = 10000.0  # None: no rotary embedding (positions added to the input)
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: Norm, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'rmsnorm' or 'layernorm'")


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads; self-attention or cross-attention."""

    def __init__(self, spec: BlockSpec, cross: bool = False):
        super().__init__()
        self.h, self.kvh, self.hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.cross = cross
        self.theta = None if cross else spec.rope_theta
        d = spec.d_model
        qkv_bias = spec.bias or spec.qkv_bias
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.kvh * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.kvh * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=spec.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.hd).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[dict] = None, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,L,d]; mask broadcastable to [B,1,L,keys] (True = attend); memory [B,S,d] for cross."""
        B, L, _ = x.shape
        q = self._heads(self.q_proj(x), self.h)
        if self.cross:
            k, v = self._memory_kv(memory, cache)
        else:
            k, v = self._heads(self.k_proj(x), self.kvh), self._heads(self.v_proj(x), self.kvh)
            if self.theta is not None:
                q, k = apply_rope(q, positions, self.theta), apply_rope(k, positions, self.theta)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
                cache["k"], cache["v"] = k, v
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.h * self.hd))

    def _memory_kv(self, memory: torch.Tensor, cache: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not None and "cross_k" in cache:
            return cache["cross_k"], cache["cross_v"]
        k, v = self._heads(self.k_proj(memory), self.kvh), self._heads(self.v_proj(memory), self.kvh)
        if cache is not None:
            cache["cross_k"], cache["cross_v"] = k, v
        return k, v


class DenseFFN(nn.Module):
    """swiglu: w2(silu(w1 x) * w3 x) (Llama/Mistral); gelu: w2(gelu(w1 x))."""

    def __init__(self, d: int, hidden: int, activation: Activation = "swiglu", bias: bool = False):
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"unknown FFN activation {activation!r}; use 'swiglu' or 'gelu'")
        self.w1 = nn.Linear(d, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d, bias=bias)
        self.w3 = nn.Linear(d, hidden, bias=bias) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm x) [+ cross_attn(norm x, memory)] + ffn-or-moe(norm x)."""

    def __init__(self, spec: BlockSpec, moe: Optional[MoEConfig] = None, causal: bool = True, cross: bool = False):
        super().__init__()
        self.spec = spec
        self.attn_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.attn = Attention(spec)
        self.cross_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps) if cross else None
        self.cross_attn = Attention(spec, cross=True) if cross else None
        self.ffn_norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.is_moe = moe is not None
        if self.is_moe:  # cross: a decoder layer's MoE may read the source sentence (MEO's gates do)
            self.moe = build_moe_layer(moe, spec.d_model, spec.d_ff, causal=causal, cross=cross)
        else:
            self.ffn = DenseFFN(spec.d_model, spec.d_ff, spec.activation, spec.bias)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                memory: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[MoEOutput]]:
        """doc_ids [B, L]: document ids of packed rows (full forward), read by MEO's causal gates."""
        x = x + self.drop(self.attn(self.attn_norm(x), mask, positions, cache))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), memory_mask, cache=cache, memory=memory))
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.drop(self.ffn(h)), None
        state = cache.setdefault("moe", {}) if cache is not None else None
        source_mask = None if memory is None else memory_mask.reshape(memory.shape[:2])
        out = self.moe(h, padding_mask, state, doc_ids=doc_ids, memory=memory, memory_mask=source_mask)
        return x + self.drop(out.hidden), out

    # ---------------------------------------------------------------- accounting
    def forward_flops(self, query_len: int, memory_len: int = 0, routing: Optional[Mapping[str, float]] = None,
                      executed: bool = False) -> float:
        """Forward matmul FLOPs per token: projections, attention over query_len keys (full square,
        not halved for causal masks), cross-attention over memory_len keys, and the FFN or the MoE
        layer's own count (model or executed, from `routing`: this layer's measured
        experts_per_token and rows_per_token, as metrics.RoutingAccumulator.summary gives them)."""
        spec = self.spec
        d, hd = spec.d_model, spec.head_dim
        proj = 2 * (2 * d * spec.n_heads * hd + 2 * d * spec.n_kv_heads * hd)  # q,o + k,v
        flops = proj + 2 * 2 * query_len * spec.n_heads * hd  # QK^T and AV
        if self.cross_attn is not None:
            # q,o per token; k,v of the memory counted once per memory token and spread over the queries.
            flops += 2 * 2 * d * spec.n_heads * hd + 2 * 2 * memory_len * spec.n_heads * hd
        if not self.is_moe:
            return flops + 2 * (3 if self.ffn.w3 is not None else 2) * d * spec.d_ff
        routing = routing or {}
        return flops + self.moe.flops_per_token(query_len, executed=executed,
                                                experts_per_token=routing.get("experts_per_token"),
                                                rows_per_token=routing.get("rows_per_token"))

    def memory_kv_flops(self) -> float:
        """Forward FLOPs per memory token of the cross-attention k and v projections (0 without cross)."""
        spec = self.spec
        return 0.0 if self.cross_attn is None else 2 * 2 * spec.d_model * spec.n_kv_heads * spec.head_dim


def routing_per_block(blocks: Sequence[Block], routing: Optional[Sequence[Mapping[str, float]]]) -> list:
    """Per-MoE-layer routing rows (forward order, as the model's stats list them) -> one per block
    (None for dense blocks, and for every block when nothing was measured)."""
    if routing is None:
        return [None] * len(blocks)
    moe = [b for b in blocks if b.is_moe]
    if len(routing) != len(moe):
        raise ValueError(f"routing has {len(routing)} rows but the model has {len(moe)} MoE layers")
    rows = iter(routing)
    return [next(rows) if b.is_moe else None for b in blocks]


def inactive_params(block: Block, experts_per_token: Optional[float] = None) -> float:
    """Parameters of a block that one token does not use (its MoE layer's unused experts)."""
    return block.moe.inactive_params(experts_per_token) if block.is_moe else 0.0


def init_weights(model: nn.Module, std: float, n_residual_layers: int) -> None:
    """Normal(0, std) for attention, dense FFN and embedding weights, zero biases; the residual
    output projections (o_proj, dense w2) at std / sqrt(2 n_layers) (GPT-2). MoE layers keep
    their own initialisation (router, experts, MEO's zero gates)."""
    resid_std = std / math.sqrt(2 * n_residual_layers)
    for module in model.modules():
        if isinstance(module, (Attention, DenseFFN)):
            for name, lin in module.named_children():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, 0.0, resid_std if name in ("o_proj", "w2") else std)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
