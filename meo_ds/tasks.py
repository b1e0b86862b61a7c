"""What differs between the trainer's two tasks, behind one object each: `task_for(cfg)`.

    task = task_for(cfg)                         # LMTask (task: lm) or TranslationTask (task: translation)
    task.dataset("train"); task.loader(split, rank, world, shuffle)     # the corpus and its loader
    task.check_fits_model(dataset)               # the corpus fits model.max_seq_len (ConfigError)
    task.longest_sequence()                      # what `model.max_seq_len: auto` becomes (config/schema.py)
    task.batch_size_advice()                     # which setting sizes a batch (for the too-small-corpus error)
    task.token_counts(source, target)            # a step's counted tokens by their logged names
    task.train_flops(model).per_token(routing)   # model and executed training FLOPs per counted token
    task.evaluate(engine, val_loader, device)    # validation loss/perplexity; translation adds BLEU/chrF

The rest is the same for both and lives with the data: a loader names the batch keys its model
takes (`loader.MODEL_INPUTS`, used through meo_ds.data.batch.model_inputs), and the tokens a batch
counts are its labels that are not padding (meo_ds.data.batch.target_tokens) and, for an
encoder, its real source tokens (meo_ds.data.batch.source_tokens). The trainer
(meo_ds/train.py) asks the task and never the task's name.

Counted tokens and FLOPs: the LM counts every position of a packed sequence of data.seq_len
tokens ("tokens", and tokens/s) and its FLOPs are the model's at that length; translation
counts source tokens (source + eos, padding excluded: "source_tokens") and target tokens
(labels, eos included: "target_tokens"), logged and timed separately. The loss is a mean per
target token, and translation FLOPs are per target token, at the training corpus's mean source
and target lengths (+1 each: eos on the source, bos/eos on the target), the encoder's cost spread
over the target tokens; MFU uses the target tokens/s (FLOPS_TOKENS).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from meo_ds import evaluate as ev
from meo_ds import metrics
from meo_ds.config import ConfigError, RunConfig
from meo_ds.data import LMDataset, LMLoader, MTDataset, MTLoader
from meo_ds.data.io import manifest_field, read_manifest


class Task(ABC):
    """The task-specific parts of one run (`cfg`)."""

    NAME: ClassVar[str]  # the run config's `task`
    PREPARE_NAME: ClassVar[str]  # `meo-prepare demo --task` of its corpus
    FLOPS_TOKENS: ClassVar[str]  # the token_counts name that FLOPs per token (and so MFU) refer to

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def dataset(self, split: str = "train") -> Any:
        """The memory-mapped `split` of data.path (LMDataset / MTDataset)."""

    @abstractmethod
    def loader(self, split: str, rank: int, world: int, shuffle: bool = True) -> Any:
        """Rank `rank`'s loader of `split` among `world` data-parallel ranks (LMLoader / MTLoader)."""

    @abstractmethod
    def check_fits_model(self, dataset: Any) -> None:
        """ConfigError unless the sequences of `dataset` fit model.max_seq_len."""

    @abstractmethod
    def longest_sequence(self) -> int:
        """The longest sequence (tokens) this run feeds the model: `model.max_seq_len: auto`."""

    @abstractmethod
    def batch_size_advice(self) -> str:
        """Which setting to change when a split cannot fill one global batch."""

    @abstractmethod
    def token_counts(self, source: int, target: int) -> dict[str, int]:
        """The tokens a step counted (summed `source_tokens` and `target_tokens` of its batches) by the
        names the log line, metrics.jsonl and the monitor give them."""

    @abstractmethod
    def train_flops(self, model: torch.nn.Module) -> metrics.TrainFlops:
        """Training (forward + backward) FLOPs per counted token as the model accounts them (model
        and executed, from an interval's routing: metrics.TrainFlops)."""

    def scores(self, model: torch.nn.Module, device: torch.device) -> dict:
        """Scores beyond the validation loss (translation: BLEU/chrF); none by default."""
        return {}

    def evaluate(self, engine: Any, val_loader: Any, device: torch.device) -> dict:
        """Validation loss and perplexity, then `scores`, in eval mode without gradients. Collective."""
        with ev.evaluation_mode(engine):
            result = ev.validation_loss(engine, val_loader, self.cfg.eval.max_batches, device)
            result.update(self.scores(engine.module, device))
        return result


class LMTask(Task):
    NAME, PREPARE_NAME, FLOPS_TOKENS = "lm", "lm", "tokens"

    def dataset(self, split: str = "train") -> LMDataset:
        return LMDataset(self.cfg.data.path, split)

    def loader(self, split: str, rank: int, world: int, shuffle: bool = True) -> LMLoader:
        cfg = self.cfg
        return LMLoader(cfg.data.path, seq_len=cfg.data.seq_len, micro_batch_size=cfg.micro_batch_size,
                        dp_rank=rank, dp_world_size=world, seed=cfg.data.seed, shuffle=shuffle, split=split)

    def check_fits_model(self, dataset: LMDataset) -> None:
        seq_len, max_len = self.cfg.data.seq_len, getattr(self.cfg.model, "max_seq_len", None)
        if max_len is not None and seq_len > max_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={max_len}; lower one or raise the other")

    def longest_sequence(self) -> int:
        """data.seq_len: every training and validation sequence has that length."""
        return self.cfg.data.seq_len

    def batch_size_advice(self) -> str:
        return f"lower train.micro_batch_size={self.cfg.micro_batch_size} or data.seq_len={self.cfg.data.seq_len}"

    def token_counts(self, source: int, target: int) -> dict[str, int]:
        """Every predicted position (no source side)."""
        return {"tokens": target}

    def train_flops(self, model: torch.nn.Module) -> metrics.TrainFlops:
        """At data.seq_len."""
        return metrics.TrainFlops(model, self.cfg.data.seq_len)


class TranslationTask(Task):
    NAME, PREPARE_NAME, FLOPS_TOKENS = "translation", "mt", "target_tokens"

    def dataset(self, split: str = "train") -> MTDataset:
        return MTDataset(self.cfg.data.path, split)

    def loader(self, split: str, rank: int, world: int, shuffle: bool = True) -> MTLoader:
        cfg = self.cfg
        return MTLoader(cfg.data.path, max_tokens=cfg.data.max_tokens, dp_rank=rank, dp_world_size=world,
                        seed=cfg.data.seed, shuffle=shuffle, split=split)

    def check_fits_model(self, dataset: MTDataset) -> None:
        max_len = getattr(self.cfg.model, "max_seq_len", None)
        if max_len is None:
            return
        longest = max(int(dataset.src_lens.max(initial=0)), int(dataset.tgt_lens.max(initial=0))) + 1
        if longest > max_len:
            raise ConfigError(f"the {dataset.split} split of {dataset.directory} holds a sentence of {longest} tokens "
                              f"(with eos/bos) but model.max_seq_len={max_len}; raise model.max_seq_len or prepare "
                              f"the corpus with --max-len {max_len - 1}")

    def longest_sequence(self) -> int:
        """The longest source or target sentence of any split of the corpus, + 1 (eos on the source,
        bos/eos on the target): every pair the run trains or evaluates on fits."""
        longest = 0
        for split in manifest_field(read_manifest(self.cfg.data.path), self.cfg.data.path, "splits"):
            ds = self.dataset(split)
            longest = max(longest, int(ds.src_lens.max(initial=0)), int(ds.tgt_lens.max(initial=0)))
        return longest + 1

    def batch_size_advice(self) -> str:
        return f"change data.max_tokens={self.cfg.data.max_tokens}"

    def token_counts(self, source: int, target: int) -> dict[str, int]:
        return {"source_tokens": source, "target_tokens": target}

    def train_flops(self, model: torch.nn.Module) -> metrics.TrainFlops:
        """Per target token, at the training corpus's mean sentence lengths."""
        ds = self.dataset("train")
        return metrics.TrainFlops(model, float(ds.src_lens.mean()) + 1, float(ds.tgt_lens.mean()) + 1)

    def scores(self, model: torch.nn.Module, device: torch.device) -> dict:
        return ev.bleu_chrf(model, self.cfg, device) if self.cfg.eval.bleu else {}


TASKS: dict[str, type[Task]] = {t.NAME: t for t in (LMTask, TranslationTask)}


def task_for(cfg: RunConfig) -> Task:
    """The Task object of `cfg.task`."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is unknown; use one of {', '.join(repr(n) for n in TASKS)}")
    return TASKS[cfg.task](cfg)
