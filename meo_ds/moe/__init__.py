"""The MoE layer library: top-k, XMoE threshold and MEO layers behind one interface.

    layer = build_moe_layer(cfg, d_model, d_ff)
    out = layer(x, padding_mask)   # MoEOutput(hidden, aux_loss, stats)

Parts (swappable, one file each): registry.py (the kinds: what each MoEConfig.kind builds, the
fields it reads, what the exporter and the model card need), routing.py (the Router base,
TopKRouter, ThresholdRouter -> RouterOutput), dispatch.py (TokenDispatcher: capacity / dropless,
all-to-all over the expert-parallel group), experts.py (LocalExperts of SwiGLU or GELU experts),
layer.py (MoELayer = the three, a `deepspeed.moe.layer.MoE` for the engine; register_router),
meo.py (MEOLayer), functional.py (the routing and merge math in plain torch, shipped with exports).
Every layer answers flops_per_token (model and executed), inactive_params and describe. A new
router: one Router subclass, `register_router(TheRouter)`, and a test.
Layers are built with all their experts; expert parallelism is applied to a built model by
`meo_ds.parallel.parallelize(model, ep_size)` (after deepspeed.init_distributed(), before
deepspeed.initialize()), which keeps ep rank r's experts r*El .. r*El+El-1 (local key
`deepspeed_experts.{global - r*El}`) and gives the layers their group.
Do not name a model attribute holding an MoE layer with the substring "expert": DeepSpeed's
checkpointing treats every key of the layer containing it as an expert weight.
"""
from __future__ import annotations

import torch.nn as nn

from . import registry
from .config import MoEConfig, MoEConfigError
from .dispatch import AllToAll, TokenDispatcher, capacity_slots, expert_capacity
from .experts import GeluExpert, LocalExperts, SwiGLUExpert
from .layer import MoELayer, register_router
from .meo import MEOLayer  # registers kind "meo"
from .routing import Router, RouterOutput, ThresholdRouter, TopKRouter
from .types import MoEOutput, RoutingStats


def build_moe_layer(cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False, cross: bool = False) -> nn.Module:
    """The layer of cfg.kind (registry); expert width cfg.expert_hidden or d_ff. cross: a decoder
    layer with a source sentence (MEO's gates then also read it)."""
    cfg.validate()
    return registry.get(cfg.kind).build(cfg, d_model, d_ff, causal=causal, cross=cross)


__all__ = [
    "AllToAll", "GeluExpert", "LocalExperts", "MEOLayer", "MoEConfig", "MoEConfigError", "MoELayer", "MoEOutput",
    "Router", "RouterOutput", "RoutingStats", "SwiGLUExpert", "ThresholdRouter", "TokenDispatcher", "TopKRouter",
    "build_moe_layer", "capacity_slots", "expert_capacity", "register_router", "registry",
]
