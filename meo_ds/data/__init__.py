"""meo_ds.data: tokenizers, prepared token corpora and the loaders the trainer iterates.

Preparing (also `meo-prepare tokenizer|lm|mt|demo`)::

    prepare_tokenizer(["corpus.txt"], "tok")                       # tok/tokenizer.model, tok/hf/
    train_tokenizer(sentences, "tok.model", vocab_size=8000)       # pad=0 unk=1 bos=2 eos=3
    prepare_lm(["corpus.jsonl"], "tok", "data/lm")                 # -> train/validation shards
    prepare_mt(["train.de", "train.en"], "tok", "data/mt")         # -> train/validation/test
    build_demo("lm", "demo")     # demo/corpus, demo/tokenizer, demo/shards (the loader's directory)

Language modelling (one loader per data-parallel rank)::

    loader = LMLoader("data/lm", seq_len=512, micro_batch_size=8,
                      dp_rank=rank, dp_world_size=world, seed=1234)
    for batch in loader:           # one epoch; batch["input_ids"], batch["labels"]: int64 [B, L]
        ...                        # reset_at_doc_boundaries=True adds position_ids/segment_ids
    ckpt["data"] = loader.state_dict(); loader.load_state_dict(ckpt["data"])   # exact resume
    len(loader)                    # batches per epoch, equal on every rank
    loader.dataset.vocab_size; loader.dataset.tokenizer()          # from the corpus manifest
    LMLoader(..., split="validation", shuffle=False)               # evaluation order
    loader.forever()               # endless iterator over epochs

Translation::

    loader = MTLoader("data/mt", max_tokens=4096, dp_rank=rank, dp_world_size=world, seed=1234)
    batch = next(iter(loader))     # src_ids [B,S] (source + eos), src_mask [B,S] bool (True = token),
                                   # decoder_input_ids [B,T] (bos + target), labels [B,T]
                                   # (target + eos, padding = -100), tgt_mask [B,T], index [B]
    pad id: loader.tokenizer.pad_id; same state_dict()/load_state_dict()/forever()/len().

Both loaders share meo_ds/data/loader.py (the corpus split, iteration, exact resume); a batch's
model inputs (`loader.MODEL_INPUTS`) and its counted tokens are meo_ds/data/batch.py's.

Tokenizer: `Tokenizer(path)` (encode/decode/pad_id/bos_id/eos_id/vocab_size); `hf_tokenizer(path)`
and `save_hf_tokenizer(path, out_dir)` give a transformers tokenizer that encodes identically.
`load_tokenizer(path)` reads a SentencePiece tokenizer.model or a HuggingFace tokenizer.json
(`HFTokenizer`, LM corpora only: meo_ds/data/hf_tokenizer.py).
"""
from meo_ds.data.demo import build_demo
from meo_ds.data.hf_tokenizer import HFTokenizer, load_tokenizer
from meo_ds.data.lm import LMDataset, LMLoader, prepare_lm
from meo_ds.data.mt import MTDataset, MTLoader, prepare_mt
from meo_ds.data.readers import CorpusError, read_documents, read_pairs
from meo_ds.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, hf_tokenizer, prepare_tokenizer,
                                   save_hf_tokenizer, train_tokenizer)

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "CorpusError", "build_demo", "LMDataset", "LMLoader", "MTDataset", "MTLoader",
    "HFTokenizer", "Tokenizer", "hf_tokenizer", "load_tokenizer", "prepare_lm", "prepare_mt", "prepare_tokenizer", "read_documents", "read_pairs",
    "save_hf_tokenizer", "train_tokenizer",
]
