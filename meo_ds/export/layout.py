"""Where our weights go: meo_ds state-dict names -> remote-code (hf_remote) and native HF names.

The remote-code modules mirror meo_ds's own module tree, so most names pass through unchanged;
the differences are listed here once:
- top-k / XMoE layers keep their experts at `deepspeed_moe.experts.deepspeed_experts.{e}.`
  (the prefix DeepSpeed's per-expert checkpointing needs); the remote layer calls them `experts.{e}.`.
- noise weights of noisy gates are training-only (inference routes on clean logits): dropped.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch

from meo_ds.export.errors import ExportError

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
_TRAINING_ONLY = re.compile(r"(^|\.)noise_weight$")


def moe_key(key: str) -> Optional[str]:
    """Name inside one MoE layer -> the remote layer's name (None: not exported)."""
    if _TRAINING_ONLY.search(key):
        return None
    return key.replace(DS_EXPERTS, "experts.")


# --------------------------------------------------------------------------- our LM (meo_ds.models.lm)
_LM_RULES = [
    (re.compile(r"^embed\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
    (re.compile(r"^layers\.(\d+)\.attn_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.attn\.(\w+_proj)\.weight$"), r"model.layers.\1.self_attn.\2.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn\.(.+)$"), r"model.layers.\1.mlp.\2"),
    (re.compile(r"^layers\.(\d+)\.moe\.(.+)$"), r"model.layers.\1.mlp.\2"),
]


def lm_key(key: str) -> Optional[str]:
    """Our LM's state-dict name -> Llama-style name (MoE internals still in our naming)."""
    for pattern, repl in _LM_RULES:
        if pattern.match(key):
            new = pattern.sub(repl, key)
            return moe_key(new) if ".mlp." in new else new
    raise KeyError(f"unknown weight {key!r} in the language model's checkpoint")


def lm_moe(model_cfg: Any) -> Any:
    return model_cfg.moe if any(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)) else None


def moe_layer_ids(model_cfg: Any) -> list[int]:
    return [i for i in range(model_cfg.n_layers) if model_cfg.is_moe_layer(i)]


def remote_config(task: str, model_cfg: Any) -> dict:
    if task != "lm":
        raise ExportError(f"task {task!r}: the models package builds only 'lm' models")
    c = model_cfg
    moe = dataclasses.asdict(c.moe) if lm_moe(c) is not None else None
    return dict(
        task="lm", vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads(),
        norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings, moe=moe, moe_layers=moe_layer_ids(c),
    )


def remote_key(task: str, key: str) -> Optional[str]:
    new = lm_key(key)
    return None if new is None else new.replace("model.layers.", "model.decoder.layers.").replace(
        "model.norm.", "model.decoder.norm.")


def native_problems(model_cfg: Any) -> list[str]:
    """Architecture features native Llama/Mixtral lack (our LM has none today: same blocks)."""
    return []


def mixtral_moe_problems(model_cfg: Any, moe: Any) -> list[str]:
    problems = []
    if moe.kind != "topk":
        problems.append(f"its MoE layers are {moe.kind} (Mixtral routes top-k)")
    if moe.activation != "swiglu":
        problems.append(f"its experts use {moe.activation} (Mixtral experts are SwiGLU without biases)")
    if not moe.renormalize:
        problems.append("its top-k weights are not renormalised (Mixtral renormalises)")
    dense = [i for i in range(model_cfg.n_layers) if not model_cfg.is_moe_layer(i)]
    if dense:
        problems.append(f"layers {dense} are dense (every Mixtral layer is MoE)")
    return problems


def native_config(model_cfg: Any, target: str) -> dict:
    c = model_cfg
    cfg = dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads(), head_dim=c.d_model // c.n_heads,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, hidden_act="silu",
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    if target == "mixtral":
        cfg.update(intermediate_size=c.moe.expert_hidden or c.d_ff, num_local_experts=c.moe.num_experts,
                   num_experts_per_tok=c.moe.top_k, router_aux_loss_coef=c.moe.aux_loss_coef)
    else:
        cfg.update(intermediate_size=c.d_ff)
    if target == "mistral":
        cfg.update(sliding_window=None)
    return cfg


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(w[123])\.weight$")
_DENSE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def native_state_dict(model_cfg: Any, target: str, state_dict: dict) -> dict:
    """Our weights under transformers' in-memory names (Mixtral experts fused per layer)."""
    out, experts = {}, {}
    for key, value in state_dict.items():
        new = lm_key(key)
        if new is None:
            continue
        m = _EXPERT.match(new)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        elif new.endswith(".mlp.router.weight"):
            out[new.replace(".mlp.router.weight", ".mlp.gate.weight")] = value
        elif ".mlp.w" in new:
            prefix, name = new.rsplit(".mlp.", 1)
            w = name.split(".")[0]
            out[f"{prefix}.mlp.{_DENSE[w]}.weight"] = value
        else:
            out[new] = value
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "w1")], parts[(e, "w3")]]) for e in range(n)])
        out[f"{prefix}.experts.down_proj"] = torch.stack([parts[(e, "w2")] for e in range(n)])
    return out
