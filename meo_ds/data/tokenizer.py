"""SentencePiece tokenizers: training, a small wrapper, and a HuggingFace (tokenizers) conversion.

Special ids are fixed for every tokenizer meo_ds trains: pad=0, unk=1, bos=2, eos=3. A model from
elsewhere (Llama 2's, copied by meo-upcycle) may lack some (no pad): their id is None.

Training input: SentencePiece skips sentences longer than MAX_SENTENCE_BYTES (and fails when it
skipped them all), so longer documents are cut at whitespace into pieces below that size: the
statistics a tokenizer learns do not need whole documents. The vocabulary size is a soft limit
(a small corpus yields fewer pieces); when the tokenizer ends up smaller than requested a
warning says so and the manifest records both sizes: the tokenizer is usable, but the corpus
cannot support the size asked for.
"""
from __future__ import annotations

import io
import os
import sys
import types
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from meo_ds.data.io import corpus_key, describe_inputs, sha256_file
from meo_ds.fileio import atomic_write

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_BYTES = 1 << 16
NORMALIZATIONS = ("nmt_nfkc", "nfkc")
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


class Tokenizer:
    """A loaded SentencePiece model with the ids the loaders and models need (the interface of
    meo_ds/data/hf_tokenizer.py, whose `load_tokenizer` also reads HuggingFace tokenizer.json)."""

    kind = "sentencepiece"
    files = ["tokenizer.model"]  # what a corpus ships

    def __init__(self, model_path: str | os.PathLike):
        """`model_path`: a SentencePiece .model file, or a directory holding tokenizer.model."""
        self.path = Path(model_path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path}: not a SentencePiece model ({err}); use a tokenizer.model written by "
                             f"`meo-prepare tokenizer` (or train one with it)") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int | None:
        return _id(self.sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return _id(self.sp.unk_id())

    @property
    def bos_id(self) -> int | None:
        return _id(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _id(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids, dropping pad/bos/eos (sentencepiece skips control ids)."""
        return self.sp.decode([int(i) for i in ids])

    def checksum(self) -> str:
        return sha256_file(self.path)

    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id}

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def _id(value: int) -> int | None:
    """sentencepiece gives -1 for a special token the model lacks (Llama 2 has no pad): None, as HF's."""
    return value if value >= 0 else None


def train_tokenizer(
    sentences: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    normalization: str = "nmt_nfkc",
) -> Tokenizer:
    """Train a SentencePiece model on `sentences` and write it atomically to `model_path`.

    `normalization`: "nmt_nfkc" (sentencepiece's default: NFKC, and newlines/tabs become spaces)
    or "nfkc" (keeps newlines and tabs, so multi-line documents decode with their lines);
    runs of spaces are collapsed in both.
    `max_sentences` caps (by uniform sampling inside sentencepiece) how many sentences the
    trainer keeps in memory. The vocabulary is a soft limit: tiny corpora get fewer pieces.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be unigram, bpe, char or word, not {model_type!r}")
    pieces = (piece for s in sentences if s.strip() for piece in fit_sentence(s, MAX_SENTENCE_BYTES))
    counted = _CountingIterator(pieces)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted, model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            byte_fallback=byte_fallback, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, pad_piece=SPECIAL_TOKENS["pad"], unk_piece=SPECIAL_TOKENS["unk"],
            bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, hard_vocab_limit=False,
            max_sentence_length=MAX_SENTENCE_BYTES, train_extremely_large_corpus=False,
            num_threads=os.cpu_count() or 1, minloglevel=2, normalization_rule_name=normalization,
        )
    except RuntimeError as err:
        if counted.count == 0:
            raise ValueError("tokenizer training input holds no non-empty text") from None
        raise ValueError(f"sentencepiece training failed: {err}") from None
    atomic_write(Path(model_path), buffer.getvalue())
    tok = Tokenizer(model_path)
    if tok.vocab_size < vocab_size:
        print(f"warning: the training text supports only {tok.vocab_size} tokens, not the requested vocabulary of "
              f"{vocab_size}; the tokenizer has {tok.vocab_size}. Train on more text for a larger vocabulary "
              f"(or ask for --vocab-size {tok.vocab_size})", file=sys.stderr, flush=True)
    return tok


def fit_sentence(text: str, limit: int) -> Iterator[str]:
    """`text` cut at whitespace (else anywhere on a character boundary) into pieces of <= `limit` UTF-8 bytes."""
    data = text.encode("utf-8")
    while len(data) > limit:
        cut = max(data.rfind(b" ", 0, limit + 1), data.rfind(b"\n", 0, limit + 1))
        if cut <= 0:
            cut = limit
            while data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
                cut -= 1
        if data[:cut].strip():
            yield data[:cut].decode("utf-8")
        data = data[cut:].lstrip()
    if data.strip():
        yield data.decode("utf-8")


class _CountingIterator:
    def __init__(self, it: Iterator[str]):
        self.it, self.count = it, 0

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> str:
        item = next(self.it)
        self.count += 1
        return item


def hf_tokenizer(model_path: str | os.PathLike):
    """A transformers `PreTrainedTokenizerFast` that encodes exactly like the SentencePiece model.

    Built with transformers' own `SpmConverter` (needs the `protobuf` package). Decoding handles
    byte-fallback pieces. `add_special_tokens` adds nothing; callers add bos/eos explicitly.
    """
    try:
        from google import protobuf  # noqa: F401
    except ImportError:
        raise ImportError("building a HuggingFace tokenizer needs the 'protobuf' package: pip install protobuf") from None
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    class _Converter(SpmConverter):
        handle_byte_fallback = True
        SpmExtractor = _BpeMergeExtractor

    backend = _Converter(types.SimpleNamespace(vocab_file=str(model_path))).converted()
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1),
    ])
    backend.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
    )


class _BpeMergeExtractor:
    """BPE merges from piece scores (transformers 5.23's default extractor mis-handles BPE models)."""

    def __init__(self, vocab_file: str):
        self.vocab_file = vocab_file

    def extract(self, vocab_scores: list[tuple[str, float]]) -> tuple[dict[str, int], list]:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
        return vocab, generate_merges(vocab, vocab_scores)


def save_hf_tokenizer(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write the HuggingFace files (tokenizer.json, tokenizer_config.json) plus the original
    `tokenizer.model` into `out_dir`; returns the written file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list(hf_tokenizer(model_path).save_pretrained(str(out)))
    atomic_write(out / "tokenizer.model", Path(model_path).read_bytes())
    return sorted({Path(f).name for f in files} | {"tokenizer.model"})


def prepare_tokenizer(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, parallel: bool = False,
                      fmt: str = "auto", field: str = "text", doc_sep: str = "line", source_field: str = "source",
                      target_field: str = "target", vocab_size: int = 8000, model_type: str = "unigram",
                      character_coverage: float = 0.9995, byte_fallback: bool = True,
                      max_sentences: int = 2_000_000, normalization: str = "nmt_nfkc",
                      overwrite: bool = False, progress: bool = True) -> dict:
    """Train a tokenizer into directory `out`: tokenizer.model, hf/ (HuggingFace files), manifest.json.

    With `parallel`, `inputs` is a parallel corpus (as for prepare_mt) and both sides feed one
    joint vocabulary. Returns the manifest; re-running with identical inputs is a no-op.
    """
    import time

    from tqdm.auto import tqdm

    from meo_ds.data.io import check_output_dir, read_manifest, staging_dir, write_manifest
    from meo_ds.data.readers import read_documents, read_pairs

    start = time.time()
    described = describe_inputs(inputs)
    options = {"parallel": parallel, "format": fmt, "field": field, "doc_sep": doc_sep,
               "source_field": source_field, "target_field": target_field, "vocab_size": vocab_size,
               "model_type": model_type, "character_coverage": character_coverage,
               "byte_fallback": byte_fallback, "max_sentences": max_sentences, "normalization": normalization}
    key = corpus_key(described, "", options)
    out = Path(out)
    if check_output_dir(out, key, overwrite):
        print(f"{out}: already holds this tokenizer (same inputs and options); nothing to do")
        return read_manifest(out)
    if parallel:
        sentences = (text for pair in read_pairs(inputs, fmt, source_field, target_field) for text in pair)
    else:
        sentences = read_documents(inputs, fmt, field, doc_sep)
    sentences = tqdm(sentences, desc="read", unit="sentence", disable=not progress)
    with staging_dir(out) as tmp:
        tok = train_tokenizer(sentences, tmp / "tokenizer.model", vocab_size, model_type, character_coverage,
                              byte_fallback, max_sentences, normalization=normalization)
        try:
            hf_files = save_hf_tokenizer(tmp / "tokenizer.model", tmp / "hf")
        except ImportError as err:
            print(f"warning: HuggingFace tokenizer files not written: {err}")
            hf_files = []
        manifest = {"format": "meo_ds.tokenizer/1", "task": "tokenizer", "corpus_key": key, "inputs": described,
                    "options": options, "file": "tokenizer.model", "sha256": tok.checksum(),
                    "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "special_ids": tok.special_ids(),
                    "hf_dir": "hf" if hf_files else None, "hf_files": hf_files,
                    "seconds": round(time.time() - start, 3)}
        write_manifest(tmp, manifest)
    return manifest
