"""Where our weights go: meo_ds state-dict names -> remote-code (hf_remote) and native HF names.

The remote-code modules mirror meo_ds's own module tree, so most names pass through unchanged;
the differences are listed here once:
- top-k / XMoE layers keep their experts at `deepspeed_moe.experts.deepspeed_experts.{e}.`
  (the prefix DeepSpeed's per-expert checkpointing needs); the remote layer calls them `experts.{e}.`.
- noise weights of noisy gates are training-only (inference routes on clean logits): dropped.
"""
from __future__ import annotations

import re
from typing import Optional

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
_TRAINING_ONLY = re.compile(r"(^|\.)noise_weight$")


def moe_key(key: str) -> Optional[str]:
    """Name inside one MoE layer -> the remote layer's name (None: not exported)."""
    if _TRAINING_ONLY.search(key):
        return None
    return key.replace(DS_EXPERTS, "experts.")
