"""Shared machinery of the prepare commands: the shipped tokenizer, parallel tokenization, streaming splits.

(Input fingerprints, `describe_inputs` and `corpus_key`, live in meo_ds/data/io.py.)
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
import os
import shutil
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from meo_ds.data.tokenizer import Tokenizer

_WORKER_TOKENIZER: Tokenizer | None = None


def ship_tokenizer(tok: Tokenizer, staging: Path) -> dict:
    """Copy the tokenizer into a corpus being staged; returns the manifest's `tokenizer` entry."""
    shutil.copyfile(tok.path, staging / "tokenizer.model")
    return {"file": "tokenizer.model", "source": str(tok.path.resolve()), "sha256": tok.checksum(),
            "vocab_size": tok.vocab_size, "special_ids": tok.special_ids()}


def chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_path)


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

    Exactly floor(n * f) of n items are held out, spread evenly through the stream.
    """

    def __init__(self, fraction: float):
        if not 0 <= fraction < 1:
            raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
        self.frac = Fraction(fraction).limit_denominator(1_000_000)
        self.index = 0

    def take(self, n: int) -> np.ndarray:
        """Held-out mask of the next `n` items."""
        i = np.arange(self.index, self.index + n, dtype=np.int64)
        p, q = self.frac.numerator, self.frac.denominator
        self.index += n
        return (i + 1) * p // q > i * p // q
