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
"""
from transformers import PretrainedConfig


class MeoConfig(PretrainedConfig):
    model_type = "meo_ds_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        task="lm",
        vocab_size=32000,
        share_embeddings=True,
        src_vocab_size=None,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_decoder_layers=None,
        num_attention_heads=8,
        num_key_value_heads=None,
        head_dim=None,
        norm="rmsnorm",
        norm_eps=1e-5,
        positions="rope",
        rope_theta=10000.0,
        max_position_embeddings=2048,
        ffn_activation="swiglu",
        ffn_bias=False,
        attention_bias=False,
        embed_scale=1.0,
        tie_word_embeddings=True,
        moe=None,
        moe_layers=None,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=None,
        **kwargs,
    ):
        self.task = task
        self.vocab_size = vocab_size
        self.share_embeddings = share_embeddings
        self.src_vocab_size = src_vocab_size if src_vocab_size is not None else vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_decoder_layers = num_decoder_layers if num_decoder_layers is not None else num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.norm = norm
        self.norm_eps = norm_eps
        self.positions = positions
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.ffn_activation = ffn_activation
        self.ffn_bias = ffn_bias
        self.attention_bias = attention_bias
        self.embed_scale = embed_scale
        self.moe = moe
        self.moe_layers = moe_layers if moe_layers is not None else ([] if task == "lm" else {"encoder": [], "decoder": []})
        kwargs.setdefault("is_encoder_decoder", task == "translation")
        if decoder_start_token_id is None and task == "translation":
            decoder_start_token_id = bos_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
