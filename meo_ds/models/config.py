"""Model configuration dataclasses: the single source of truth for model shapes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from meo_ds.moe.config import MoEConfig


class ModelConfigError(ValueError):
    """An inconsistent model configuration; the message names the field."""


def attention_checks(d_model: int, n_heads: int, kv_heads: int) -> list[tuple[bool, str]]:
    """Shape checks every attention stack needs: heads divide d_model and group into kv heads,
    and the head dimension is even (rotary positions rotate pairs of dimensions)."""
    return [
        (n_heads > 0 and d_model % n_heads == 0, f"d_model {d_model} must divide by n_heads {n_heads}"),
        ((d_model // max(n_heads, 1)) % 2 == 0, "head dimension d_model/n_heads must be even (rotary positions)"),
        (n_heads % kv_heads == 0, f"n_heads {n_heads} must divide by n_kv_heads {kv_heads}"),
    ]


def raise_first_failure(checks: list[tuple[bool, str]], moe: Optional[MoEConfig]) -> None:
    """ModelConfigError for the first failed (ok, message) check, then the MoE layer's own checks."""
    for ok, msg in checks:
        if not ok:
            raise ModelConfigError(f"model config: {msg}")
    if moe is not None:
        moe.validate()


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
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2's attention; o_proj has none)
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
            *attention_checks(self.d_model, self.n_heads, self.kv_heads()),
            (self.max_seq_len > 0, "max_seq_len must be > 0"),
            (self.moe_every > 0 and 0 <= self.moe_offset < self.moe_every, "need moe_every > 0 and 0 <= moe_offset < moe_every"),
            (self.moe_layers is None or all(0 <= i < self.n_layers for i in self.moe_layers),
             f"moe_layers {self.moe_layers} must lie in [0, n_layers={self.n_layers})"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
        ]
        raise_first_failure(checks, self.moe)
        return self


@dataclass
class MTConfig:
    """Encoder-decoder translation model (pre-norm transformer; MoE FFNs in either stack)."""

    vocab_size: int = 512  # target vocabulary (and the source's when src_vocab_size is None)
    src_vocab_size: Optional[int] = None  # a separate source vocabulary (needs share_embeddings=False)
    share_embeddings: bool = True  # one table for source and target tokens (joint vocabulary)
    tie_output: bool = True  # output projection = target embedding
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no GQA)
    d_ff: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    max_seq_len: int = 256  # longest source or target sequence (eos/bos included)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["sinusoidal", "rope"] = "sinusoidal"
    rope_theta: float = 10000.0
    activation: Literal["gelu", "swiglu"] = "gelu"  # dense FFNs
    bias: bool = True  # biases in attention and dense FFNs
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (Transformer)
    dropout: float = 0.1
    label_smoothing: float = 0.1
    moe: Optional[MoEConfig] = None  # None: every FFN dense
    moe_in: Literal["encoder", "decoder", "both"] = "encoder"  # which stacks hold MoE layers
    moe_every: int = 2  # MoE at layers i with i % moe_every == moe_offset (in each chosen stack)
    moe_offset: int = 1
    encoder_moe_layers: Optional[list[int]] = None  # explicit lists override moe_in/every/offset
    decoder_moe_layers: Optional[list[int]] = None
    init_std: Optional[float] = None  # None: d_model ** -0.5 (the Transformer's fan-in scale)

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def source_vocab_size(self) -> int:
        return self.src_vocab_size or self.vocab_size

    def is_moe_layer(self, stack: str, i: int) -> bool:
        """Whether layer i of 'encoder' or 'decoder' holds an MoE layer."""
        if self.moe is None:
            return False
        explicit = self.encoder_moe_layers if stack == "encoder" else self.decoder_moe_layers
        if self.encoder_moe_layers is not None or self.decoder_moe_layers is not None:
            return explicit is not None and i in explicit
        if self.moe_in not in (stack, "both"):
            return False
        return i % self.moe_every == self.moe_offset

    def validate(self) -> "MTConfig":
        checks = [
            (self.vocab_size > 0, "vocab_size must be > 0"),
            (self.src_vocab_size is None or self.src_vocab_size > 0, "src_vocab_size must be > 0 (or null)"),
            (not (self.share_embeddings and self.src_vocab_size not in (None, self.vocab_size)),
             f"share_embeddings=true needs one vocabulary, but src_vocab_size={self.src_vocab_size} differs from "
             f"vocab_size={self.vocab_size}; set share_embeddings=false or drop src_vocab_size"),
            (self.d_model > 0 and self.d_ff > 0, "d_model and d_ff must be > 0"),
            (self.encoder_layers > 0 and self.decoder_layers > 0, "encoder_layers and decoder_layers must be > 0"),
            *attention_checks(self.d_model, self.n_heads, self.kv_heads()),
            (self.d_model % 2 == 0, "d_model must be even (sinusoidal positions)"),
            (self.max_seq_len > 1, "max_seq_len must be > 1"),
            (self.init_std is None or self.init_std > 0, "init_std must be > 0 (or null for d_model ** -0.5)"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'"),
            (self.positions in ("sinusoidal", "rope"), f"positions={self.positions!r}: use 'sinusoidal' or 'rope'"),
            (self.activation in ("gelu", "swiglu"), f"activation={self.activation!r}: use 'gelu' or 'swiglu'"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.moe_in in ("encoder", "decoder", "both"), f"moe_in={self.moe_in!r}: use 'encoder', 'decoder' or 'both'"),
            (self.moe_every > 0 and 0 <= self.moe_offset < self.moe_every, "need moe_every > 0 and 0 <= moe_offset < moe_every"),
            (self.encoder_moe_layers is None or all(0 <= i < self.encoder_layers for i in self.encoder_moe_layers),
             f"encoder_moe_layers {self.encoder_moe_layers} must lie in [0, encoder_layers={self.encoder_layers})"),
            (self.decoder_moe_layers is None or all(0 <= i < self.decoder_layers for i in self.decoder_moe_layers),
             f"decoder_moe_layers {self.decoder_moe_layers} must lie in [0, decoder_layers={self.decoder_layers})"),
        ]
        raise_first_failure(checks, self.moe)
        return self


def config_class(task: str) -> type:
    """The config dataclass for a task: 'lm' -> LMConfig, 'translation' -> MTConfig."""
    if task == "lm":
        return LMConfig
    if task == "translation":
        return MTConfig
    raise ModelConfigError(f"unknown task {task!r}; this models package builds: 'lm', 'translation'")
