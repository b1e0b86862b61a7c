"""Encoder-decoder MoE translation model (pre-norm Transformer; MoE FFNs in the encoder and/or decoder).

    model = MoETranslationModel(MTConfig(...))
    out = model(src_ids, src_mask, decoder_input_ids, labels)   # ModelOutput
    memory = model.encode(src_ids, src_mask)                      # then decode step by step

The encoder is bidirectional (its MEO layers gate per source sentence); the decoder is causal
with cross-attention to the encoder output (its MEO layers gate per causal segment, so cached
decoding computes what training computed). Batches follow meo_ds.data.mt.MTLoader: the source
ends with eos, the decoder reads bos + target and predicts target + eos (labels, -100 = pad).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meo_ds.models.blocks import Block, BlockSpec, inactive_params, init_weights, make_norm, routing_per_block
from meo_ds.models.functional import sinusoidal_positions
from meo_ds.models.config import MTConfig
from meo_ds.models.lm import ModelOutput, run_blocks


def block_spec(cfg: MTConfig) -> BlockSpec:
    return BlockSpec(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads(), d_ff=cfg.d_ff,
                     norm=cfg.norm, norm_eps=cfg.norm_eps, activation=cfg.activation, bias=cfg.bias,
                     rope_theta=cfg.rope_theta if cfg.positions == "rope" else None, dropout=cfg.dropout)


class Stack(nn.Module):
    """N blocks and a final norm: the encoder (cross=False, bidirectional) or the decoder."""

    def __init__(self, cfg: MTConfig, spec: BlockSpec, name: str, num_layers: int, decoder: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(spec, cfg.moe if cfg.is_moe_layer(name, i) else None, causal=decoder, cross=decoder)
            for i in range(num_layers)
        )
        self.norm = make_norm(spec.norm, spec.d_model, spec.norm_eps)
        self.name = name


class MoETranslationModel(nn.Module):
    def __init__(self, cfg: MTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.spec = block_spec(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # target tokens (and source when shared)
        self.src_embed = None if cfg.share_embeddings else nn.Embedding(cfg.source_vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, self.spec, "encoder", cfg.encoder_layers, decoder=False)
        self.decoder = Stack(cfg, self.spec, "decoder", cfg.decoder_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        std = cfg.init_std or cfg.d_model**-0.5
        init_weights(self, std, cfg.encoder_layers + cfg.decoder_layers)
        # Scaled embeddings start at unit variance; unscaled ones at the init std.
        emb_std = cfg.d_model**-0.5 if cfg.scale_embeddings else std
        for table in (self.embed, self.src_embed, self.lm_head):
            if table is not None:
                nn.init.normal_(table.weight, 0.0, emb_std)
        if cfg.tie_output:
            self.lm_head.weight = self.embed.weight

    # ---------------------------------------------------------------- checks
    def _check_ids(self, ids: torch.Tensor, mask: Optional[torch.Tensor], name: str, vocab: int, past: int = 0) -> None:
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [batch, length] tensor, got shape {tuple(ids.shape)}")
        if past + ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"{name}: length {past + ids.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}; "
                             f"raise model.max_seq_len or prepare the corpus with a smaller --max-len")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}); got range [{lo}, {hi}]")
        if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
            raise ValueError(f"the mask of {name} must be a bool tensor of shape {tuple(ids.shape)} (True = real "
                             f"token), got {mask.dtype} {tuple(mask.shape)}")

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = table(ids) * self.embed_scale
        if self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.cfg.d_model).to(x.dtype)
        return self.drop(x)

    # ---------------------------------------------------------------- encoder / decoder
    def encode(self, src_ids: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Source [B,S] -> (memory [B,S,d], summed aux loss, [(layer name, RoutingStats)])."""
        self._check_ids(src_ids, src_mask, "src_ids", self.cfg.source_vocab_size)
        if src_mask is None:
            src_mask = torch.ones_like(src_ids, dtype=torch.bool)
        B, S = src_ids.shape
        positions = torch.arange(S, device=src_ids.device).expand(B, S)
        table = self.embed if self.src_embed is None else self.src_embed
        x = self._embed(table, src_ids, positions)
        attn_mask = src_mask[:, None, None, :]
        return self._run(self.encoder, x, attn_mask, src_mask, positions)

    def decode(self, memory: torch.Tensor, src_mask: Optional[torch.Tensor], decoder_input_ids: torch.Tensor,
               tgt_mask: Optional[torch.Tensor] = None, cache: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Decoder inputs [B,T] (continuing `cache` when given) -> (logits [B,T,V], aux, stats)."""
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        self._check_ids(decoder_input_ids, tgt_mask, "decoder_input_ids", self.cfg.vocab_size, past)
        B, T = decoder_input_ids.shape
        if memory.shape[0] != B:
            raise ValueError(f"source batch {memory.shape[0]} and target batch {B} differ; pair every source "
                             f"sentence with one target sequence")
        if src_mask is None:
            src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        positions = torch.arange(past, past + T, device=decoder_input_ids.device).expand(B, T)
        causal = torch.arange(past + T, device=positions.device)[None, :] <= positions[0][:, None]
        x = self._embed(self.embed, decoder_input_ids, positions)
        h, aux, stats = self._run(self.decoder, x, causal[None, None], tgt_mask, positions, cache,
                                  memory, src_mask[:, None, None, :])
        return self.lm_head(h), aux, stats

    def _run(self, stack: Stack, x, attn_mask, padding_mask, positions, cache=None, memory=None, memory_mask=None):
        x, aux, stats = run_blocks(stack.layers, x, f"{stack.name}.layers", cache, mask=attn_mask,
                                   padding_mask=padding_mask, positions=positions, memory=memory,
                                   memory_mask=memory_mask)
        return stack.norm(x), aux, stats

    def forward(self, src_ids: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        """labels [B,T]: the token each decoder position predicts (-100 ignored). loss is the
        label-smoothed cross-entropy (the training objective), nll_loss the plain one."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids are required (bos + target, as meo_ds.data.mt.MTLoader builds them)")
        if decoder_input_ids.shape[0] != src_ids.shape[0]:
            raise ValueError(f"src_ids has {src_ids.shape[0]} sentences but decoder_input_ids has "
                             f"{decoder_input_ids.shape[0]}; pair every source sentence with one target sequence")
        memory, enc_aux, enc_stats = self.encode(src_ids, src_mask)
        logits, dec_aux, dec_stats = self.decode(memory, src_mask, decoder_input_ids, tgt_mask)
        loss = nll = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of decoder_input_ids "
                                 f"{tuple(decoder_input_ids.shape)}")
            flat, target = logits.float().flatten(0, 1), labels.reshape(-1)
            loss = F.cross_entropy(flat, target, ignore_index=-100, label_smoothing=self.cfg.label_smoothing)
            nll = F.cross_entropy(flat, target, ignore_index=-100) if self.cfg.label_smoothing else loss
        return ModelOutput(logits, loss, enc_aux + dec_aux, enc_stats + dec_stats, nll)

    def new_cache(self) -> list:
        """One dict per decoder layer: self-attention k/v, cross-attention k/v, MoE state."""
        return [dict() for _ in self.decoder.layers]

    # ---------------------------------------------------------------- accounting
    def param_counts(self, experts_per_token: Optional[float] = None) -> dict:
        """Total parameters and parameters active per token (unused experts excluded)."""
        total = sum(p.numel() for p in self.parameters())
        blocks = list(self.encoder.layers) + list(self.decoder.layers)
        return {"total": total, "active": total - sum(inactive_params(b, experts_per_token) for b in blocks)}

    def flops_per_token(self, src_len: Optional[float] = None, tgt_len: Optional[float] = None,
                        routing: Optional[Sequence[Mapping[str, float]]] = None, executed: bool = False) -> float:
        """Training (3 x forward) matmul FLOPs per target token, for sentences of src_len source and
        tgt_len target tokens (default: both max_seq_len / 2); the encoder's cost is spread over
        the target tokens. Model count, or (executed) what ran; routing: per MoE layer in forward
        order (encoder, then decoder), as metrics.RoutingAccumulator.summary gives it."""
        S = src_len or self.cfg.max_seq_len / 2
        T = tgt_len or self.cfg.max_seq_len / 2
        blocks = list(self.encoder.layers) + list(self.decoder.layers)
        rows = routing_per_block(blocks, routing)
        enc_rows, dec_rows = rows[: len(self.encoder.layers)], rows[len(self.encoder.layers):]
        enc = sum(b.forward_flops(round(S), routing=r, executed=executed) for b, r in zip(self.encoder.layers, enc_rows))
        dec = sum(b.forward_flops(round(T), round(S), routing=r, executed=executed) + b.memory_kv_flops() * S / T
                  for b, r in zip(self.decoder.layers, dec_rows))
        head = 2 * self.cfg.d_model * self.cfg.vocab_size
        return 3.0 * (enc * S / T + dec + head)
