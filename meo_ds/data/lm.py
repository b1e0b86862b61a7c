"""Language-modelling corpora: `prepare_lm` writes token shards; `LMDataset`/`LMLoader` read them.

On disk (one directory): ``train.bin``/``validation.bin`` hold every document's ids followed by
eos, back to back, as raw uint16/uint32; ``*.idx.npy`` hold document start offsets (n_docs + 1,
int64); ``tokenizer.model`` is a copy of the tokenizer; ``manifest.json`` describes it all and is
written last, so a directory without it is never read.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meo_ds.data.io import (StreamMismatch, TokenFileWriter, check_output_dir, check_token_ids, corpus_dtype,
                            manifest_field, open_tokens, read_manifest, staging_dir, token_dtype, write_manifest)
from meo_ds.data.prepare import StrideSplitter, corpus_key, describe_inputs, select, tokenize_chunks
from meo_ds.data.readers import read_documents
from meo_ds.data.tokenizer import Tokenizer

LM_FORMAT = "meo_ds.lm/1"


def prepare_lm(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, fmt: str = "auto",
               field: str = "text", doc_sep: str = "line", valid_fraction: float = 0.01, num_proc: int = 1,
               dtype: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize documents into an LM shard directory `out`; returns the manifest.

    Re-running with the same inputs/tokenizer/options is a no-op; a directory holding another
    corpus is an error unless `overwrite`. Everything is written to a staging directory first.
    """
    start = time.time()
    tok = Tokenizer(tokenizer)
    np_dtype = token_dtype(tok.vocab_size, dtype)
    described = describe_inputs(inputs)
    options = {"format": fmt, "field": field, "doc_sep": doc_sep, "valid_fraction": valid_fraction,
               "dtype": np_dtype.name}
    key = corpus_key(described, tok.checksum(), options)
    out = Path(out)
    if check_output_dir(out, key, overwrite):
        print(f"{out}: already holds this corpus (same inputs, tokenizer and options); nothing to do")
        return read_manifest(out)
    splitter = StrideSplitter(valid_fraction)
    with staging_dir(out) as tmp:
        writers = {name: TokenFileWriter(tmp, name, np_dtype) for name in ("train", "validation")}
        docs = read_documents(inputs, fmt, field, doc_sep)
        with tqdm(desc="tokenize", unit="doc", disable=not progress) as bar:
            for [(flat, lengths)] in tokenize_chunks(docs, tok.path, num_proc):
                held = splitter.take(len(lengths))
                writers["validation"].add_many(*select(flat, lengths, held), suffix=tok.eos_id)
                writers["train"].add_many(*select(flat, lengths, ~held), suffix=tok.eos_id)
                bar.update(len(lengths))
        splits = {name: w.close() for name, w in writers.items()}
        if splits["train"]["tokens"] < 2:
            raise ValueError("corpus yields fewer than 2 training tokens")
        shutil.copyfile(tok.path, tmp / "tokenizer.model")
        manifest = {
            "format": LM_FORMAT, "task": "lm", "corpus_key": key, "inputs": described, "options": options,
            "tokenizer": {"file": "tokenizer.model", "source": str(tok.path.resolve()), "sha256": tok.checksum(),
                          "vocab_size": tok.vocab_size, "special_ids": tok.special_ids()},
            "dtype": np_dtype.name, "splits": splits,
            "documents": sum(s["sequences"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "seconds": round(time.time() - start, 3),
        }
        write_manifest(tmp, manifest)
    return manifest


class LMDataset:
    """A memory-mapped split of a prepared LM directory (nothing is read until sliced)."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest.get("format") != LM_FORMAT:
            raise ValueError(f"{self.directory}: not an LM corpus (format {self.manifest.get('format')!r})")
        splits = manifest_field(self.manifest, self.directory, "splits")
        if split not in splits:
            raise KeyError(f"{self.directory}: no split {split!r} (it has {', '.join(splits)})")
        self.split = split
        self.entry = splits[split]
        self.vocab_size = int(manifest_field(self.manifest, self.directory, "tokenizer", "vocab_size"))
        self.tokens, self.doc_offsets = open_tokens(self.directory, self.entry,
                                                    corpus_dtype(self.manifest, self.directory))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Ids of document i (int64), ending with eos."""
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]].astype(np.int64)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.directory / self.manifest["tokenizer"]["file"])


class LMLoader:
    """Packed fixed-length LM micro-batches, shuffled per epoch, sharded over data-parallel ranks.

    Sample i is tokens[i*L : i*L+L+1] (L = seq_len): input_ids = its first L, labels = its last L;
    samples run across document boundaries. Each epoch permutes the samples with a generator
    seeded by (seed, epoch); global batch g takes the next dp_world_size*micro_batch_size samples
    of the permutation and rank r takes its r-th slice, so across ranks an epoch visits every
    sample once, except the remainder (< world*micro_batch samples) that does not fill a global
    batch (a different remainder each epoch). Every rank yields len(loader) batches per epoch.

    Iterating yields the remaining batches of the current epoch, then moves to the next epoch;
    `state_dict()` taken after any batch resumes exactly at the next one (also at another
    dp_world_size as long as the samples consumed are a multiple of the new global batch).
    """

    def __init__(self, dataset: LMDataset | str | Path, seq_len: int, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 0, shuffle: bool = True, split: str = "train",
                 reset_at_doc_boundaries: bool = False):
        self.dataset = dataset if isinstance(dataset, LMDataset) else LMDataset(dataset, split)
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world_size})")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError("seq_len and micro_batch_size must be positive")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seed, self.shuffle, self.reset = seed, shuffle, reset_at_doc_boundaries
        self.num_samples = (self.dataset.num_tokens - 1) // seq_len
        self.global_batch = dp_world_size * micro_batch_size
        if len(self) == 0:
            raise ValueError(f"{self.dataset.directory} [{self.dataset.split}]: {self.num_samples} samples of "
                             f"{seq_len + 1} tokens cannot fill one global batch of {self.global_batch}")
        self.epoch, self.step = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (identical on every rank)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def sample_indices(self, epoch: int, step: int) -> np.ndarray:
        """The sample ids of this rank's `step`-th batch of `epoch`."""
        start = step * self.global_batch + self.dp_rank * self.micro_batch_size
        return self.order(epoch)[start:start + self.micro_batch_size]

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        samples = self.sample_indices(epoch, step)
        L, tokens = self.seq_len, self.dataset.tokens
        rows = np.stack([tokens[i * L:i * L + L + 1] for i in samples]).astype(np.int64)
        check_token_ids(rows, self.dataset.vocab_size, self.dataset.directory / self.dataset.entry["file"],
                        lambda r, c: f"token {int(samples[r]) * L + c}")
        out = {"input_ids": torch.from_numpy(rows[:, :-1]), "labels": torch.from_numpy(rows[:, 1:].copy())}
        if self.reset:
            positions = samples[:, None] * L + np.arange(L)
            doc = np.searchsorted(self.dataset.doc_offsets, positions, side="right") - 1
            out["position_ids"] = torch.from_numpy(positions - self.dataset.doc_offsets[doc])
            out["segment_ids"] = torch.from_numpy(doc - doc[:, :1])
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, n = self.epoch, len(self)
        for step in range(self.step, n):
            batch = self.batch(epoch, step)
            self.epoch, self.step = (epoch + 1, 0) if step + 1 == n else (epoch, step + 1)
            yield batch

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches across epochs without end (for step-based training loops)."""
        while True:
            yield from self

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "corpus_sha256": self.dataset.entry["sha256"]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_consumed": self.step * self.global_batch, **self._identity()}

    def check_state(self, state: dict) -> None:
        """StreamMismatch (a ValueError) unless `state` was saved by a loader of this same data stream."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise StreamMismatch(f"loader state does not match this loader: {key} is {state.get(key)!r}, "
                                     f"this loader has {value!r}", key)

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        consumed = state["samples_consumed"]
        if consumed % self.global_batch:
            raise ValueError(f"cannot resume: {consumed} samples consumed is not a multiple of the global batch "
                             f"{self.global_batch} (dp_world_size * micro_batch_size)")
        self.epoch, self.step = state["epoch"], consumed // self.global_batch
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
