"""The tokenizer files of an export: meo_ds's HuggingFace conversion, with a decoder fit for the task.

`meo_ds.data.tokenizer.save_hf_tokenizer` writes tokenizer.json (encoding exactly as the
SentencePiece model: a Metaspace pre-tokenizer that marks word starts with "▁" and prepends one
to the text), tokenizer_config.json and tokenizer.model. Its decoder turns "▁" into a space and
strips the first character of the decoded text when it is a space (the prepended mark), as
Llama's tokenizer does, which suits decoding a whole text.

Language models are decoded in pieces: transformers' text-generation pipeline (5.x) decodes the
new tokens alone and appends them to the prompt string, so a stripping decoder loses the space
between the prompt and a continuation that starts a word ("Return" + "the" -> "Returnthe"). An
LM export therefore decodes without the strip: every word-start piece keeps its space, so the
pipeline returns "Return the ..." and `decode` of a continuation starts with its space; `decode`
of a whole text begins with the space of the prepended mark (strip it for display). Translation
exports decode whole target sentences and keep the strip.

A HuggingFace tokenizer.json (LM corpora prepared with one, meo_ds/data/hf_tokenizer.py) is
shipped as it is with its tokenizer_config.json (which then holds every special token, so no
special_tokens_map.json is shipped); tokenizer_config.json gets the special tokens the
corpus was encoded with (pad = eos when the tokenizer has no pad, as the corpus's pad id) and,
when the source named no tokenizer class, `PreTrainedTokenizerFast`, so AutoTokenizer encodes
with tokenizer.json itself rather than a class picked from the model type.
"""
from __future__ import annotations

import json
from pathlib import Path

STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


def write_tokenizer(out_dir: Path, model_path: Path, task: str) -> None:
    """tokenizer.json, tokenizer_config.json and tokenizer.model (SentencePiece) into out_dir, decoding
    for `task`; a HuggingFace tokenizer.json goes through `write_hf_files`."""
    from meo_ds.data.tokenizer import save_hf_tokenizer

    if model_path.suffix == ".json":
        write_hf_files(out_dir, model_path)
        return
    save_hf_tokenizer(model_path, out_dir)
    if task == "lm":
        keep_word_start_spaces(out_dir / "tokenizer.json")


def keep_word_start_spaces(path: Path) -> None:
    """Drop the leading-space strip from tokenizer.json's decoder (see the module docstring)."""
    tree = json.loads(path.read_text(encoding="utf-8"))
    decoder = tree.get("decoder") or {}
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    if not steps or steps[-1] != STRIP:
        raise ValueError(f"{path}: expected a decoder Sequence ending with {STRIP}, got {decoder}; the tokenizer "
                         f"conversion in meo_ds.data.tokenizer changed, update meo_ds/export/tokenizer.py with it")
    decoder["decoders"] = steps[:-1]
    path.write_text(json.dumps(tree, ensure_ascii=False, indent=2), encoding="utf-8")


def write_hf_files(out_dir: Path, path: Path) -> None:
    """A HuggingFace tokenizer.json and its special-token files into out_dir (module docstring)."""
    import shutil

    from meo_ds.data.hf_tokenizer import SPECIAL_FILES, HFTokenizer

    tok = HFTokenizer(path)
    shutil.copyfile(path, out_dir / "tokenizer.json")
    source = path.parent / SPECIAL_FILES[0]
    config = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update({f"{name}_token": token for name, token in tok.special_tokens().items()})
    (out_dir / SPECIAL_FILES[0]).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
