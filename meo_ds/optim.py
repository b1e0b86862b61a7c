"""Optimizer pieces of the trainer: AdamW parameter groups, LR schedules, skippable steps.

Weight decay never applies to norms, biases (1-D tensors) or router/gate weights. Expert
parameters are split into their own groups by DeepSpeed's MoE helper, so the engine reduces
their gradients over the expert-data-parallel group. The learning rate is a pure function of
the step (no scheduler state), which keeps resume exact.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

# Substrings of parameter names that belong to routers/gates (no weight decay).
NO_DECAY_NAME_PARTS = ("router", "gate_weight", "noise_weight", "gate.", "gating", "default_summary")


def no_decay(name: str, param: nn.Parameter) -> bool:
    if param.ndim < 2:
        return True  # norms, biases, scalar gains
    lowered = name.lower()
    return any(part in lowered for part in NO_DECAY_NAME_PARTS) or "norm" in lowered


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no-decay] groups, then expert params split out for DeepSpeed's MoE handling."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": plain, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be skipped (non-finite loss): no update, no moment change."""

    def __init__(self, params: Iterable, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.skip_next_step = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


def lr_at(step: int, *, schedule: str, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (1-based).

    cosine: linear warm-up to lr, then cosine to min_ratio * lr at `total`.
    inverse_sqrt: linear warm-up to lr, then lr * sqrt(warmup / step) (Vaswani et al.).
    constant: linear warm-up, then lr.
    """
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    if schedule == "inverse_sqrt":
        return lr * math.sqrt(max(warmup, 1) / step)
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, inverse_sqrt or constant")


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
