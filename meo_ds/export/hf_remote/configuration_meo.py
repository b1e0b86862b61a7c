"""Configuration of meo_ds models exported with remote code (self-contained: no meo_ds import).

One config class serves both tasks: `task="lm"` (decoder-only, MeoForCausalLM) and
`task="translation"` (encoder-decoder, MeoForSeq2SeqLM). `moe` describes the MoE layers
({kind: topk|xmoe|meo, num_experts, expert_hidden, top_k, renormalize, threshold, max_k,
activation, meo_level, token_bottleneck_ratio, segment_len}); `moe_layers` lists which layers
hold one (decoder-only: layer indices; translation: {"encoder": [...], "decoder": [...]}).

Translation: `vocab_size` is the target vocabulary; the source shares its embedding table unless
`share_embeddings` is false (then a table of `src_vocab_size`); `tie_word_embeddings` ties the
output projection to the target embedding. `num_hidden_layers` counts encoder layers,
`num_decoder_layers` decoder layers. `positions`: "rope" (self-attention only) or "sinusoidal"
(added to the scaled embeddings); `embed_scale` multiplies the embeddings (sqrt(d) or 1).
`attention_bias`: biases on all four attention projections; `qkv_bias`: on q, k, v only (Qwen2).
"""
from transformers import PretrainedConfig


# Fields stored as given, with their defaults (the fields derived from others are arguments of __init__).
FIELDS = {
    "vocab_size": 32000, "share_embeddings": True, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 8, "num_attention_heads": 8, "norm": "rmsnorm", "norm_eps": 1e-5, "positions": "rope",
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "ffn_activation": "swiglu", "ffn_bias": False,
    "attention_bias": False, "qkv_bias": False, "embed_scale": 1.0, "moe": None,
}
# PretrainedConfig's own fields, with our defaults.
BASE_DEFAULTS = {"tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
                 "decoder_start_token_id": None}


class MeoConfig(PretrainedConfig):
    model_type = "meo_ds_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, task="lm", src_vocab_size=None, num_decoder_layers=None, num_key_value_heads=None,
                 head_dim=None, moe_layers=None, **kwargs):
        self.task = task
        for name, default in FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.src_vocab_size = src_vocab_size if src_vocab_size is not None else self.vocab_size
        self.num_decoder_layers = num_decoder_layers if num_decoder_layers is not None else self.num_hidden_layers
        self.num_key_value_heads = num_key_value_heads or self.num_attention_heads
        self.head_dim = head_dim or self.hidden_size // self.num_attention_heads
        self.moe_layers = moe_layers if moe_layers is not None else ([] if task == "lm" else {"encoder": [], "decoder": []})
        for name, default in BASE_DEFAULTS.items():
            kwargs.setdefault(name, default)
        kwargs.setdefault("is_encoder_decoder", task == "translation")
        if kwargs["decoder_start_token_id"] is None and task == "translation":
            kwargs["decoder_start_token_id"] = kwargs["bos_token_id"]  # the decoder starts from bos
        super().__init__(**kwargs)
