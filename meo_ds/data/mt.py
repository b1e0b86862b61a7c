"""Translation corpora: `prepare_mt` cleans, tokenizes and splits pairs; `MTDataset`/`MTLoader` read them.

On disk: for each split ``{split}.src.bin``/``{split}.tgt.bin`` (raw ids, no bos/eos) with offsets
``{split}.src.idx.npy``/``{split}.tgt.idx.npy`` (pair i is ids[off[i]:off[i+1]]; lengths are
the offset differences), ``tokenizer.model`` and ``manifest.json`` (written last).

Batches (see MTLoader): the encoder reads source + eos; the decoder reads bos + target and is
trained to predict target + eos (labels), so decoder_input_ids[:, t+1] == labels[:, t].
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meo_ds.data.batch import IGNORE_INDEX
from meo_ds.data.io import (TokenFileWriter, check_token_ids, corpus_dtype, manifest_field, open_tokens, staging_dir,
                            write_manifest)
from meo_ds.data.loader import CorpusSplit, ResumableLoader
from meo_ds.data.prepare import (SPLITS, HeldOutSplitter, TextOverlap, describe_origin, plan_corpus, plan_held_out,
                                  select, ship_tokenizer, split_origins, text_digest, tokenize_chunks)
from meo_ds.data.readers import CorpusError, pair_format, read_pairs

MT_FORMAT = "meo_ds.mt/1"
FILTERS = ("empty", "duplicate", "max_length", "length_ratio")


def _text_filters(pairs: Iterable[tuple[str, str]], removed: dict, dedup: bool) -> Iterator[tuple[str, str]]:
    seen: set[bytes] = set()
    for src, tgt in pairs:
        removed["read"] += 1
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            removed["empty"] += 1
            continue
        if dedup:
            digest = text_digest((src, tgt))
            if digest in seen:
                removed["duplicate"] += 1
                continue
            seen.add(digest)
        yield src, tgt


def _length_filter(src_lens: np.ndarray, tgt_lens: np.ndarray, removed: dict, max_len: int,
                   max_ratio: float) -> np.ndarray:
    """Keep-mask of a chunk; counts each dropped pair against the first filter that drops it."""
    longer, shorter = np.maximum(src_lens, tgt_lens), np.maximum(1, np.minimum(src_lens, tgt_lens))
    too_long = longer > max_len if max_len else np.zeros(len(longer), dtype=bool)
    bad_ratio = ~too_long & (longer > max_ratio * shorter) if max_ratio else np.zeros(len(longer), dtype=bool)
    removed["max_length"] += int(too_long.sum())
    removed["length_ratio"] += int(bad_ratio.sum())
    return ~(too_long | bad_ratio)


def prepare_mt(inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *, fmt: str = "auto",
               source_field: str = "source", target_field: str = "target", max_len: int = 256,
               max_ratio: float = 3.0, dedup: bool = True, valid: Sequence[str | Path] | None = None,
               test: Sequence[str | Path] | None = None, valid_fraction: float | None = None,
               test_fraction: float | None = None, num_proc: int = 1, dtype: str = "auto", overwrite: bool = False,
               progress: bool = True) -> dict:
    """Clean, tokenize and split a parallel corpus into `out`; returns the manifest.

    Filters of the training inputs, in order (a pair counts against the first that removes it):
    `empty` (either side blank), `duplicate` (exact pair seen before), `max_length` (either side
    > max_len tokens; 0 = off), `length_ratio` (longer side > max_ratio x shorter; 0 = off).

    Held-out splits: `valid` / `test` files (given like `inputs`: SRC TGT aligned files, one TSV
    or one JSON lines file, in format `fmt`) are kept whole: no filter drops a pair of theirs
    (a benchmark must stay the benchmark); a pair with an empty side is an error, a side longer
    than max_len a warning (the trainer's data.seq_len / max_tokens must hold it). Without files a
    split is `valid_fraction` / `test_fraction` (default 0.01 each) of the filtered inputs.
    meo_ds/data/prepare.py says what else is checked (identical files, verbatim overlap).
    """
    start = time.time()
    given, fractions = plan_held_out({"validation": valid, "test": test},
                                     {"validation": valid_fraction, "test": test_fraction},
                                     {"validation": 0.01, "test": 0.01})
    for name, paths in [("train", inputs), *given.items()]:
        try:
            pair_format(paths, fmt)
        except ValueError as err:
            raise ValueError(f"{'training inputs' if name == 'train' else name + ' files'}: {err}") from None
    plan, existing = plan_corpus(inputs, given, tokenizer, dtype, {
        "format": fmt, "source_field": source_field, "target_field": target_field, "max_len": max_len,
        "max_ratio": max_ratio, "dedup": dedup, "valid_fraction": fractions["validation"],
        "test_fraction": fractions["test"]}, out, overwrite, "mt")
    if existing is not None:
        return existing
    described, split_inputs, tok, np_dtype, options, key, out = plan
    removed = dict.fromkeys(("read",) + FILTERS, 0)
    splitter, overlap = HeldOutSplitter(fractions["validation"], fractions["test"]), TextOverlap()
    with staging_dir(out) as tmp, tqdm(desc="tokenize", unit="pair", disable=not progress) as bar:
        writers = {s: (TokenFileWriter(tmp, f"{s}.src", np_dtype), TokenFileWriter(tmp, f"{s}.tgt", np_dtype))
                   for s in SPLITS}
        for name, paths in given.items():  # the small given splits first: their errors come before the long pass
            pairs = overlap.record(name, _given_pairs(read_pairs(paths, fmt, source_field, target_field), name, paths))
            count = longest = 0
            for (src, src_lens), (tgt, tgt_lens) in tokenize_chunks(pairs, tok.path, num_proc):
                writers[name][0].add_many(src, src_lens)
                writers[name][1].add_many(tgt, tgt_lens)
                count, longest = count + len(src_lens), max(longest, int(src_lens.max()), int(tgt_lens.max()))
                bar.update(len(src_lens))
            if count == 0:
                raise CorpusError(f"{_names(paths)}: no {name} pairs (only blank lines)")
            if max_len and longest > max_len:
                print(f"warning: the {name} files hold a side of {longest} tokens, longer than --max-len {max_len}; "
                      f"kept (a given split is never filtered): the trainer's data.seq_len and data.max_tokens "
                      f"must hold it", file=sys.stderr)
        pairs = overlap.watch(_text_filters(read_pairs(inputs, fmt, source_field, target_field), removed, dedup))
        for (src, src_lens), (tgt, tgt_lens) in tokenize_chunks(pairs, tok.path, num_proc):
            keep = _length_filter(src_lens, tgt_lens, removed, max_len, max_ratio)
            codes = np.full(len(keep), -1, dtype=np.int8)
            codes[keep] = splitter.assign(int(keep.sum()))
            for code, name in enumerate(SPLITS):
                if name not in given:
                    writers[name][0].add_many(*select(src, src_lens, codes == code))
                    writers[name][1].add_many(*select(tgt, tgt_lens, codes == code))
            bar.update(len(keep))
        splits = {}
        for name, (src_writer, tgt_writer) in writers.items():
            source, target = src_writer.close(), tgt_writer.close()
            splits[name] = {"pairs": source["sequences"], "source": source, "target": target}
        if splits["train"]["pairs"] == 0:
            raise ValueError(f"no training pairs left after filtering: {removed}")
        overlap.warn("pairs")
        for name, origin in split_origins(SPLITS, split_inputs, fractions, overlap).items():
            splits[name]["origin"] = origin
        kept = sum(s["pairs"] for name, s in splits.items() if name not in given)
        manifest = {
            "format": MT_FORMAT, "task": "mt", "corpus_key": key, "inputs": described, "options": options,
            "tokenizer": ship_tokenizer(tok, tmp),
            "dtype": np_dtype.name, "splits": splits,
            "pairs": {"read": removed["read"], "kept": kept, "removed": {f: removed[f] for f in FILTERS}},
            "tokens": {side: sum(s[side]["tokens"] for s in splits.values()) for side in ("source", "target")},
            "seconds": round(time.time() - start, 3),
        }
        write_manifest(tmp, manifest)
    return manifest


def _names(paths: Sequence[Path]) -> str:
    return " ".join(map(str, paths))


def _given_pairs(pairs: Iterable[tuple[str, str]], split: str, paths: Sequence[Path]) -> Iterator[tuple[str, str]]:
    """The pairs of a given split, each side stripped; a pair with an empty side is an error (never dropped)."""
    for number, (src, tgt) in enumerate(pairs, 1):
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            raise CorpusError(f"{_names(paths)}: {split} pair {number} has an empty {'source' if not src else 'target'};"
                              f" a given split is kept whole (no pair is dropped), so fix or remove that pair")
        yield src, tgt


def print_mt_summary(m: dict, out: Path) -> None:
    """What `meo-prepare` prints about a prepared corpus (its manifest `m`)."""
    pairs = m["pairs"]
    print(f"translation corpus: {out}  dtype {m['dtype']}  vocab {m['tokenizer']['vocab_size']}")
    print(f"  input pairs read {pairs['read']:,}  kept {pairs['kept']:,}  dropped {pairs['read'] - pairs['kept']:,}")
    for name, count in pairs["removed"].items():
        print(f"    removed by {name:<13} {count:>10,}")
    for name, s in m["splits"].items():
        print(f"  {name:<11} {s['pairs']:>10,} pairs {s['source']['tokens']:>12,} source tokens "
              f"{s['target']['tokens']:>12,} target tokens{describe_origin(s.get('origin'))}")
    print(f"  time {m['seconds']:.1f} s")


class MTDataset(CorpusSplit):
    """A memory-mapped split of a prepared translation directory."""

    FORMAT, KIND = MT_FORMAT, "a translation corpus"

    def __init__(self, directory: str | Path, split: str = "train"):
        super().__init__(directory, split)
        dtype = corpus_dtype(self.manifest, self.directory)
        self.src, self.src_offsets = open_tokens(self.directory, manifest_field(self.entry, self.directory, "source"), dtype)
        self.tgt, self.tgt_offsets = open_tokens(self.directory, manifest_field(self.entry, self.directory, "target"), dtype)
        if len(self.src_offsets) != len(self.tgt_offsets):
            raise CorpusError(f"{self.directory / self.entry['target']['index']}: {len(self.tgt_offsets) - 1} targets "
                              f"but {len(self.src_offsets) - 1} sources; prepare the corpus again with --overwrite")
        self.src_lens = np.diff(self.src_offsets)
        self.tgt_lens = np.diff(self.tgt_offsets)

    def __len__(self) -> int:
        return len(self.src_lens)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, target ids) of pair i as int64 arrays, without bos/eos."""
        return (self.src[self.src_offsets[i]:self.src_offsets[i + 1]].astype(np.int64),
                self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]].astype(np.int64))


class MTLoader(ResumableLoader):
    """Token-budget batches of translation pairs with length bucketing, sharded over dp ranks.

    Per epoch: pairs are sorted by padded length max(src+1, tgt+1) (ties broken by a permutation
    seeded by (seed, epoch)), cut greedily into batches of at most `max_tokens` padded tokens
    (batch size x longest padded side; and at most `max_sentences` pairs), and the batch order is
    shuffled with the same generator. Global step g gives rank r batch g*world + r; every rank
    yields len(loader) batches per epoch and the < world leftover batches are skipped that epoch.
    The number of batches depends only on the lengths, so it is the same every epoch.

    Each batch: src_ids [B,S] = source + eos, src_mask (True = real token); decoder_input_ids
    [B,T] = bos + target, labels [B,T] = target + eos with padding -100, tgt_mask; index [B] =
    pair ids in the split. Padding uses the tokenizer's pad id. Resumable like LMLoader.
    """

    MODEL_INPUTS = ("src_ids", "src_mask", "decoder_input_ids", "labels", "tgt_mask")  # not `index`
    STATE_KEY, UNIT = "batches_consumed", "global batches"

    def __init__(self, dataset: MTDataset | str | Path, max_tokens: int, *, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 0, shuffle: bool = True, split: str = "train",
                 max_sentences: int | None = None):
        self.dataset = dataset if isinstance(dataset, MTDataset) else MTDataset(dataset, split)
        super().__init__(dp_rank=dp_rank, dp_world_size=dp_world_size, seed=seed, shuffle=shuffle)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.tokenizer = self.dataset.tokenizer()
        self.cost = np.maximum(self.dataset.src_lens, self.dataset.tgt_lens) + 1
        if len(self.cost) and self.cost.max() > max_tokens:
            raise ValueError(f"{int((self.cost > max_tokens).sum())} pairs need more than max_tokens={max_tokens} "
                             f"(longest side + 1 = {int(self.cost.max())}); raise max_tokens or prepare with a "
                             f"smaller --max-len")
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self.num_global_batches = len(self.batches(0))
        if len(self) == 0:
            raise ValueError(f"{self.dataset.directory} [{self.dataset.split}]: {self.num_global_batches} batches "
                             f"cannot give each of {dp_world_size} ranks one")

    def __len__(self) -> int:
        return self.num_global_batches // self.dp_world_size

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of `epoch` (pair ids), in the order they are served."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.cost)
        ties = rng.permutation(n) if self.shuffle else np.arange(n)
        order = np.lexsort((ties, self.cost))
        batches = self._cut(order)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        cost, limit = self.cost[order], self.max_sentences or len(order)
        bounds, start = [], 0
        for i, c in enumerate(cost.tolist()):
            if (i + 1 - start) * c > self.max_tokens or i - start >= limit:
                bounds.append(i)
                start = i
        return np.split(order, bounds) if len(order) else []

    def pair_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.batches(epoch)[step * self.dp_world_size + self.dp_rank]

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        index = self.pair_indices(epoch, step)
        ds, tok = self.dataset, self.tokenizer
        src_lens, tgt_lens = ds.src_lens[index], ds.tgt_lens[index]
        rows = np.arange(len(index))
        src = _gather(ds.src, ds.src_offsets[index], src_lens, int(src_lens.max()) + 1, tok.pad_id)
        check_token_ids(src, ds.vocab_size, ds.directory / ds.entry["source"]["file"],
                        lambda r, c: f"token {int(ds.src_offsets[index[r]]) + c} (pair {int(index[r])})")
        src[rows, src_lens] = tok.eos_id
        labels = _gather(ds.tgt, ds.tgt_offsets[index], tgt_lens, int(tgt_lens.max()) + 1, IGNORE_INDEX)
        check_token_ids(labels, ds.vocab_size, ds.directory / ds.entry["target"]["file"],
                        lambda r, c: f"token {int(ds.tgt_offsets[index[r]]) + c} (pair {int(index[r])})")
        labels[rows, tgt_lens] = tok.eos_id
        dec = np.where(labels == IGNORE_INDEX, tok.pad_id, labels)
        dec[rows, tgt_lens] = tok.pad_id
        dec = np.concatenate([np.full((len(index), 1), tok.bos_id), dec[:, :-1]], axis=1)
        return {"src_ids": torch.from_numpy(src), "src_mask": torch.from_numpy(_mask(src_lens + 1, src.shape[1])),
                "decoder_input_ids": torch.from_numpy(dec), "labels": torch.from_numpy(labels),
                "tgt_mask": torch.from_numpy(_mask(tgt_lens + 1, labels.shape[1])), "index": torch.from_numpy(index)}

    def _identity(self) -> dict:
        return {"seed": self.seed, "max_tokens": self.max_tokens, "max_sentences": self.max_sentences,
                "shuffle": self.shuffle, "num_pairs": len(self.cost),
                "corpus_sha256": self.dataset.entry["source"]["sha256"] + self.dataset.entry["target"]["sha256"]}

    def _units_per_step(self) -> tuple[int, str]:
        return self.dp_world_size, f"dp_world_size {self.dp_world_size}"


def _mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width) < lengths[:, None]


def _gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int, fill: int) -> np.ndarray:
    """[B, width] int64: row b holds tokens[starts[b]:starts[b]+lengths[b]], then `fill`.

    One fancy-indexing read of the memmap: only the pages of these pairs are touched.
    """
    mask = _mask(lengths, width)
    positions = np.where(mask, starts[:, None] + np.arange(width), 0)
    values = tokens[positions] if len(tokens) else np.zeros(positions.shape, dtype=np.int64)
    return np.where(mask, values.astype(np.int64), fill)
