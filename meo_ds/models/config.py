"""Model configuration dataclasses: the single source of truth for model shapes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from meo_ds.moe.config import MoEConfig


class ModelConfigError(ValueError):
    """An inconsistent model configuration; the message names the field."""


@dataclass
class LMConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no GQA)
    d_ff: int = 128
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    moe: Optional[MoEConfig] = None  # None: every FFN dense
    moe_every: int = 2  # MoE at layers i with i % moe_every == moe_offset
    moe_offset: int = 1
    moe_layers: Optional[list[int]] = None  # explicit list overrides moe_every/moe_offset
    init_std: float = 0.02

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i % self.moe_every == self.moe_offset

    def validate(self) -> "LMConfig":
        checks = [
            (self.vocab_size > 0, "vocab_size must be > 0"),
            (self.d_model > 0 and self.n_layers > 0 and self.d_ff > 0, "d_model, n_layers, d_ff must be > 0"),
            (self.n_heads > 0 and self.d_model % self.n_heads == 0, f"d_model {self.d_model} must divide by n_heads {self.n_heads}"),
            ((self.d_model // max(self.n_heads, 1)) % 2 == 0, "head dimension d_model/n_heads must be even for RoPE"),
            (self.n_heads % self.kv_heads() == 0, f"n_heads {self.n_heads} must divide by n_kv_heads {self.kv_heads()}"),
            (self.max_seq_len > 0, "max_seq_len must be > 0"),
            (self.moe_every > 0 and 0 <= self.moe_offset < self.moe_every, "need moe_every > 0 and 0 <= moe_offset < moe_every"),
            (self.moe_layers is None or all(0 <= i < self.n_layers for i in self.moe_layers),
             f"moe_layers {self.moe_layers} must lie in [0, n_layers={self.n_layers})"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ModelConfigError(f"model config: {msg}")
        if self.moe is not None:
            self.moe.validate()
        return self


def config_class(task: str) -> type:
    """The config dataclass for a task ('lm')."""
    if task == "lm":
        return LMConfig
    raise ModelConfigError(f"unknown task {task!r}; this models package builds: 'lm'")
