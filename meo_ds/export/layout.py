"""Where our weights go: meo_ds state-dict names -> remote-code (hf_remote) and native HF names.

One naming serves every model (`hf_key`): a block's parts take Llama's names (attn ->
self_attn, attn_norm -> input_layernorm, ffn_norm -> post_attention_layernorm, ffn/moe -> mlp;
cross_norm -> cross_layernorm), stacks live under `model.` (the LM's layers at model.layers for
Llama/Mixtral, at model.decoder.layers in our remote LM; the translation model's at
model.encoder / model.decoder), the embeddings are model.embed_tokens (target tokens, and the
source's when shared) and model.src_embed_tokens. Inside an MoE layer:
- top-k / XMoE layers keep their experts at `deepspeed_moe.experts.deepspeed_experts.{e}.`
  (the prefix DeepSpeed's per-expert checkpointing needs); the remote layer calls them `experts.{e}.`.
- noise weights of noisy gates are training-only (inference routes on clean logits): dropped.
Whether a MoE kind maps to native Mixtral is the kind's answer (meo_ds.moe.registry: `native`,
`native_problems`), never a comparison of kind names here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import torch

from meo_ds.export.errors import ExportError
from meo_ds.moe import registry

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
_TRAINING_ONLY = re.compile(r"(^|\.)noise_weight$")


def moe_key(key: str) -> Optional[str]:
    """Name inside one MoE layer -> the remote layer's name (None: not exported)."""
    if _TRAINING_ONLY.search(key):
        return None
    return key.replace(DS_EXPERTS, "experts.")


# --------------------------------------------------------------------------- names (LM and translation)
_MODEL_PARTS = {"embed": "model.embed_tokens", "src_embed": "model.src_embed_tokens", "lm_head": "lm_head"}
_BLOCK_PARTS = {
    "attn_norm": "input_layernorm", "attn": "self_attn", "cross_norm": "cross_layernorm", "cross_attn": "cross_attn",
    "ffn_norm": "post_attention_layernorm", "ffn": "mlp", "moe": "mlp",
}
# [encoder.|decoder.]layers.{i}.{part}.rest  or  [encoder.|decoder.]norm.rest
_STACKED = re.compile(r"^(?:(encoder|decoder)\.)?(?:layers\.(\d+)\.(\w+)|(norm))\.(.+)$")
TASKS = ("lm", "translation")


def hf_key(key: str, bare_stack: str = "") -> Optional[str]:
    """Our state-dict name -> HF name (MoE internals still in our naming; None: not exported).

    Our LM's layers carry no stack name; `bare_stack` places them ('' -> Llama's model.layers,
    'decoder' -> our remote LM's model.decoder.layers).
    """
    top, _, rest = key.partition(".")
    if top in _MODEL_PARTS:
        return f"{_MODEL_PARTS[top]}.{rest}"
    m = _STACKED.match(key)
    if m is None or (m[3] is not None and m[3] not in _BLOCK_PARTS):
        raise KeyError(f"unknown weight {key!r} in the model's checkpoint")
    stack, layer, part, norm, rest = m.groups()
    stack = stack or bare_stack
    prefix = f"model.{stack}." if stack else "model."
    if norm:
        return f"{prefix}norm.{rest}"
    if part == "moe":
        rest = moe_key(rest)
        if rest is None:
            return None
    return f"{prefix}layers.{layer}.{_BLOCK_PARTS[part]}.{rest}"


def remote_key(task: str, key: str) -> Optional[str]:
    """Our state-dict name -> the name in MeoForCausalLM / MeoForSeq2SeqLM (None: not exported)."""
    _check_task(task)
    return hf_key(key, "decoder" if task == "lm" else "")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ExportError(f"task {task!r}: the exporter knows {', '.join(TASKS)}")


# --------------------------------------------------------------------------- remote-code config
def lm_moe(model_cfg: Any) -> Any:
    return model_cfg.moe if any(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)) else None


def moe_layer_ids(model_cfg: Any) -> list[int]:
    return [i for i in range(model_cfg.n_layers) if model_cfg.is_moe_layer(i)]


def mt_moe_layer_ids(model_cfg: Any) -> dict[str, list[int]]:
    sizes = {"encoder": model_cfg.encoder_layers, "decoder": model_cfg.decoder_layers}
    return {stack: [i for i in range(n) if model_cfg.is_moe_layer(stack, i)] for stack, n in sizes.items()}


def remote_config(task: str, model_cfg: Any) -> dict:
    """MeoConfig arguments that express our model exactly (hf_remote/configuration_meo.py)."""
    _check_task(task)
    c = model_cfg
    common = dict(
        task=task, vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads(), norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
    )
    if task == "lm":  # meo_ds.models.lm.block_spec: Llama blocks
        moe = lm_moe(c)
        return dict(
            common, num_hidden_layers=c.n_layers, norm="rmsnorm", positions="rope", ffn_activation="swiglu",
            ffn_bias=False, attention_bias=False, qkv_bias=c.attention_bias,
            embed_scale=1.0, tie_word_embeddings=c.tie_embeddings,
            moe=dataclasses.asdict(moe) if moe is not None else None, moe_layers=moe_layer_ids(c),
        )
    layers = mt_moe_layer_ids(c)
    return dict(
        common, num_hidden_layers=c.encoder_layers, num_decoder_layers=c.decoder_layers,
        share_embeddings=c.share_embeddings, src_vocab_size=c.source_vocab_size, norm=c.norm,
        positions=c.positions, ffn_activation=c.activation, ffn_bias=c.bias, attention_bias=c.bias,
        embed_scale=math.sqrt(c.d_model) if c.scale_embeddings else 1.0, tie_word_embeddings=c.tie_output,
        moe=dataclasses.asdict(c.moe) if any(layers.values()) else None, moe_layers=layers,
    )


# --------------------------------------------------------------------------- native (LM only)
def native_problems(model_cfg: Any) -> list[str]:
    """Architecture features native Llama/Mixtral lack: q/k/v-only biases (Qwen2's attention)."""
    if getattr(model_cfg, "attention_bias", False):
        return ["its attention has q/k/v biases (attention_bias: Qwen2's layout; Llama/Mixtral have none)"]
    return []


def mixtral_moe_problems(model_cfg: Any, moe: Any) -> list[str]:
    problems = []
    spec = registry.get(moe.kind)
    if spec.native != "mixtral":
        problems.append(f"its MoE layers are {moe.kind} (Mixtral routes top-k)")
    if moe.activation != "swiglu":
        problems.append(f"its experts use {moe.activation} (Mixtral experts are SwiGLU without biases)")
    if spec.native == "mixtral":
        problems += spec.native_problems(moe)
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
_DENSE_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # our dense SwiGLU FFN -> Llama's


def llama_key(key: str) -> Optional[str]:
    """Our LM's state-dict name -> the Llama/Mistral/Qwen2 name (hf_key, dense FFNs' w1/w3/w2 as
    gate_proj/up_proj/down_proj; MoE internals still in our naming; None: not exported). Export
    writes it, meo-upcycle reads it."""
    new = hf_key(key)
    if new is not None and ".mlp.w" in new:
        prefix, name = new.rsplit(".mlp.", 1)
        w, rest = name.split(".", 1)
        new = f"{prefix}.mlp.{_DENSE_FFN[w]}.{rest}"
    return new


def native_state_dict(model_cfg: Any, target: str, state_dict: dict) -> dict:
    """Our weights under transformers' in-memory names (Mixtral experts fused per layer)."""
    out, experts = {}, {}
    for key, value in state_dict.items():
        new = llama_key(key)
        if new is None:
            continue
        m = _EXPERT.match(new)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        elif new.endswith(".mlp.router.weight"):
            out[new.replace(".mlp.router.weight", ".mlp.gate.weight")] = value
        else:
            out[new] = value
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "w1")], parts[(e, "w3")]]) for e in range(n)])
        out[f"{prefix}.experts.down_proj"] = torch.stack([parts[(e, "w2")] for e in range(n)])
    return out
