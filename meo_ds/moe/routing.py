"""Routers and their auxiliary losses.

Primitives shared by every router (top-k, XMoE threshold, MEO gate) come first; the router
classes follow. Router math runs in fp32 whatever the model's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
