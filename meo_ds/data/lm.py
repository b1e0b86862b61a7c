"""Language-modelling corpora: `prepare_lm` writes token shards; `LMDataset`/`LMLoader` read them.

On disk (one directory): ``train.bin``/``validation.bin`` (and ``test.bin`` when asked for) hold
every document's ids followed by eos, back to back, as raw uint16/uint32; ``*.idx.npy`` hold
document start offsets (n_docs + 1, int64); ``tokenizer.model`` (SentencePiece) or
``tokenizer.json`` with its special-token files (HuggingFace) is a copy of the tokenizer;
``manifest.json`` describes it all (the tokenizer's kind and special ids included) and is
written last, so a directory without it is never read. A document's ids are the tokenizer's
encoding: SentencePiece adds no bos; a HuggingFace tokenizer adds what its post-processor adds
(Llama 3: bos, Qwen2: nothing) (meo_ds/data/hf_tokenizer.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meo_ds.data.io import TokenFileWriter, check_token_ids, corpus_dtype, open_tokens, staging_dir, write_manifest
from meo_ds.data.loader import CorpusSplit, ResumableLoader
from meo_ds.data.prepare import (SPLITS, HeldOutSplitter, TextOverlap, describe_origin, plan_corpus, plan_held_out,
                                  select, ship_tokenizer, split_origins, tokenize_chunks)
from meo_ds.data.readers import read_documents

LM_FORMAT = "meo_ds.lm/1"


def prepare_lm(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, fmt: str = "auto",
               field: str = "text", doc_sep: str = "line", valid: Sequence[str | Path] | None = None,
               test: Sequence[str | Path] | None = None, valid_fraction: float | None = None,
               test_fraction: float | None = None, num_proc: int = 1, dtype: str = "auto", overwrite: bool = False,
               progress: bool = True) -> dict:
    """Tokenize documents into an LM shard directory `out`; returns the manifest.

    Splits: `train` always, `validation` always (the files `valid`, else `valid_fraction` of the
    inputs, default 0.01), `test` when `test` files or a `test_fraction` > 0 are given. Given
    files are read in the inputs' format (`fmt`, `field`, `doc_sep`; a `datasets` DatasetDict
    directory through its split of the same name) and keep every document, as training does;
    meo_ds/data/prepare.py says what is checked (identical files, verbatim overlap).
    Re-running with the same inputs/tokenizer/options is a no-op; a directory holding another
    corpus is an error unless `overwrite`. Everything is written to a staging directory first.
    """
    start = time.time()
    given, fractions = plan_held_out({"validation": valid, "test": test},
                                     {"validation": valid_fraction, "test": test_fraction},
                                     {"validation": 0.01, "test": 0.0})
    names = [n for n in SPLITS if n != "test" or "test" in given or fractions["test"] > 0]
    plan, existing = plan_corpus(inputs, given, tokenizer, dtype, {
        "format": fmt, "field": field, "doc_sep": doc_sep, "valid_fraction": fractions["validation"],
        "test_fraction": fractions["test"]}, out, overwrite, "lm")
    if existing is not None:
        return existing
    described, split_inputs, tok, np_dtype, options, key, out = plan
    splitter, overlap = HeldOutSplitter(fractions["validation"], fractions["test"]), TextOverlap()
    with staging_dir(out) as tmp, tqdm(desc="tokenize", unit="doc", disable=not progress) as bar:
        writers = {name: TokenFileWriter(tmp, name, np_dtype) for name in names}
        for name, paths in given.items():  # the small given splits first: their errors come before the long pass
            docs = overlap.record(name, read_documents(paths, fmt, field, doc_sep, split=name))
            for [(flat, lengths)] in tokenize_chunks(docs, tok.path, num_proc):
                writers[name].add_many(flat, lengths, suffix=tok.eos_id)
                bar.update(len(lengths))
        docs = overlap.watch(read_documents(inputs, fmt, field, doc_sep))
        for [(flat, lengths)] in tokenize_chunks(docs, tok.path, num_proc):
            codes = splitter.assign(len(lengths))
            for code, name in enumerate(SPLITS):
                if name in writers and name not in given:
                    writers[name].add_many(*select(flat, lengths, codes == code), suffix=tok.eos_id)
            bar.update(len(lengths))
        splits = {name: w.close() for name, w in writers.items()}
        if splits["train"]["tokens"] < 2:
            raise ValueError("corpus yields fewer than 2 training tokens")
        overlap.warn("documents")
        for name, origin in split_origins(names, split_inputs, fractions, overlap).items():
            splits[name]["origin"] = origin
        manifest = {
            "format": LM_FORMAT, "task": "lm", "corpus_key": key, "inputs": described, "options": options,
            "tokenizer": ship_tokenizer(tok, tmp),
            "dtype": np_dtype.name, "splits": splits,
            "documents": sum(s["sequences"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "seconds": round(time.time() - start, 3),
        }
        write_manifest(tmp, manifest)
    return manifest


def print_lm_summary(m: dict, out: Path) -> None:
    """What `meo-prepare` prints about a prepared corpus (its manifest `m`)."""
    print(f"lm corpus: {out}  dtype {m['dtype']}  vocab {m['tokenizer']['vocab_size']}")
    for name, s in m["splits"].items():
        print(f"  {name:<11} {s['sequences']:>10,} documents {s['tokens']:>14,} tokens{describe_origin(s.get('origin'))}")
    print(f"  total       {m['documents']:>10,} documents {m['tokens']:>14,} tokens  ({m['seconds']:.1f} s)")


class LMDataset(CorpusSplit):
    """A memory-mapped split of a prepared LM directory (nothing is read until sliced)."""

    FORMAT, KIND = LM_FORMAT, "an LM corpus"

    def __init__(self, directory: str | Path, split: str = "train"):
        super().__init__(directory, split)
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


class LMLoader(ResumableLoader):
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

    MODEL_INPUTS = ("input_ids", "labels", "position_ids", "segment_ids")
    STATE_KEY, UNIT = "samples_consumed", "samples"

    def __init__(self, dataset: LMDataset | str | Path, seq_len: int, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 0, shuffle: bool = True, split: str = "train",
                 reset_at_doc_boundaries: bool = False):
        self.dataset = dataset if isinstance(dataset, LMDataset) else LMDataset(dataset, split)
        super().__init__(dp_rank=dp_rank, dp_world_size=dp_world_size, seed=seed, shuffle=shuffle)
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError("seq_len and micro_batch_size must be positive")
        self.seq_len, self.micro_batch_size, self.reset = seq_len, micro_batch_size, reset_at_doc_boundaries
        self.num_samples = (self.dataset.num_tokens - 1) // seq_len
        self.global_batch = dp_world_size * micro_batch_size
        if len(self) == 0:
            raise ValueError(f"{self.dataset.directory} [{self.dataset.split}]: {self.num_samples} samples of "
                             f"{seq_len + 1} tokens cannot fill one global batch of {self.global_batch}")
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

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "corpus_sha256": self.dataset.entry["sha256"]}

    def _units_per_step(self) -> tuple[int, str]:
        return self.global_batch, f"the global batch {self.global_batch} (dp_world_size * micro_batch_size)"
