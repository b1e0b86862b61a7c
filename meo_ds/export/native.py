"""Export language models to native transformers architectures (no remote code).

- top-k MoE LM (SwiGLU experts without biases, every layer MoE, renormalised top-k) -> Mixtral
- dense LM (SwiGLU FFN, no biases) -> Llama, or Mistral (the same network; `--target mistral`)

The model is built on the meta device, the renamed weights are assigned, and `save_pretrained`
writes config.json + (sharded) safetensors in the standard Mixtral/Llama file format. What the
model must satisfy is listed by `incompatibilities`; anything else exports with --target meo.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from meo_ds.export import layout
from meo_ds.export.errors import ExportError
from meo_ds.export.weights import dtype_of, load_exact

NATIVE = ("mixtral", "llama", "mistral")


def _classes(target: str) -> tuple[type, type]:
    if target == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralConfig, MixtralForCausalLM
    if target == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig, LlamaForCausalLM
    if target == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralConfig, MistralForCausalLM
    raise ExportError(f"no native architecture {target!r}; use one of {', '.join(NATIVE)}")


def incompatibilities(model_cfg: Any, target: str) -> list[str]:
    """Why this LM cannot be expressed exactly as `target` (empty: it can)."""
    problems = layout.native_problems(model_cfg)
    moe = layout.lm_moe(model_cfg)
    if target == "mixtral":
        if moe is None:
            problems.append("it is a dense model (Mixtral needs MoE layers; use llama or mistral)")
        else:
            problems += layout.mixtral_moe_problems(model_cfg, moe)
    elif moe is not None:
        problems.append(f"it has {moe.kind} MoE layers ({target} is dense; top-k MoE maps to mixtral)")
    return problems


def native_target(model_cfg: Any) -> Optional[str]:
    """The native architecture `--target auto` picks, or None when only remote code fits."""
    target = "llama" if layout.lm_moe(model_cfg) is None else "mixtral"
    return None if incompatibilities(model_cfg, target) else target


def build_hf_model(target: str, model_cfg: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """The transformers model for `target` holding the checkpoint's weights (checked exact)."""
    problems = incompatibilities(model_cfg, target)
    if problems:
        raise ExportError(f"this model cannot be exported as {target}: " + "; ".join(problems))
    config_cls, model_cls = _classes(target)
    config = config_cls(**layout.native_config(model_cfg, target))
    config.dtype = dtype_of(state_dict)
    with torch.device("meta"):
        model = model_cls(config)
    load_exact(model, layout.native_state_dict(model_cfg, target, state_dict), target)
    _rebuild_buffers(model, config)
    return model.eval()


def _rebuild_buffers(model: torch.nn.Module, config: Any) -> None:
    """Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on CPU."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise ExportError(f"internal: buffers left uninitialised after export: {left[:4]}")
