"""meo_ds models for transformers' remote code (no meo_ds import: this runs where meo_ds is absent).

The inference forward of meo_ds's decoder LM and translation model with the three MoE families
(top-k, XMoE threshold routing, MEO merged experts). The math is not written here: it comes from
models_functional.py and moe_functional.py, which the export copies byte for byte from meo_ds's
own meo_ds/models/functional.py and meo_ds/moe/functional.py (so one change reaches both; imported
from meo_ds, these names load those very files, see hf_remote/__init__.py). This file holds the
modules (with the export's parameter names) and the transformers classes. Inference only: dropless
routing (no capacity), no noise, no jitter; the tests compare logits and greedy tokens with
meo_ds's own model. Generation re-runs the whole prefix each step (no KV cache), which keeps
MEO's causal segment gates exactly as in training.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, Seq2SeqLMOutput

from .configuration_meo import MeoConfig
from .models_functional import apply_rope, attend, rms_norm, sinusoidal_positions
from .moe_functional import (
    GroupLayout, dense_combine, gate_logits, gate_summary, merged_forward, router_logits, source_summary,
    threshold_choices, topk_choices, topk_softmax_gates,
)


# ----------------------------------------------------------------------------- basic blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(config, dim):
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config, causal, cross=False):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.causal, self.cross = causal, cross
        self.use_rope = config.positions == "rope" and not cross
        self.theta = config.rope_theta
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=bias)

    def _split(self, x, heads):
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def forward(self, x, key_mask, memory=None):
        """x [B, T, d]; key_mask [B, S] bool (True = real key); memory [B, S, d] for cross-attention."""
        src = memory if self.cross else x
        q = self._split(self.q_proj(x), self.heads)
        k = self._split(self.k_proj(src), self.kv_heads)
        v = self._split(self.v_proj(src), self.kv_heads)
        if self.use_rope:
            pos = torch.arange(x.shape[1], device=x.device)[None]
            q, k = apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta)
        mask = key_mask[:, None, None, :]
        if self.causal:
            t = x.shape[1]
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FFN(nn.Module):
    """swiglu: w2(silu(w1 x) * w3 x); gelu: w2(gelu(w1 x))."""

    def __init__(self, d, hidden, activation, bias):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d, bias=bias)
        self.w3 = nn.Linear(d, hidden, bias=bias) if activation == "swiglu" else None

    def forward(self, x):
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class Router(nn.Module):
    def __init__(self, d, num_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d))

    def forward(self, x):
        """fp32 router probabilities [N, E]."""
        return torch.softmax(router_logits(x, self.weight), dim=-1)


# ----------------------------------------------------------------------------- MoE layers
class RoutedMoE(nn.Module):
    """Top-k (Mixtral) or XMoE threshold routing over whole-FFN experts, dropless."""

    def __init__(self, config, moe):
        super().__init__()
        d = config.hidden_size
        self.moe = moe
        hidden = moe.get("expert_hidden") or config.intermediate_size
        bias = moe.get("activation", "swiglu") == "gelu"
        self.router = Router(d, moe["num_experts"])
        self.experts = nn.ModuleList(FFN(d, hidden, moe.get("activation", "swiglu"), bias) for _ in range(moe["num_experts"]))

    def combine_weights(self, probs):
        """[N, E] fp32 probabilities -> dense [N, E] combine weights."""
        moe = self.moe
        if moe["kind"] == "topk":
            ids, _, weights = topk_choices(probs, moe["top_k"], moe.get("renormalize", True))
        else:
            ids, _, weights = threshold_choices(probs, moe["threshold"], moe.get("max_k"))
        return dense_combine(ids, weights, probs.shape[-1])

    def forward(self, x, mask):
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat)
        weights = self.combine_weights(probs)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = weights[:, e].nonzero().flatten()
            if rows.numel():
                y = expert(flat[rows]) * weights[rows, e, None].to(flat.dtype)
                out.index_add_(0, rows, y)
        out = out.view_as(x)
        return torch.where(mask[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


class TokenBlock(nn.Module):
    """Token-level MEO: u + up(relu(down(u))) per token, in front of each merged linear."""

    def __init__(self, d_in, width):
        super().__init__()
        self.down = nn.Linear(d_in, width)
        self.up = nn.Linear(width, d_in)

    def forward(self, u):
        return u + self.up(F.relu(self.down(u)))


class MEOLinear(nn.Module):
    def __init__(self, d_in, d_out, num_experts, bias, causal, source_dim, token_ratio):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(num_experts, d_out)) if bias else None
        self.gate_weight = nn.Parameter(torch.zeros(num_experts, d_in))
        self.default_summary = nn.Parameter(torch.zeros(d_in)) if causal else None
        self.source_gate = nn.Parameter(torch.zeros(num_experts, source_dim)) if source_dim else None
        self.token_block = TokenBlock(d_in, max(1, d_in // token_ratio)) if token_ratio else None

    def gates(self, summary, top_k, source):
        return topk_softmax_gates(gate_logits(summary, self.gate_weight, source, self.source_gate), top_k)[0]

    def forward(self, u, g):
        return merged_forward(u, g, self.weight, self.bias)


class MEO(nn.Module):
    """Merged experts: one gate per linear, per sequence (encoder) or per causal segment (decoder).
    A causal segment's gate reads the mean of the earlier segments (moe_functional.gate_summary);
    in a translation decoder every gate also reads the masked mean of the encoder output."""

    def __init__(self, config, moe, causal, cross=False):
        super().__init__()
        d = config.hidden_size
        self.moe, self.causal = moe, causal
        hidden = moe.get("expert_hidden") or config.intermediate_size
        gelu = moe.get("activation", "swiglu") == "gelu"
        n = moe["num_experts"]
        shapes = {"fc1": (d, hidden), "fc2": (hidden, d)} if gelu else {"w1": (d, hidden), "w3": (d, hidden), "w2": (hidden, d)}
        src = d if cross else 0
        ratio = moe.get("token_bottleneck_ratio", 64) if moe.get("meo_level", "sequence") == "token" else 0
        self.linears = nn.ModuleDict({k: MEOLinear(i, o, n, gelu, causal, src, ratio) for k, (i, o) in shapes.items()})

    def forward(self, x, mask, memory=None, memory_mask=None):
        groups = GroupLayout(mask, self.causal, self.moe.get("segment_len", 64))
        top_k = self.moe["top_k"]
        source = None
        if memory is not None:
            source = source_summary(memory, memory_mask).repeat_interleave(groups.num_segments, dim=0)

        def run(name, inp):
            lin = self.linears[name]
            if lin.token_block is not None:
                inp = lin.token_block(inp)
            return lin(inp, lin.gates(gate_summary(inp, groups, lin.default_summary), top_k, source))

        u = groups.to_groups(x)
        if "fc1" in self.linears:
            y = run("fc2", F.gelu(run("fc1", u)))
        else:
            y = run("w2", F.silu(run("w1", u)) * run("w3", u))
        return groups.from_groups(groups.zero_padding(y)).to(x.dtype)


def make_ffn(config, layer_is_moe, causal, cross):
    if layer_is_moe and config.moe:
        if config.moe["kind"] == "meo":
            return MEO(config, config.moe, causal, cross)
        return RoutedMoE(config, config.moe)
    return FFN(config.hidden_size, config.intermediate_size, config.ffn_activation, config.ffn_bias)


# ----------------------------------------------------------------------------- transformer layers
class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, FFN or MoE."""

    def __init__(self, config, is_moe, causal, cross=False):
        super().__init__()
        self.self_attn = Attention(config, causal)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.cross_attn = Attention(config, False, cross=True) if cross else None
        self.cross_layernorm = make_norm(config, config.hidden_size) if cross else None
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.is_moe = is_moe and bool(config.moe)
        self.mlp = make_ffn(config, is_moe, causal, cross)

    def forward(self, x, mask, memory=None, memory_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_layernorm(x), memory_mask, memory)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MEO) and self.cross_attn is not None:
            return x + self.mlp(h, mask, memory, memory_mask)
        return x + (self.mlp(h, mask) if self.is_moe else self.mlp(h))


class Stack(nn.Module):
    def __init__(self, config, num_layers, moe_layers, causal, cross):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config, i in moe_layers, causal, cross) for i in range(num_layers))
        self.norm = make_norm(config, config.hidden_size)

    def forward(self, x, mask, memory=None, memory_mask=None):
        if self.config.positions == "sinusoidal":
            x = x + sinusoidal_positions(torch.arange(x.shape[1], device=x.device), x.shape[-1]).to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask, memory, memory_mask)
        return self.norm(x)


class MeoPreTrainedModel(PreTrainedModel):
    """Both tasks: `self.model` holds embed_tokens (the target embedding), `self.lm_head` is tied to it."""

    config_class = MeoConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False


def _mask(ids, attention_mask):
    if attention_mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return attention_mask.bool()


# ----------------------------------------------------------------------------- language model
class MeoModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Stack(config, config.num_hidden_layers, set(config.moe_layers), causal=True, cross=False)
        self.embed_scale = config.embed_scale

    def forward(self, input_ids, mask):
        return self.decoder(self.embed_tokens(input_ids) * self.embed_scale, mask)


class MeoForCausalLM(MeoPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids, _mask(input_ids, attention_mask))
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------- translation model
class MeoSeq2SeqModel(nn.Module):
    """Embeddings (target tokens, and the source's unless config.share_embeddings is false), a
    bidirectional encoder and a causal decoder with cross-attention."""

    def __init__(self, config):
        super().__init__()
        layers = config.moe_layers or {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.src_embed_tokens = None
        if not config.share_embeddings:
            self.src_embed_tokens = nn.Embedding(config.src_vocab_size, config.hidden_size)
        self.encoder = Stack(config, config.num_hidden_layers, set(layers.get("encoder", [])), causal=False, cross=False)
        self.decoder = Stack(config, config.num_decoder_layers, set(layers.get("decoder", [])), causal=True, cross=True)
        self.embed_scale = config.embed_scale

    def encode(self, input_ids, mask):
        table = self.embed_tokens if self.src_embed_tokens is None else self.src_embed_tokens
        return self.encoder(table(input_ids) * self.embed_scale, mask)

    def decode(self, decoder_input_ids, mask, memory, memory_mask):
        return self.decoder(self.embed_tokens(decoder_input_ids) * self.embed_scale, mask, memory, memory_mask)


class _Encoder(nn.Module):
    """What generate() calls to encode the source once."""

    def __init__(self, seq2seq):
        super().__init__()
        self.seq2seq = [seq2seq]  # a list, so the encoder is not registered twice

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.seq2seq[0].encode(input_ids, _mask(input_ids, attention_mask)))


def shift_right(labels, start_id, pad_id):
    """Labels [B, T] (target + eos, -100 = ignored) -> decoder inputs start + labels[:, :-1]."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


class MeoForSeq2SeqLM(MeoPreTrainedModel, GenerationMixin):
    """Sources end with eos and the decoder starts from bos (config.decoder_start_token_id), as
    meo_ds trains them. attention_mask marks the real source tokens; decoder_attention_mask (optional)
    the real decoder tokens. The loss is plain cross-entropy (training used label smoothing)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = MeoSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._encoder = _Encoder(self.model)
        self.post_init()

    def get_encoder(self, *args, **kwargs):
        return self._encoder

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, labels=None, **kwargs):
        if encoder_outputs is None:
            encoder_outputs = self._encoder(input_ids, attention_mask)
        memory = encoder_outputs[0]
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids (decoder_start_token_id + target) or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        memory_mask = _mask(memory[..., 0], attention_mask)
        hidden = self.model.decode(decoder_input_ids, _mask(decoder_input_ids, decoder_attention_mask), memory, memory_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(self, decoder_input_ids, attention_mask=None, encoder_outputs=None,
                                      decoder_attention_mask=None, **kwargs):
        """No KV cache: every step re-runs the whole decoder prefix (positions stay absolute and MEO's
        causal segment gates see what training saw)."""
        return {"decoder_input_ids": decoder_input_ids, "attention_mask": attention_mask,
                "encoder_outputs": encoder_outputs, "decoder_attention_mask": decoder_attention_mask}
