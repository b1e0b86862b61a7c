"""The shared part of the LM and translation readers: a corpus split, and the resumable loader.

`CorpusSplit` opens one split of a prepared directory (manifest, format, split, vocabulary size,
tokenizer); LMDataset and MTDataset add their memory-mapped token files.

`ResumableLoader` is the iteration and resume contract of LMLoader and MTLoader. A loader serves
len(loader) batches per epoch on every data-parallel rank; batch(epoch, step) is a pure function
of the epoch, the step and the loader's settings, so the position (epoch, step) is all the state
there is. Iterating yields the rest of the current epoch and moves to the next; `forever()`
never ends. `state_dict()` records the position as units consumed (samples for the LM, global
batches for translation: STATE_KEY) together with the loader's identity (`_identity()`: seed,
shapes, corpus checksum). `load_state_dict` refuses a state of another data stream
(StreamMismatch naming the setting) and resumes at the next batch, also at another
dp_world_size as long as the units consumed are a whole number of the new steps.
"""
from __future__ import annotations

import os
from pathlib import Path
from abc import ABC, abstractmethod
from typing import ClassVar, Iterator

import torch

from meo_ds.data.io import StreamMismatch, manifest_field, read_manifest
from meo_ds.data.hf_tokenizer import HFTokenizer, load_tokenizer
from meo_ds.data.tokenizer import Tokenizer


class CorpusSplit:
    """One split of a prepared corpus directory whose manifest has format FORMAT."""

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]  # "an LM corpus", "a translation corpus": for the wrong-format error

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if self.manifest.get("format") != self.FORMAT:
            raise ValueError(f"{self.directory}: not {self.KIND} (format {self.manifest.get('format')!r})")
        splits = manifest_field(self.manifest, self.directory, "splits")
        if split not in splits:
            raise KeyError(f"{self.directory}: no split {split!r} (it has {', '.join(splits)})")
        self.split, self.entry = split, splits[split]
        self.vocab_size = int(manifest_field(self.manifest, self.directory, "tokenizer", "vocab_size"))

    def tokenizer(self) -> Tokenizer | HFTokenizer:
        return load_tokenizer(self.directory / self.manifest["tokenizer"]["file"])


class ResumableLoader(ABC):
    """Epochs of len(self) batches per rank, sharded over data-parallel ranks; exact resume."""

    MODEL_INPUTS: ClassVar[tuple[str, ...]]  # the batch keys the model's forward takes
    STATE_KEY: ClassVar[str]  # the state_dict entry counting the units consumed this epoch
    UNIT: ClassVar[str]  # those units in words, for the resume error

    def __init__(self, *, dp_rank: int, dp_world_size: int, seed: int, shuffle: bool):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world_size})")
        self.dp_rank, self.dp_world_size, self.seed, self.shuffle = dp_rank, dp_world_size, seed, shuffle
        self.epoch, self.step = 0, 0

    # ---------------------------------------------------------------- what a loader defines
    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on every rank."""

    @abstractmethod
    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """This rank's `step`-th batch of `epoch`."""

    @abstractmethod
    def _identity(self) -> dict:
        """The settings and corpus that make this data stream; a resume must match them."""

    @abstractmethod
    def _units_per_step(self) -> tuple[int, str]:
        """Units consumed by one step over all ranks, and how the resume error names that number."""

    # ---------------------------------------------------------------- iteration and resume
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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, self.STATE_KEY: self.step * self._units_per_step()[0], **self._identity()}

    def check_state(self, state: dict) -> None:
        """StreamMismatch (a ValueError) unless `state` was saved by a loader of this same data stream."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise StreamMismatch(f"loader state does not match this loader: {key} is {state.get(key)!r}, "
                                     f"this loader has {value!r}", key)

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        consumed = state[self.STATE_KEY]
        per_step, named = self._units_per_step()
        if consumed % per_step:
            raise ValueError(f"cannot resume: {consumed} {self.UNIT} consumed is not a multiple of {named}")
        self.epoch, self.step = state["epoch"], consumed // per_step
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
