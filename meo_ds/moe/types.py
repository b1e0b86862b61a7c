"""What every MoE layer returns: the output, its differentiable auxiliary loss, its statistics.

Aux-loss convention (all families): each loss term is a mean over the real (non-padding)
tokens of this rank's micro-batch, multiplied by its coefficient from MoEConfig. The model sums
the layers' `aux_loss`; the trainer adds that sum to the task loss once per micro-batch, and the
DeepSpeed engine divides both by the gradient-accumulation steps, so coefficients mean the same
thing at any accumulation or padding.

Statistics stay on the device: every tensor field of RoutingStats lives where the layer ran
(0-d tensors for scalars) and is computed without a host synchronisation, so a GPU never
stalls for them in the forward. Consumers (metrics.RoutingAccumulator, the benchmarks) sum
them on the device and read them back once per log interval. Only values the host already
knows stay Python ints: a2a_bytes (from the all-to-all's split sizes) and extra["capacity"].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch


@dataclass
class RoutingStats:
    """Detached routing statistics of one forward of one MoE layer (this rank's tokens)."""

    expert_load: torch.Tensor  # [num_experts] token-expert assignments routed to each expert (before drops)
    num_tokens: torch.Tensor  # 0-d: real (non-padding) tokens routed
    dropped_fraction: torch.Tensor  # 0-d: assignments dropped by capacity / all assignments (0 in dropless mode)
    experts_per_token_mean: torch.Tensor  # 0-d: mean experts per token after drops (k for top-k without drops)
    experts_per_token_hist: torch.Tensor  # [num_experts + 1] tokens that got j experts, j = 0..E
    balance_loss: torch.Tensor  # 0-d: unweighted load-balancing loss (Switch, or MEO's CV^2)
    z_loss: torch.Tensor  # 0-d: unweighted router z-loss (0 where the family has none)
    a2a_bytes: int = 0  # bytes this rank sent through all-to-all in this forward (0 when ep_size=1)
    extra: dict = field(default_factory=dict)


class MoEOutput(NamedTuple):
    hidden: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor  # scalar, differentiable: sum of coefficient * loss terms
    stats: Optional[RoutingStats]
