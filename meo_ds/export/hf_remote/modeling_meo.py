"""meo_ds models in plain torch for transformers' remote code (self-contained: no meo_ds import).

This re-implements the inference forward of meo_ds's decoder LM and translation model with the
three MoE families (top-k, XMoE threshold routing, MEO merged experts). Inference only: dropless
routing (no capacity), no noise, no jitter; the tests compare logits and greedy tokens with
meo_ds's own model so that any drift is caught. Generation re-runs the whole prefix each step
(no KV cache), which keeps MEO's causal segment gates exactly as in training.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, Seq2SeqLMOutput

from .configuration_meo import MeoConfig


# ----------------------------------------------------------------------------- basic blocks
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config, dim):
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


def rope(x, positions, theta):
    """Rotary embedding (rotate-half convention) of x [B, H, T, Dh] at positions [T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sinusoidal(positions, dim):
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


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
            pos = torch.arange(x.shape[1], device=x.device)
            q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = key_mask[:, None, None, :]
        if self.causal:
            t = x.shape[1]
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        return torch.softmax(x.float() @ self.weight.float().t(), dim=-1)


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
            top, idx = probs.topk(moe["top_k"], dim=-1)
            if moe.get("renormalize", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return torch.zeros_like(probs).scatter(-1, idx, top)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        take = before < moe["threshold"]
        take[:, 0] = True
        if moe.get("max_k"):
            take[:, moe["max_k"]:] = False
        return torch.zeros_like(probs).scatter(-1, idx, torch.where(take, sorted_p, torch.zeros_like(sorted_p)))

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
        logits = summary.float() @ self.gate_weight.float().t()
        if self.source_gate is not None:
            logits = logits + source @ self.source_gate.float().t()
        top, idx = logits.topk(top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))

    def forward(self, u, g):
        w = (g.to(self.weight.dtype) @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])
        y = torch.bmm(u, w.transpose(1, 2))
        if self.bias is not None:
            y = y + (g.to(self.bias.dtype) @ self.bias).unsqueeze(1)
        return y


class MEO(nn.Module):
    """Merged experts: one gate per linear, per sequence (encoder) or per causal segment (decoder).
    A causal segment's gate reads the mean of the earlier segments (a shifted cumsum); in a
    translation decoder every gate also reads the masked mean of the encoder output."""

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

    def _groups(self, x, mask):
        """[B, L, *] -> [B*S, T, *] groups (sequence, or causal segments of segment_len)."""
        if not self.causal:
            return x, mask, 1
        seg = self.moe.get("segment_len", 64)
        segments = -(-x.shape[1] // seg)
        pad = segments * seg - x.shape[1]
        x = F.pad(x, (0, 0, 0, pad)).reshape(x.shape[0] * segments, seg, x.shape[-1])
        mask = F.pad(mask, (0, pad)).reshape(-1, seg)
        return x, mask, segments

    def _summary(self, name, u, mask, segments):
        m = mask[..., None]
        sums = torch.where(m, u, torch.zeros((), dtype=u.dtype, device=u.device)).float().sum(dim=1)
        counts = mask.float().sum(dim=1)
        if not self.causal:
            return sums / counts.clamp_min(1.0)[:, None]
        sums, counts = sums.view(-1, segments, sums.shape[-1]), counts.view(-1, segments)
        before_sum = torch.cat([torch.zeros_like(sums[:, :1]), sums[:, :-1].cumsum(1)], dim=1)
        before_cnt = torch.cat([torch.zeros_like(counts[:, :1]), counts[:, :-1].cumsum(1)], dim=1)
        default = self.linears[name].default_summary.float()
        summary = torch.where((before_cnt > 0)[..., None], before_sum / before_cnt.clamp_min(1.0)[..., None], default)
        return summary.reshape(-1, summary.shape[-1])

    @staticmethod
    def _source(memory, memory_mask, segments):
        m = memory_mask[..., None]
        sums = torch.where(m, memory, torch.zeros((), dtype=memory.dtype, device=memory.device)).float().sum(dim=1)
        mean = sums / memory_mask.sum(dim=1).float().clamp_min(1.0)[:, None]
        return mean.repeat_interleave(segments, dim=0)

    def forward(self, x, mask, memory=None, memory_mask=None):
        batch, length = x.shape[:2]
        u, gmask, segments = self._groups(x, mask)
        top_k = self.moe["top_k"]
        source = self._source(memory, memory_mask, segments) if memory is not None else None

        def run(name, inp):
            lin = self.linears[name]
            if lin.token_block is not None:
                inp = lin.token_block(inp)
            return lin(inp, lin.gates(self._summary(name, inp, gmask, segments), top_k, source))

        if "fc1" in self.linears:
            y = run("fc2", F.gelu(run("fc1", u)))
        else:
            y = run("w2", F.silu(run("w1", u)) * run("w3", u))
        y = torch.where(gmask[..., None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y.reshape(batch, -1, y.shape[-1])[:, :length].to(x.dtype)


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
            x = x + sinusoidal(torch.arange(x.shape[1], device=x.device), x.shape[-1]).to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask, memory, memory_mask)
        return self.norm(x)


class MeoPreTrainedModel(PreTrainedModel):
    config_class = MeoConfig
    base_model_prefix = "model"
    _supports_sdpa = True

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
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

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

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MeoSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._encoder = _Encoder(self.model)
        self.post_init()

    def get_encoder(self, *args, **kwargs):
        return self._encoder

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

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
