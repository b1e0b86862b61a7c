"""Routers and their auxiliary losses.

Primitives shared by every router (top-k, XMoE threshold, MEO gate) come first; the router
classes follow. Router math runs in fp32 whatever the model's dtype. The choice of experts and
their combine weights are pure functions in meo_ds/moe/functional.py (shared with the exported
model); this file adds what training needs: noise, jitter, losses and the RouterOutput.

`Router` is what a MoELayer asks of its router: `from_config`, `forward` (-> RouterOutput) and,
per kind, `capacity_k` (the k of the capacity C = ceil(k S / E cf)), `nominal_experts_per_token`
(the count used when nothing is measured) and `native_problems`. A new router is one Router
subclass and `layer.register_router(TheRouter)` (see registry.py).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import router_logits, threshold_choices, topk_choices
if TYPE_CHECKING:
    from .config import MoEConfig


def noisy_logits(
    logits: torch.Tensor, x: torch.Tensor, noise_weight: Optional[torch.Tensor], training: bool
) -> torch.Tensor:
    """Shazeer et al. (2017) noisy gating: logits + N(0, 1) * softplus(x W_noise), in training only."""
    if noise_weight is None or not training:
        return logits
    noise_std = F.softplus(x.float() @ noise_weight.float().t())
    return logits + torch.randn_like(logits) * noise_std


def jitter_input(x: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    """Multiplicative jitter x * U(1 - eps, 1 + eps) on the router input, in training only."""
    if eps <= 0 or not training:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) over the given (real) tokens' fp32 logits [T, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def switch_balance_loss(probs: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e.

    probs: [T, E] router probabilities of the real tokens; assignments: [T, E] 0/1 mask of the
    routed token-expert pairs (before capacity drops). f_e is the fraction of assignments that
    went to e, P_e the mean probability of e. Equals 1 under perfectly uniform routing.
    """
    num_experts = probs.shape[-1]
    counts = assignments.float().sum(dim=0)
    f = counts / counts.sum().clamp_min(1.0)
    p = probs.float().mean(dim=0)
    return num_experts * torch.sum(f * p)


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 (Shazeer 2017); 0 for a single value."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + eps)


# ----------------------------------------------------------------------------------------------
# Router classes (top-k and XMoE threshold). Parameter names avoid the substring "expert": the
# DeepSpeed engine treats every state_dict key of an MoE layer containing it as an expert weight.


@dataclass
class RouterOutput:
    """Per-token routing decision of T real tokens, padded to K choice slots per token.

    Slot j of a token is its (j+1)-th choice in descending probability; `valid` marks the slots
    actually taken (all K for top-k, a prefix for the threshold router).
    """

    expert_ids: torch.Tensor  # [T, K] int64 global expert ids (arbitrary where not valid)
    weights: torch.Tensor  # [T, K] fp32 combine weights, 0 where not valid
    scores: torch.Tensor  # [T, K] fp32 raw router probabilities of the chosen experts (capacity priority)
    valid: torch.Tensor  # [T, K] bool
    probs: torch.Tensor  # [T, E] fp32 router probabilities
    balance_loss: torch.Tensor  # scalar, unweighted Switch loss
    z_loss: torch.Tensor  # scalar, unweighted router z-loss


class Router(nn.Module, abc.ABC):
    """A MoELayer's router: forward(x [T, d] real tokens) -> RouterOutput.

    Class attributes, read by layer.register_router: `kind` (the MoEConfig.kind it serves),
    `config_fields` (the MoEConfig fields it reads beyond registry.COMMON_FIELDS; the MoELayer adds
    its dispatch fields), `card_fields` (of those, the model card's), `native` (the transformers
    architecture layers with this router equal, e.g. "mixtral"). Parameter names must avoid the
    substring "expert" (see below).
    """

    kind: ClassVar[str]
    config_fields: ClassVar[tuple[str, ...]] = ()
    card_fields: ClassVar[tuple[str, ...]] = ()
    native: ClassVar[Optional[str]] = None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: "MoEConfig", d_model: int) -> "Router":
        """The router for cfg on d_model-wide tokens."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x [T, d] (real tokens only) -> RouterOutput."""

    @classmethod
    def capacity_k(cls, cfg: "MoEConfig") -> int:
        """k of the capacity C = ceil(k S / E cf): the slots each token may take, 1 by default."""
        return 1

    @classmethod
    def nominal_experts_per_token(cls, cfg: "MoEConfig") -> float:
        """Experts per token counted when none were measured (FLOPs, active parameters)."""
        return 1.0

    @classmethod
    def native_problems(cls, cfg: "MoEConfig") -> list[str]:
        """Why a layer with this router and cfg is not its `native` architecture ([]: it is)."""
        return []


class _RouterBase(Router):
    """Shared part: fp32 logits from a bias-free linear d -> E, optional noise and jitter."""

    def __init__(self, d_model: int, num_experts: int, noisy_gating: bool = False, jitter: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        # Zero-initialised: the noise starts at softplus(0) and is learned.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy_gating else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] -> clean fp32 logits [T, E] and the (possibly noisy) logits used for selection."""
        x = jitter_input(x.float(), self.jitter, self.training)
        clean = router_logits(x, self.weight)
        return clean, noisy_logits(clean, x, self.noise_weight, self.training)

    def _losses(self, clean: torch.Tensor, probs: torch.Tensor, assigned: torch.Tensor):
        if probs.shape[0] == 0:  # no real token on this rank: zero losses that still reach the weights
            zero = clean.sum() * 0.0
            return zero, zero
        return switch_balance_loss(probs, assigned), z_loss(clean)


class TopKRouter(_RouterBase):
    """Top-k router (GShard/Switch/Mixtral): the k most probable experts of softmax(x W_r).

    Combine weights are the k probabilities, renormalised to sum 1 when `renormalize`.
    The Switch balance loss counts every routed assignment (all k per token).
    """

    kind = "topk"
    config_fields = ("top_k", "renormalize")
    card_fields = ("top_k", "renormalize")
    native = "mixtral"

    @classmethod
    def from_config(cls, cfg: "MoEConfig", d_model: int) -> "TopKRouter":
        return cls(d_model, cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.noisy(), cfg.jitter)

    @classmethod
    def capacity_k(cls, cfg: "MoEConfig") -> int:
        return cfg.top_k

    @classmethod
    def nominal_experts_per_token(cls, cfg: "MoEConfig") -> float:
        return float(cfg.top_k)

    @classmethod
    def native_problems(cls, cfg: "MoEConfig") -> list[str]:
        return [] if cfg.renormalize else ["its top-k weights are not renormalised (Mixtral renormalises)"]

    def __init__(
        self, d_model: int, num_experts: int, k: int, renormalize: bool = True,
        noisy_gating: bool = False, jitter: float = 0.0,
    ):
        if not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k={k} must be between 1 and num_experts={num_experts}")
        super().__init__(d_model, num_experts, noisy_gating, jitter)
        self.k = k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> RouterOutput:
        clean, logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        ids, scores, weights = topk_choices(probs, self.k, self.renormalize)
        assigned = torch.zeros_like(probs).scatter_(1, ids, 1.0)
        bal, z = self._losses(clean, probs, assigned)
        valid = torch.ones_like(ids, dtype=torch.bool)
        return RouterOutput(ids, weights, scores.detach(), valid, probs, bal, z)


class ThresholdRouter(_RouterBase):
    """XMoE threshold router: in descending probability, expert j is taken iff the sum of the
    probabilities before it is < threshold; at least one expert, at most `max_k`.

    Combine weights are the raw (not renormalised) probabilities. The output has max_k slots per
    token (`valid` marks the taken ones), a shape known without looking at the data. The Switch balance loss counts
    each token's top-1 assignment only. Capacity C uses k = 1 (XMoE); with nothing measured a
    token counts as one expert (the router's minimum).
    """

    kind = "xmoe"
    config_fields = ("threshold", "max_k")
    card_fields = ("threshold", "max_k")

    @classmethod
    def from_config(cls, cfg: "MoEConfig", d_model: int) -> "ThresholdRouter":
        return cls(d_model, cfg.num_experts, cfg.threshold, cfg.max_k, cfg.noisy(), cfg.jitter)

    def __init__(
        self, d_model: int, num_experts: int, threshold: float, max_k: Optional[int] = None,
        noisy_gating: bool = False, jitter: float = 0.0,
    ):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ThresholdRouter: threshold={threshold} must lie in (0, 1] (XMoE uses 0.9)")
        if max_k is not None and not 1 <= max_k <= num_experts:
            raise ValueError(f"ThresholdRouter: max_k={max_k} must be between 1 and num_experts={num_experts}")
        super().__init__(d_model, num_experts, noisy_gating, jitter)
        self.threshold = threshold
        self.max_k = max_k or num_experts

    def forward(self, x: torch.Tensor) -> RouterOutput:
        clean, logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        # All max_k slots are kept, used or not: trimming the slots no token uses would need the
        # largest per-token count on the host (a sync in every layer); the unused slots cost only
        # integer sorting in the dispatcher, never expert work.
        ids, valid, weights = threshold_choices(probs, self.threshold, self.max_k)
        top1 = torch.zeros_like(probs).scatter_(1, ids[:, :1], 1.0)
        bal, z = self._losses(clean, probs, top1)
        return RouterOutput(ids, weights, weights.detach(), valid, probs, bal, z)
