"""A tiny causal LM built directly from meo_ds.moe layers, for trainer tests that must not
depend on the model zoo: embedding -> [causal conv mixer + MoE FFN] x n -> RMSNorm -> head.

`install()` makes meo_ds.train build this model for run configs whose model section is
TinyLMConfig; run `python tests/workers/tiny_lm.py --config ... --deepspeed_config ...` on ranks.
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
class TinyLMConfig:
    vocab_size: int = 2000
    d_model: int = 64
    d_ff: int = 128
    n_layers: int = 2
    moe: MoEConfig = field(default_factory=MoEConfig)


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.mix = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=4, groups=cfg.d_model)  # causal via left pad
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn = build_moe_layer(cfg.moe, cfg.d_model, cfg.d_ff, causal=True)

    def forward(self, x: torch.Tensor):
        h = self.norm1(x).transpose(1, 2)
        x = x + self.mix(F.pad(h, (3, 0))).transpose(1, 2)
        out = self.ffn(self.norm2(x))
        return x + out.hidden, out.aux_loss, out.stats


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_):
        x, aux, stats = self.embed(input_ids), 0.0, []
        for block in self.blocks:
            x, a, s = block(x)
            aux, stats = aux + a, stats + [s]
        logits = self.head(self.norm(x))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss, aux_loss=aux, stats=stats)


def install() -> None:
    import meo_ds.config as config
    import meo_ds.train as train

    config.build_model_config = lambda tree, task: config.from_dict(TinyLMConfig, tree, "model")
    train.build_model = lambda cfg: TinyLM(cfg.model)


if __name__ == "__main__":
    install()
    from meo_ds.train import main

    sys.exit(main())
