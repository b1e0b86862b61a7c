"""Corpora the data tests build for themselves (no downloads)."""
import random

WORDS = ("the model routes every token to an expert while the gate learns a balanced load across "
         "layers and ranks so that training stays fast and stable über naïve café").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def make_hf_tokenizer(directory, docs: list[str], bos: bool = False, vocab_size: int = 300):
    """A small byte-level BPE tokenizer.json (trained on `docs`) in `directory`, Qwen2-style: eos
    <|endoftext|>, no bos, no pad in tokenizer_config.json. With `bos`, Llama-3-style: its
    post-processor puts <|begin_of_text|> before every text and the config names it bos."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|begin_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = {"eos_token": specials[0], "bos_token": None}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[1]} $A", special_tokens=[(specials[1], tok.token_to_id(specials[1]))])
        config["bos_token"] = {"content": specials[1], "special": True}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok
