"""Shared machinery of the prepare commands: the shipped tokenizer, parallel tokenization, streaming splits.

Held-out splits (`validation`, `test`) come from one of two places, chosen per split:
- the user's own files (`--valid FILE...`, `--test FILE...`): the split is exactly those files,
  read in the training input's format and tokenized with the same tokenizer, read before the
  training inputs (so bad split files stop the run before the long pass). The LM keeps every
  document (as for training); translation keeps every pair: no dedup, length or ratio filter
  (they would silently change a benchmark), and a pair with an empty side is an error.
- a fraction of the training inputs (`--valid-fraction`, `--test-fraction`), cut by the stride
  rule of `StrideSplitter`; the fallback when no file is given for that split. Giving both for one
  split is an error.
A split file identical (sha256) to a training input is an error before any work. A given split
whose items (documents; pairs, both sides stripped) also occur verbatim in the training stream is
a warning, not an error: short segments ("Thank you.") legitimately recur in real corpora; the
count is printed and recorded in the manifest (`splits.<name>.origin.overlap_with_train`), so the
user can judge the contamination. Every split records its `origin` in the manifest.

(Input fingerprints, `describe_inputs` and `corpus_key`, live in meo_ds/data/io.py.)
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter, deque
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np

from meo_ds.data.io import check_output_dir, corpus_key, describe_inputs, read_manifest, token_dtype
from meo_ds.data.hf_tokenizer import HFTokenizer, load_tokenizer
from meo_ds.data.tokenizer import Tokenizer

_WORKER_TOKENIZER: Tokenizer | HFTokenizer | None = None


def ship_tokenizer(tok: Tokenizer | HFTokenizer, staging: Path) -> dict:
    """Copy the tokenizer's files into a corpus being staged; returns the manifest's `tokenizer` entry
    (`kind` and `special_ids` tell loaders and meo-export which ids to use)."""
    if tok.kind == "sentencepiece":
        shutil.copyfile(tok.path, staging / tok.files[0])
    else:
        for name in tok.files:
            shutil.copyfile(tok.path.parent / name, staging / name)
    return {"kind": tok.kind, "file": tok.files[0], "files": tok.files, "source": str(tok.path.resolve()),
            "sha256": tok.checksum(), "vocab_size": tok.vocab_size, "special_ids": tok.special_ids()}


def check_tokenizer_for(tok: Tokenizer | HFTokenizer, task: str) -> None:
    """ValueError unless `tok` can tokenize a `task` ("lm" or "mt") corpus: LM documents end with eos;
    translation batches need bos/eos/pad and meo_ds's SentencePiece conventions."""
    if task == "mt" and tok.kind != "sentencepiece":
        raise ValueError(f"{tok.path}: translation corpora (meo-prepare mt) take a SentencePiece tokenizer.model only, "
                         f"not a HuggingFace tokenizer.json; train one with `meo-prepare tokenizer --parallel`")
    if tok.eos_id is None:
        raise ValueError(f"{tok.path}: the tokenizer has no eos token, which an LM corpus puts after every document; "
                         f"set eos_token in its tokenizer_config.json")


def chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(model_path)


def _flat(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _encode_chunk(chunk: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode a chunk of texts (or pairs: one flat array per side); flat arrays pickle cheaply."""
    tok = _WORKER_TOKENIZER
    if chunk and isinstance(chunk[0], tuple):
        return [_flat(tok.encode_batch([s for s, _ in chunk])), _flat(tok.encode_batch([t for _, t in chunk]))]
    return [_flat(tok.encode_batch(chunk))]


def tokenize_chunks(items: Iterable, model_path: str | os.PathLike, num_proc: int = 1,
                    chunk_size: int = 2048) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Encode `items` (texts, or (source, target) pairs) chunk by chunk, in input order.

    Yields, per chunk, [(flat ids int32, lengths int64)] for texts or two such tuples (source,
    target) for pairs. With num_proc > 1 a process pool encodes; at most a few chunks per worker
    are in flight, so memory stays bounded whatever the corpus size.
    """
    chunks = chunked(items, chunk_size)
    if num_proc <= 1:
        _init_worker(str(model_path))
        yield from map(_encode_chunk, chunks)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        pending: deque = deque()  # Pool.imap would read the whole input ahead; keep 2 chunks per worker
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def select(flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sequences of a flat chunk where `mask` is True (still flat)."""
    return flat[np.repeat(mask, lengths)], lengths[mask]


class StrideSplitter:
    """Deterministic streaming split: item i is held out iff floor((i+1)f) > floor(if).

    Exactly floor(n * f) of n items are held out, spread evenly through the stream (f = 1: all).
    """

    def __init__(self, fraction: float):
        if not 0 <= fraction <= 1:
            raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
        self.frac = Fraction(fraction).limit_denominator(1_000_000)
        self.index = 0

    def take(self, n: int) -> np.ndarray:
        """Held-out mask of the next `n` items."""
        i = np.arange(self.index, self.index + n, dtype=np.int64)
        p, q = self.frac.numerator, self.frac.denominator
        self.index += n
        return (i + 1) * p // q > i * p // q


class HeldOutSplitter:
    """Held-out items by stride (exact counts): floor(n*(v+t)) held out, floor(held*t/(v+t)) of them test."""

    def __init__(self, valid_fraction: float, test_fraction: float):
        held = valid_fraction + test_fraction
        self.held = StrideSplitter(held)
        self.test = StrideSplitter(test_fraction / held if held else 0.0)

    def assign(self, n: int) -> np.ndarray:
        """Split code (an index into SPLITS: 0 train, 1 validation, 2 test) of the next `n` items."""
        held = self.held.take(n)
        codes = np.zeros(n, dtype=np.int8)
        codes[held] = np.where(self.test.take(int(held.sum())), 2, 1)
        return codes


SPLITS = ("train", "validation", "test")
SPLIT_OPTIONS = {"validation": ("--valid", "--valid-fraction"), "test": ("--test", "--test-fraction")}


def plan_held_out(files: dict[str, Sequence[str | os.PathLike] | None], fractions: dict[str, float | None],
                  defaults: dict[str, float]) -> tuple[dict[str, list[Path]], dict[str, float]]:
    """Where each held-out split comes from (module docstring): ({split: its files} for the splits
    given as files, {split: fraction of the training inputs}, 0 for a split given as files)."""
    given, cut = {}, {}
    for split, (files_flag, fraction_flag) in SPLIT_OPTIONS.items():
        paths, fraction = files.get(split), fractions.get(split)
        if paths and fraction is not None:
            raise ValueError(f"the {split} split is given twice: as files ({files_flag}) and as a fraction of the "
                             f"training inputs ({fraction_flag} {fraction}); give one of them")
        if paths:
            given[split], cut[split] = [Path(p) for p in paths], 0.0
        else:
            cut[split] = defaults[split] if fraction is None else fraction
    if min(cut.values()) < 0 or cut["validation"] + cut["test"] >= 1:
        raise ValueError(f"--valid-fraction {cut['validation']} and --test-fraction {cut['test']} must be >= 0 and "
                         f"sum to less than 1")
    return given, cut


def check_held_out_not_training(inputs: list[dict], split_inputs: dict[str, list[dict]]) -> None:
    """A held-out file with the checksum of a training input is an error (described inputs of io.py)."""
    training = {i["sha256"]: i["path"] for i in inputs}
    for split, described in split_inputs.items():
        for item in described:
            if item["sha256"] in training:
                raise ValueError(f"{item['path']}: the {split} file is identical to the training input "
                                 f"{training[item['sha256']]}; a held-out split must not be training data "
                                 f"(give other files, or drop {SPLIT_OPTIONS[split][0]} to hold out "
                                 f"{SPLIT_OPTIONS[split][1]} of the inputs)")


def split_origins(names: Sequence[str], split_inputs: dict[str, list[dict]], fractions: dict[str, float],
                  overlap: TextOverlap) -> dict[str, dict]:
    """The manifest's `origin` of each split: the training inputs (train), a fraction of them, or files."""
    origins = {}
    for name in names:
        if name in split_inputs:
            origins[name] = {"from": "files", "files": split_inputs[name], "overlap_with_train": overlap.count(name)}
        elif name == "train":
            origins[name] = {"from": "inputs"}
        else:
            origins[name] = {"from": "inputs", "fraction": fractions[name]}
    return origins


def describe_origin(origin: dict | None) -> str:
    """A split's manifest `origin` in words, for the summaries."""
    if not origin:
        return ""
    if origin["from"] == "files":
        files = ", ".join(Path(f["path"]).name for f in origin["files"])
        overlap = f"; {origin['overlap_with_train']:,} also in training" if origin["overlap_with_train"] else ""
        return f"  (files: {files}{overlap})"
    return f"  ({origin['fraction']:g} of the inputs)" if "fraction" in origin else "  (the inputs)"


Item = TypeVar("Item")  # a document (str) or a (source, target) pair


def text_digest(item: str | tuple[str, str]) -> bytes:
    """16-byte digest of a document or of a (source, target) pair (exact text)."""
    text = item if isinstance(item, str) else f"{len(item[0])}:{item[0]}{item[1]}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class TextOverlap:
    """Counts the items of the given held-out splits that also occur verbatim in the training stream.

    `record(split, items)` passes a split's items through and remembers their digests (memory is
    O(held-out items), never O(corpus)); `watch(items)` passes the training stream through and
    notes which of those digests it meets (no work when no split was given as files).
    """

    def __init__(self) -> None:
        self.splits: dict[str, Counter] = {}
        self.digests: set[bytes] = set()
        self.hits: set[bytes] = set()

    def record(self, split: str, items: Iterable[Item]) -> Iterator[Item]:
        counts = self.splits.setdefault(split, Counter())
        for item in items:
            digest = text_digest(item)
            counts[digest] += 1
            self.digests.add(digest)
            yield item

    def watch(self, items: Iterable[Item]) -> Iterator[Item]:
        if not self.digests:
            yield from items
            return
        for item in items:
            digest = text_digest(item)
            if digest in self.digests:
                self.hits.add(digest)
            yield item

    def count(self, split: str) -> int:
        """Items of `split` (with their repeats) whose text the training stream holds."""
        counts = self.splits.get(split, Counter())
        return sum(counts[d] for d in self.hits if d in counts)

    def warn(self, unit: str) -> None:
        for split, counts in self.splits.items():
            if n := self.count(split):
                print(f"warning: {n:,} of {sum(counts.values()):,} {split} {unit} also occur verbatim in the training "
                      f"inputs (kept in both; recorded as splits.{split}.origin.overlap_with_train in the manifest)",
                      file=sys.stderr)


class CorpusPlan(NamedTuple):
    """What `meo-prepare lm|mt` settles before reading a token: the described inputs (training and
    given splits), the tokenizer, the token dtype, the options as recorded, and the corpus key."""

    inputs: list[dict]
    split_inputs: dict[str, list[dict]]
    tok: Tokenizer | HFTokenizer
    np_dtype: np.dtype
    options: dict
    key: str
    out: Path


def plan_corpus(inputs: Sequence, given: dict, tokenizer: str, dtype: Optional[str], options: dict,
                out: str | os.PathLike, overwrite: bool, task: str) -> tuple[CorpusPlan, Optional[dict]]:
    """Describe and check the inputs (a given split identical to a training input is an error),
    load the tokenizer and check it fits `task` ("lm" or "mt"), fix the token dtype and the corpus key. The second value is the existing
    manifest when `out` already holds this very corpus (nothing to do), else None."""
    described = describe_inputs(inputs)
    split_inputs = {name: describe_inputs(paths, f"{name} file") for name, paths in given.items()}
    check_held_out_not_training(described, split_inputs)
    tok = load_tokenizer(tokenizer)
    check_tokenizer_for(tok, task)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    options = {**options, "dtype": np_dtype.name}
    key = corpus_key(described, tok.checksum(), options, split_inputs)
    plan = CorpusPlan(described, split_inputs, tok, np_dtype, options, key, Path(out))
    if check_output_dir(plan.out, key, overwrite):
        print(f"{out}: already holds this corpus (same inputs, tokenizer and options); nothing to do")
        return plan, read_manifest(plan.out)
    return plan, None
