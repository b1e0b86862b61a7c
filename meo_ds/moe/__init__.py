"""The MoE layer library: top-k, XMoE threshold and MEO layers behind one interface.

    layer = build_moe_layer(cfg, d_model, d_ff)
    out = layer(x, padding_mask)   # MoEOutput(hidden, aux_loss, stats)

Parts (swappable, one file each): routing.py (TopKRouter, ThresholdRouter -> RouterOutput),
dispatch.py (TokenDispatcher: capacity / dropless, all-to-all over the expert-parallel group),
experts.py (LocalExperts of SwiGLU or GELU experts), layer.py (MoELayer = the three, a
`deepspeed.moe.layer.MoE` for the engine). Layers are built with all their experts; expert
parallelism is applied to a built model by `meo_ds.parallel.parallelize(model, ep_size)` (after
deepspeed.init_distributed(), before deepspeed.initialize()), which keeps ep rank r's experts
r*El .. r*El+El-1 (local key `deepspeed_experts.{global - r*El}`) and gives the layers their group.
Do not name a model attribute holding an MoE layer with the substring "expert": DeepSpeed's
checkpointing treats every key of the layer containing it as an expert weight.
"""
from __future__ import annotations

import torch.nn as nn

from .config import MoEConfig, MoEConfigError
from .dispatch import AllToAll, TokenDispatcher, capacity_slots, expert_capacity
from .experts import GeluExpert, LocalExperts, SwiGLUExpert
from .layer import MoELayer
from .routing import RouterOutput, ThresholdRouter, TopKRouter
from .types import MoEOutput, RoutingStats


def build_moe_layer(cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False) -> nn.Module:
    """The MoE layer for cfg.kind ('topk', 'xmoe' or 'meo'); expert width cfg.expert_hidden or d_ff."""
    cfg.validate()
    if cfg.kind == "meo":
        from .meo import MEOLayer  # imported lazily: MEO is an independent room

        return MEOLayer(cfg, d_model, d_ff, causal=causal)
    return MoELayer(cfg, d_model, d_ff, causal=causal)


__all__ = [
    "AllToAll", "GeluExpert", "LocalExperts", "MoEConfig", "MoEConfigError", "MoELayer", "MoEOutput",
    "RouterOutput", "RoutingStats", "SwiGLUExpert", "ThresholdRouter", "TokenDispatcher", "TopKRouter",
    "build_moe_layer", "capacity_slots", "expert_capacity",
]
