"""Decoder-only MoE language model (Mixtral architecture when the MoE is top-k SwiGLU)."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meo_ds.models.blocks import Block, BlockSpec, RMSNorm, inactive_params, init_weights, routing_per_block
from meo_ds.models.config import LMConfig


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor]  # the training objective (label-smoothed for translation)
    aux_loss: torch.Tensor
    stats: list
    nll_loss: Optional[torch.Tensor] = None  # plain cross-entropy (perplexity); = loss for the LM


def run_blocks(layers: nn.ModuleList, x: torch.Tensor, name: str, cache: Optional[list] = None,
               **block_inputs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """x through `layers` in order (Block.forward's other inputs by keyword; `cache`: one dict per
    layer) -> (x, the MoE layers' aux losses summed in fp32, [(f"{name}.{i}.moe", RoutingStats)])."""
    aux = x.new_zeros((), dtype=torch.float32)
    stats = []
    for i, block in enumerate(layers):
        x, out = block(x, cache=cache[i] if cache is not None else None, **block_inputs)
        if out is not None:
            aux = aux + out.aux_loss.float()
            stats.append((f"{name}.{i}.moe", out.stats))
    return x, aux, stats


def block_spec(cfg: LMConfig) -> BlockSpec:
    """Llama/Mixtral blocks: RMSNorm, RoPE, SwiGLU, no biases (q/k/v biases with attention_bias: Qwen2)."""
    return BlockSpec(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads(), d_ff=cfg.d_ff,
                     norm="rmsnorm", norm_eps=cfg.norm_eps, activation="swiglu", bias=False,
                     qkv_bias=cfg.attention_bias,
                     rope_theta=cfg.rope_theta, dropout=cfg.dropout)


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.spec = block_spec(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(self.spec, cfg.moe if cfg.is_moe_layer(i) else None, causal=True)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layers)
        nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

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
        x, aux, stats = run_blocks(self.layers, self.embed(input_ids), "layers", cache, mask=mask,
                                   padding_mask=padding_mask, positions=position_ids,
                                   doc_ids=segment_ids if cache is None else None)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss, aux, stats, loss)

    def new_cache(self) -> list:
        return [dict() for _ in self.layers]

    # ---------------------------------------------------------------- accounting
    def param_counts(self, experts_per_token: Optional[float] = None) -> dict:
        """Total parameters and parameters active per token (each MoE layer's unused experts
        excluded, as the layer counts them: top-k k, XMoE the given mean experts per token (1 if
        unknown), MEO the k merged experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(inactive_params(b, experts_per_token) for b in self.layers)
        return {"total": total, "active": total - inactive}

    def flops_per_token(self, seq_len: Optional[int] = None, routing: Optional[Sequence[Mapping[str, float]]] = None,
                        executed: bool = False) -> float:
        """Training (forward + backward = 3 x forward) matmul FLOPs per token at sequence length
        seq_len: the model count, or (executed) what ran; routing: per MoE layer in forward order,
        the measured experts_per_token / rows_per_token (metrics.RoutingAccumulator.summary)."""
        L = seq_len or self.cfg.max_seq_len
        fwd = 2 * self.cfg.d_model * self.cfg.vocab_size
        fwd += sum(b.forward_flops(L, routing=r, executed=executed)
                   for b, r in zip(self.layers, routing_per_block(self.layers, routing)))
        return 3.0 * fwd
