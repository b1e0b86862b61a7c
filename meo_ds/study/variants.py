"""The study's variants: each one's `model.moe` section and expert-parallel size, derived from one
base model (the preset after the study's `--set model.*` overrides).

W is the width of one expert of the base (moe.expert_hidden, else the preset's d_ff), E its
number of experts, k its top_k. Only the MoE layers change; every other layer, the attention,
the embeddings and all training settings are the base's.

    dense-1x   one expert of width W, always chosen (top-1 of 1): a dense FFN of one expert's
               active width, with the expert's activation, in every MoE position
    dense-2x   the same with width k*W: the active compute of the base's top-k (2x for top-2)
    topk       the base's E experts, top-k
    xmoe       the same expert parameters split into G=4 times more, 4 times smaller experts
               (4E experts of width W/4), threshold routing (MoEConfig.threshold; the paper's 0.9)
    meo-seq    MEO, the base's experts, top-k selection, sequence-level merging
    meo-token  the same plus the token-level block (moe.meo_level: token)

Choices:
- The dense baselines are a one-expert MoE layer rather than `moe: null`: the gate weight of a
  single expert is exactly 1, so it computes a dense FFN of width W (k*W), but only in the MoE
  positions and with the expert's activation; `moe: null` would change every FFN of a preset
  that alternates dense and MoE layers, and a translation model's dense FFN uses another activation.
- Each variant's moe section keeps the base's settings that its kind reads (registry fields:
  aux coefficients, dispatch, noise...) and drops the others, so tuned defaults of the presets
  flow into every variant and no other kind's field is ever set (an error in MoEConfig).
- Expert parallelism: a kind whose experts are sharded (registry `expert_parallel`: top-k,
  XMoE) uses gcd(world size, experts) ranks; MEO (data-parallel experts) and the dense
  baselines use 1. Data parallelism, batches, data order, seed and schedule are the same for all.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

from meo_ds.moe import registry
from meo_ds.moe.config import MoEConfig

XMOE_SPLIT = 4  # G: XMoE experts per base expert


@dataclass(frozen=True)
class Variant:
    name: str
    moe: bool  # a mixture (routing statistics, expert-load heatmap) rather than a dense baseline
    build: Callable[[MoEConfig, dict, int], dict]  # (base moe, base moe mapping, W) -> moe section


def _keep(moe: dict, kind: str) -> dict:
    """The base's moe settings that `kind` reads."""
    reads = set(registry.COMMON_FIELDS) | set(registry.get(kind).fields)
    return {k: copy.deepcopy(v) for k, v in moe.items() if k in reads}


def _dense(times: Callable[[MoEConfig], int]) -> Callable[[MoEConfig, dict, int], dict]:
    return lambda cfg, moe, width: {**_keep(moe, "topk"), "kind": "topk", "num_experts": 1, "top_k": 1,
                                    "expert_hidden": times(cfg) * width}


def _xmoe(cfg: MoEConfig, moe: dict, width: int) -> dict:
    if width % XMOE_SPLIT:
        raise ValueError(f"xmoe splits each expert of width {width} into {XMOE_SPLIT}; the width must divide by "
                         f"{XMOE_SPLIT} (set model.moe.expert_hidden to a multiple of {XMOE_SPLIT})")
    return {**_keep(moe, "xmoe"), "kind": "xmoe", "num_experts": cfg.num_experts * XMOE_SPLIT,
            "expert_hidden": width // XMOE_SPLIT}


VARIANTS = {v.name: v for v in (
    Variant("dense-1x", False, _dense(lambda cfg: 1)),
    Variant("dense-2x", False, _dense(lambda cfg: cfg.top_k)),
    Variant("topk", True, lambda cfg, moe, width: {**_keep(moe, "topk"), "kind": "topk"}),
    Variant("xmoe", True, _xmoe),
    Variant("meo-seq", True, lambda cfg, moe, width: {**_keep(moe, "meo"), "kind": "meo", "meo_level": "sequence"}),
    Variant("meo-token", True, lambda cfg, moe, width: {**_keep(moe, "meo"), "kind": "meo", "meo_level": "token"}),
)}


def variant_model(name: str, base_model: dict, world: int) -> tuple[dict, int]:
    """(the variant's full model mapping, its parallel.ep_size) from the base model mapping."""
    moe = base_model.get("moe")
    if not moe:
        raise ValueError("the study's model preset has no MoE layers (model.moe is empty); choose a MoE preset "
                         "such as tiny or mt_tiny, or set model.moe")
    cfg = MoEConfig(**moe)
    width = cfg.expert_hidden or int(base_model.get("d_ff", 0))
    if width < 1:
        raise ValueError("the base model names neither model.moe.expert_hidden nor model.d_ff")
    section = VARIANTS[name].build(cfg, moe, width)
    MoEConfig(**section).validate()
    model = {**copy.deepcopy(base_model), "moe": section}
    ep = math.gcd(world, section["num_experts"]) if registry.get(section["kind"]).expert_parallel else 1
    return model, ep
