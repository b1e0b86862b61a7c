"""A tiny encoder-decoder translation model built from meo_ds.moe layers, for trainer tests that
must not depend on the model zoo: post-embedding transformer encoder whose FFNs are MoE layers,
a small transformer decoder with cross-attention, greedy decoding (`translate`).

`install()` makes meo_ds.train build it (meo_ds.evaluate calls its translate()); run
`python tests/workers/tiny_mt.py --config ... --deepspeed_config ...` on ranks.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from meo_ds.moe import MoEConfig, build_moe_layer


@dataclass
class TinyMTConfig:
    vocab_size: int = 512
    d_model: int = 64
    d_ff: int = 128
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    max_len: int = 128
    moe: MoEConfig = field(default_factory=MoEConfig)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TinyMTConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.ffn = build_moe_layer(cfg.moe, cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        out = self.ffn(self.norm2(x), mask)
        return x + out.hidden, out.aux_loss, out.stats


class TinyMT(nn.Module):
    def __init__(self, cfg: TinyMTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.enc_norm = nn.LayerNorm(cfg.d_model)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.decoder_layers, norm=nn.LayerNorm(cfg.d_model))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor):
        x, aux, stats = self._embed(src_ids), 0.0, []
        for layer in self.encoder:
            x, a, s = layer(x, src_mask)
            aux, stats = aux + a, stats + [s]
        return self.enc_norm(x), aux, stats

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor, dec_ids: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(dec_ids.shape[1], device=dec_ids.device)
        h = self.decoder(self._embed(dec_ids), memory, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=~src_mask)
        return self.head(h)

    def forward(self, src_ids, src_mask, decoder_input_ids, labels, **_):
        memory, aux, stats = self.encode(src_ids, src_mask)
        logits = self.decode(memory, src_mask, decoder_input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss, aux_loss=aux, stats=stats)

    @torch.no_grad()
    def translate(self, src_ids, src_mask, *, max_new_tokens: int, bos_id: int, eos_id: int, **_) -> list[list[int]]:
        """Greedy decoding (beam_size is ignored); stops when every sequence has produced eos,
        at the same step on every rank since all ranks decode the same sentences."""
        memory, _, _ = self.encode(src_ids, src_mask)
        out = torch.full((src_ids.shape[0], 1), bos_id, dtype=torch.long, device=src_ids.device)
        done = torch.zeros(src_ids.shape[0], dtype=torch.bool, device=src_ids.device)
        for _ in range(min(max_new_tokens, self.cfg.max_len - 1)):
            nxt = self.decode(memory, src_mask, out)[:, -1].argmax(-1)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return [row[1:].tolist() for row in out]


def install() -> None:
    import meo_ds.config as config
    import meo_ds.train as train

    config.build_model_config = lambda tree, task: config.from_dict(TinyMTConfig, tree, "model")
    train.build_model = lambda cfg: TinyMT(cfg.model)  # meo_ds.evaluate decodes with TinyMT.translate


if __name__ == "__main__":
    install()
    from meo_ds.train import main

    sys.exit(main())
