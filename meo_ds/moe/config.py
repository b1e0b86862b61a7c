"""MoEConfig: the single description of one MoE layer (any registered kind).

The MoE layer library depends on nothing else in meo_ds; models embed this dataclass in
their own config. Every value is checked in `validate()`, which layers call at construction,
so a bad configuration fails before any work is done. The kind is looked up in registry.py:
an unknown kind, or a field that only other kinds read set away from its default, is an error
(the flat-dataclass design and its consequences are documented in registry.py). It describes
the model only: how the experts are spread over ranks is the run's `parallel` section
(meo_ds/parallel.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from . import registry
from .registry import MoEConfigError

DispatchMode = Literal["capacity", "dropless"]
Activation = Literal["swiglu", "gelu"]
MEOLevel = Literal["sequence", "token"]
MEOLoad = Literal["smooth", "count"]
MEOAuxReduce = Literal["sum", "mean"]


@dataclass
class MoEConfig:
    # Which family (a registered kind, registry.kinds()): "topk" (GShard/Switch/Mixtral), "xmoe"
    # (threshold router), "meo" (merged experts).
    kind: str = "topk"
    num_experts: int = 8
    # Width of one expert's hidden layer. None: the model's dense FFN width (for XMoE set it small,
    # e.g. d_ff // 8 with 8x the experts).
    expert_hidden: Optional[int] = None
    # "swiglu": W2 (silu(W1 x) * W3 x), no biases (Mixtral/Qwen3-MoE). "gelu": W2 gelu(W1 x + b1) + b2.
    activation: Activation = "swiglu"

    # --- top-k router ---
    top_k: int = 2
    renormalize: bool = True  # combine weights = top-k probabilities renormalised to sum 1
    # Shazeer: logits + N(0,1) * noise std, training only. None: the family's default (on for MEO,
    # the paper's gate; off for top-k and XMoE). See `noisy()`.
    noisy_gating: Optional[bool] = None
    jitter: float = 0.0  # multiplicative input jitter eps: x * U(1-eps, 1+eps), training only

    # --- XMoE threshold router ---
    threshold: float = 0.9  # take the fewest experts whose cumulative probability reaches it
    max_k: Optional[int] = None  # optional cap on experts per token

    # --- dispatch (top-k and XMoE) ---
    dispatch: DispatchMode = "dropless"
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float = 2.0  # evaluation
    min_capacity: int = 4

    # --- auxiliary losses (coefficients; 0 disables) ---
    aux_loss_coef: float = 0.01  # Switch load balancing (top-k, XMoE) or MEO's CV^2 loss
    z_loss_coef: float = 1e-3  # router z-loss (top-k, XMoE)

    # --- MEO ---
    meo_level: MEOLevel = "sequence"  # "token" adds the per-token bottleneck block
    token_bottleneck_ratio: int = 64  # token block width = that linear's input width // ratio
    # Causal (decoder) routing: the gate of segment s reads the mean of segments < s.
    segment_len: int = 64
    recompute_merged: bool = True  # rebuild W^ in backward instead of storing it
    # MEO gate (meo.py Choices). The paper's: noise std softplus(s W_noise) + meo_noise_floor, load
    # = the smooth Normal-CDF estimate (so W_noise learns), CV^2 loss summed over the linears.
    # The former gate: noisy_gating=False, meo_load="count", meo_aux_reduce="mean".
    meo_noise_floor: float = 1e-2
    meo_load: MEOLoad = "smooth"  # "count": number of selections per expert (no gradient)
    meo_aux_reduce: MEOAuxReduce = "sum"  # over the layer's merged linears; "mean" averages

    def noisy(self) -> bool:
        """Whether the gate adds noise in training: noisy_gating, or the family default when None."""
        return registry.get(self.kind).noisy_default if self.noisy_gating is None else bool(self.noisy_gating)

    def validate(self) -> "MoEConfig":
        """Raise MoEConfigError naming the field and the fix; return self when valid."""

        def fail(msg: str) -> None:
            raise MoEConfigError(f"MoEConfig: {msg}")

        registry.get(self.kind)  # an unknown kind: MoEConfigError naming the registered ones
        if self.num_experts < 1:
            fail(f"num_experts={self.num_experts} must be >= 1")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            fail(f"expert_hidden={self.expert_hidden} must be >= 1 (or None for the model's FFN width)")
        if self.activation not in ("swiglu", "gelu"):
            fail(f"activation={self.activation!r} is unknown; use 'swiglu' or 'gelu'")
        if not 1 <= self.top_k <= self.num_experts:
            fail(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if not (0.0 < self.threshold <= 1.0) or math.isnan(self.threshold):
            fail(f"threshold={self.threshold} must lie in (0, 1]; the XMoE paper uses 0.9")
        if self.max_k is not None and not 1 <= self.max_k <= self.num_experts:
            fail(f"max_k={self.max_k} must be between 1 and num_experts={self.num_experts} (or None)")
        if self.dispatch not in ("capacity", "dropless"):
            fail(f"dispatch={self.dispatch!r} is unknown; use 'capacity' or 'dropless'")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not value > 0:
                fail(f"{name}={value} must be > 0 (use dispatch='dropless' for no capacity limit)")
        if self.min_capacity < 0:
            fail(f"min_capacity={self.min_capacity} must be >= 0")
        if self.jitter < 0 or self.jitter >= 1:
            fail(f"jitter={self.jitter} must lie in [0, 1)")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            fail("aux_loss_coef and z_loss_coef must be >= 0")
        if self.meo_level not in ("sequence", "token"):
            fail(f"meo_level={self.meo_level!r} is unknown; use 'sequence' or 'token'")
        if self.token_bottleneck_ratio < 1:
            fail(f"token_bottleneck_ratio={self.token_bottleneck_ratio} must be >= 1")
        if self.noisy_gating not in (None, True, False):
            fail(f"noisy_gating={self.noisy_gating!r} must be true, false or null (the family's default)")
        if not self.meo_noise_floor >= 0:
            fail(f"meo_noise_floor={self.meo_noise_floor} must be >= 0 (the paper uses 0.01)")
        if self.meo_load not in ("smooth", "count"):
            fail(f"meo_load={self.meo_load!r} is unknown; use 'smooth' (paper) or 'count'")
        if self.meo_aux_reduce not in ("sum", "mean"):
            fail(f"meo_aux_reduce={self.meo_aux_reduce!r} is unknown; use 'sum' (paper) or 'mean'")
        if self.segment_len < 1:
            fail(f"segment_len={self.segment_len} must be >= 1")
        problems = registry.field_problems(self)
        if problems:
            raise MoEConfigError("; ".join(problems))
        return self
