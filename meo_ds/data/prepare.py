"""Shared machinery of the prepare commands: input fingerprints, parallel tokenization, splits."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from meo_ds.data.io import sha256_path
from meo_ds.data.tokenizer import Tokenizer

_WORKER_TOKENIZER: Tokenizer | None = None


def describe_inputs(inputs: Sequence[str | os.PathLike]) -> list[dict]:
    """Path, size and checksum of every input (missing inputs are an error before any work)."""
    described = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input not found")
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        described.append({"path": str(path.resolve()), "bytes": size, "sha256": sha256_path(path)})
    return described


def corpus_key(inputs: list[dict], tokenizer_sha: str, options: dict) -> str:
    payload = {"inputs": [(i["sha256"], i["bytes"]) for i in inputs], "tokenizer": tokenizer_sha, "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_path)


def _encode_chunk(chunk: list) -> list:
    tok = _WORKER_TOKENIZER
    if chunk and isinstance(chunk[0], tuple):
        sources = tok.encode_batch([s for s, _ in chunk])
        targets = tok.encode_batch([t for _, t in chunk])
        return list(zip(sources, targets))
    return tok.encode_batch(chunk)


def tokenize_stream(items: Iterable, model_path: str | os.PathLike, num_proc: int = 1,
                    chunk_size: int = 256) -> Iterator[list]:
    """Yield the token ids of each text (or (source, target) pair of ids), in input order.

    With num_proc > 1 chunks are encoded by a process pool; at most a few chunks per worker are
    in flight, so memory stays bounded whatever the corpus size.
    """
    chunks = chunked(items, chunk_size)
    if num_proc <= 1:
        _init_worker(str(model_path))
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks, chunksize=1):
            yield from encoded


class StrideSplitter:
    """Deterministic streaming split: item i is held out iff floor((i+1)f) > floor(if).

    Exactly floor(n * f) of n items are held out, spread evenly through the stream.
    """

    def __init__(self, fraction: float):
        if not 0 <= fraction < 1:
            raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
        self.frac = Fraction(fraction).limit_denominator(1_000_000)
        self.index = 0

    def take(self) -> bool:
        i, f = self.index, self.frac
        self.index += 1
        return (i + 1) * f.numerator // f.denominator > i * f.numerator // f.denominator
