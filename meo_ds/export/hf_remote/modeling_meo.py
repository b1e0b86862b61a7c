"""meo_ds models for transformers' remote code (no meo_ds import: this runs where meo_ds is absent).

The inference forward of meo_ds's decoder LM and translation model with the three MoE families
(top-k, XMoE threshold routing, MEO merged experts). The math is not written here: it comes from
models_functional.py and moe_functional.py, which the export copies byte for byte from meo_ds's
own meo_ds/models/functional.py and meo_ds/moe/functional.py (so one change reaches both; imported
from meo_ds, these names load those very files, see hf_remote/__init__.py). This file holds the
modules (with the export's parameter names) and the transformers classes. Inference only: dropless
routing (no capacity), no noise, no jitter; the tests compare logits and greedy tokens with
meo_ds's own model.

Incremental decoding (generate() with use_cache, the default) keeps what a step needs from the
earlier ones in transformers' cache classes: self-attention keys/values in a `MeoCache` (a
DynamicCache that also carries the running gate sums of the causal MEO layers, continued by
moe_functional.continued_gate_summary, so a segment's gate reads the earlier segments as the full
forward does); translation adds an EncoderDecoderCache whose cross-attention keys/values are
computed from the encoder output once. Positions are absolute (cache length + offset), as in the
full forward. The model creates its cache on the first step (transformers' default DynamicCache
has no room for the MEO sums) and returns it as `cache`; use_cache=False re-runs the whole prefix
each step. Cached and uncached generation give the same tokens (the tests check it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

from .configuration_meo import MeoConfig
from .models_functional import apply_rope, attend, rms_norm, sinusoidal_positions
from .moe_functional import (
    GroupLayout, continued_gate_summary, decode_merged_forward, dense_combine, gate_logits, gate_summary, merged_forward,
    router_logits, source_summary, sparse_merge_pays, threshold_choices, topk_choices, topk_softmax_gates,
)


# ----------------------------------------------------------------------------- decoding cache
class MeoCache(DynamicCache):
    """Self-attention keys/values per layer (DynamicCache) and, per causal MEO layer, the running
    gate sums of each merged linear ({layer index: {linear name: continued_gate_summary's state}})
    and the merged weights of the segment being decoded ({layer index: {linear name:
    decode_merged_forward's cache}}). Beam search reorders them all. The sums cannot be rewound,
    so crop() (assisted decoding) refuses when there are any."""

    def __init__(self):
        super().__init__()
        self.meo_sums = {}
        self.meo_merged = {}

    def meo_state(self, layer_idx):
        return self.meo_sums.setdefault(layer_idx, {})

    def merged_state(self, layer_idx):
        return self.meo_merged.setdefault(layer_idx, {})

    def _map_sums(self, fn):
        def apply(node):
            if isinstance(node, dict):
                return {k: apply(v) for k, v in node.items()}
            return fn(node) if torch.is_tensor(node) else node

        self.meo_sums, self.meo_merged = apply(self.meo_sums), apply(self.meo_merged)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._map_sums(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._map_sums(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._map_sums(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.meo_sums, self.meo_merged = {}, {}

    def crop(self, *args, **kwargs):
        if self.meo_sums:
            raise ValueError("MeoCache: MEO's running gate sums cannot be rewound, so this cache cannot be cropped "
                             "(assisted or contrastive decoding); generate without them, or with use_cache=False")
        super().crop(*args, **kwargs)


def self_attention_cache(cache):
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


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
        qkv_bias = bias or getattr(config, "qkv_bias", False)
        self.q_proj = nn.Linear(d, self.heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=bias)

    def _split(self, x, heads):
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, src):
        return self._split(self.k_proj(src), self.kv_heads), self._split(self.v_proj(src), self.kv_heads)

    def forward(self, x, key_mask, memory=None, cache=None, layer_idx=0, past=0):
        """x [B, T, d] at positions past..past+T-1; key_mask [B, S] bool (True = real key; self-attention
        with a cache: S = past + T); memory [B, S, d] for cross-attention. cache: None, a MeoCache
        (self-attention) or an EncoderDecoderCache (translation decoder)."""
        q = self._split(self.q_proj(x), self.heads)
        if self.cross:
            if cache is not None and cache.is_updated.get(layer_idx):
                layer = cache.cross_attention_cache.layers[layer_idx]
                k, v = layer.keys, layer.values
            else:
                k, v = self._keys_values(memory)
                if cache is not None:
                    cache.cross_attention_cache.update(k, v, layer_idx)
                    cache.is_updated[layer_idx] = True
        else:
            k, v = self._keys_values(x)
            if self.use_rope:
                pos = torch.arange(past, past + x.shape[1], device=x.device)[None]
                q, k = apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta)
            if cache is not None:
                k, v = self_attention_cache(cache).update(k, v, layer_idx)
        mask = key_mask[:, None, None, :]
        if self.causal:
            queries = torch.arange(past, past + x.shape[1], device=x.device)
            mask = mask & (torch.arange(k.shape[2], device=x.device)[None, :] <= queries[:, None])[None, None]
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
        """(dense gates [N, E], the selected experts [N, k])."""
        return topk_softmax_gates(gate_logits(summary, self.gate_weight, source, self.source_gate), top_k)

    def forward(self, u, g, ids, cache=None, segment=0):
        """cache (decoding inside one segment): the merged weights kept from its first step."""
        # Merge only the selected experts where that reads less (decoding: one group per sequence).
        sparse = sparse_merge_pays(u.shape[0], self.weight.shape[0], ids.shape[1], u.device.type)
        if cache is not None:
            return decode_merged_forward(u, g, self.weight, self.bias, ids if sparse else None, cache, segment)
        return merged_forward(u, g, self.weight, self.bias, ids if sparse else None)


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

    def forward(self, x, mask, memory=None, memory_mask=None, state=None, past=0, merged=None):
        """x [B, T, d] at positions past..past+T-1, mask [B, T]. state (causal, incremental decoding):
        this layer's running gate sums (MeoCache.meo_state), updated in place; merged: its merged
        weights (MeoCache.merged_state), kept while a segment is decoded (no grad)."""
        groups = GroupLayout(mask, self.causal, self.moe.get("segment_len", 64), start=past)
        decoding = merged is not None and groups.num_segments == 1 and not torch.is_grad_enabled()
        top_k = self.moe["top_k"]
        source = None
        if memory is not None:
            source = source_summary(memory, memory_mask).repeat_interleave(groups.num_segments, dim=0)

        def summary(name, inp):
            lin = self.linears[name]
            if state is None:
                return gate_summary(inp, groups, lin.default_summary)
            out, state[name] = continued_gate_summary(inp, groups, lin.default_summary, state.get(name))
            return out

        def run(name, inp):
            lin = self.linears[name]
            if lin.token_block is not None:
                inp = lin.token_block(inp)
            cache = merged.setdefault(name, {}) if decoding else None
            return lin(inp, *lin.gates(summary(name, inp), top_k, source), cache, groups.first_segment)

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

    def forward(self, x, key_mask, memory=None, memory_mask=None, cache=None, layer_idx=0, past=0):
        """key_mask [B, past + T] (the cached keys' and x's); the FFN sees x's part of it."""
        x = x + self.self_attn(self.input_layernorm(x), key_mask, cache=cache, layer_idx=layer_idx, past=past)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_layernorm(x), memory_mask, memory, cache=cache, layer_idx=layer_idx)
        h = self.post_attention_layernorm(x)
        mask = key_mask[:, past:]
        if isinstance(self.mlp, MEO):
            state = None
            if cache is not None and self.mlp.causal:
                own = self_attention_cache(cache)
                if not isinstance(own, MeoCache):
                    raise TypeError(f"MEO layers decode with a MeoCache (it keeps their gate sums), got {type(own).__name__}; "
                                    f"pass none (use_cache=True makes one) or a MeoCache")
                state, merged = own.meo_state(layer_idx), own.merged_state(layer_idx)
            else:
                merged = None
            if self.cross_attn is not None:
                return x + self.mlp(h, mask, memory, memory_mask, state=state, past=past, merged=merged)
            return x + self.mlp(h, mask, state=state, past=past, merged=merged)
        return x + (self.mlp(h, mask) if self.is_moe else self.mlp(h))


class Stack(nn.Module):
    def __init__(self, config, num_layers, moe_layers, causal, cross):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config, i in moe_layers, causal, cross) for i in range(num_layers))
        self.norm = make_norm(config, config.hidden_size)

    def forward(self, x, key_mask, memory=None, memory_mask=None, cache=None):
        """x [B, T, d] follows the cache's past positions; key_mask [B, past + T]."""
        past = cache.get_seq_length() if cache is not None else 0
        if key_mask.shape[1] != past + x.shape[1]:
            raise ValueError(f"attention mask covers {key_mask.shape[1]} positions, but the cache holds {past} and "
                             f"the input adds {x.shape[1]}: pass the mask of the whole sequence so far")
        if self.config.positions == "sinusoidal":
            positions = torch.arange(past, past + x.shape[1], device=x.device)
            x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, key_mask, memory, memory_mask, cache=cache, layer_idx=i, past=past)
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
        return False  # the model makes its own cache (MeoCache: room for MEO's gate sums)


def _mask(ids, attention_mask, past=0):
    """attention_mask as bool, or all True over past + ids' positions."""
    if attention_mask is None:
        return torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.bool, device=ids.device)
    return attention_mask.bool()


def _past(cache):
    return cache.get_seq_length() if cache is not None else 0


# ----------------------------------------------------------------------------- language model
class MeoModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Stack(config, config.num_hidden_layers, set(config.moe_layers), causal=True, cross=False)
        self.embed_scale = config.embed_scale

    def forward(self, input_ids, key_mask, cache=None):
        return self.decoder(self.embed_tokens(input_ids) * self.embed_scale, key_mask, cache=cache)


class MeoForCausalLM(MeoPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, cache=None, use_cache=None, **kwargs):
        """input_ids [B, T] follow the `cache`'s positions (a MeoCache; with use_cache and none given, one is
        made and returned); attention_mask [B, past + T] covers the cached positions too."""
        if cache is None and use_cache:
            cache = MeoCache()
        hidden = self.model(input_ids, _mask(input_ids, attention_mask, _past(cache)), cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=None, **kwargs):
        """With a cache only the tokens it does not hold yet are fed."""
        return {"input_ids": input_ids[:, _past(cache):], "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache}


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

    def decode(self, decoder_input_ids, key_mask, memory, memory_mask, cache=None):
        return self.decoder(self.embed_tokens(decoder_input_ids) * self.embed_scale, key_mask, memory, memory_mask, cache)


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
                encoder_outputs=None, labels=None, cache=None, use_cache=None, **kwargs):
        """cache: an EncoderDecoderCache(MeoCache, DynamicCache) (with use_cache and none given, one is made
        and returned); decoder_input_ids then follow its positions and decoder_attention_mask covers them."""
        if cache is None and use_cache:
            cache = EncoderDecoderCache(MeoCache(), DynamicCache())
        if encoder_outputs is None:
            encoder_outputs = self._encoder(input_ids, attention_mask)
        memory = encoder_outputs[0]
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids (decoder_start_token_id + target) or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        memory_mask = _mask(memory[..., 0], attention_mask)
        key_mask = _mask(decoder_input_ids, decoder_attention_mask, _past(cache))
        hidden = self.model.decode(decoder_input_ids, key_mask, memory, memory_mask, cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=cache, encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(self, decoder_input_ids, cache=None, attention_mask=None, encoder_outputs=None,
                                      decoder_attention_mask=None, use_cache=None, **kwargs):
        """The source is encoded once (encoder_outputs); with a cache only the new decoder tokens are fed."""
        return {"decoder_input_ids": decoder_input_ids[:, _past(cache):], "attention_mask": attention_mask,
                "encoder_outputs": encoder_outputs, "decoder_attention_mask": decoder_attention_mask,
                "cache": cache, "use_cache": use_cache}
