"""The run config's schema: one dataclass per section, every key documented where it is defined.

    task: lm                 # "lm" (language modelling) or "translation"
    name: demo               # run name: logs and checkpoints go to <logging.out_dir>
    model: {preset: lm-tiny, moe: {kind: xmoe}}   # the models package's config (loading.py)
    parallel: {ep_size: 8}   # ParallelConfig: how the model is spread over the ranks
    data: {...}              # DataConfig
    train: {...}             # TrainConfig (batch, optimizer, schedule, precision, stopping)
    checkpoint: {...}        # CheckpointConfig
    logging: {...}           # LoggingConfig
    eval: {...}              # EvalConfig
    debug: {...}             # DebugConfig: fault-injection hooks used by the tests

Sizes from the corpus: `model.vocab_size: auto` and `model.max_seq_len: auto` (the keys in
FROM_CORPUS) are read from the prepared corpus at data.path when the run starts, by pre-flight
on every rank (meo_ds.preflight.resolve_from_corpus): vocab_size = the corpus tokenizer's size,
max_seq_len = the longest sequence the task feeds the model (LM: data.seq_len; translation: the
corpus's longest sentence in any split, + eos/bos). Between loading and pre-flight the model
config holds None there (`RunConfig.unresolved_sizes()`); every config the trainer writes
(config.json, the checkpoints' saved config) holds the numbers, so resume and export see a
fixed model whatever the corpus becomes.

`RunConfig.validate(world_size)` lists every problem of the values (one ConfigError); the
expert-parallel size is checked against the model's MoE layers and the world size by
meo_ds.parallel.ep_size_problems, the same check `parallelize` makes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from meo_ds.moe.config import MoEConfig
from meo_ds.parallel import ep_size_problems

from .convert import to_dict
from .errors import ConfigError, listing

Task = Literal["lm", "translation"]
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["auto", "cosine", "inverse_sqrt", "constant"]

AUTO = "auto"
FROM_CORPUS = ("vocab_size", "max_seq_len")  # model keys that may be `auto` (module docstring)


def split_auto_sizes(model_tree: dict) -> tuple[dict, list[str]]:
    """A model mapping -> (the mapping without its `auto` sizes, the FROM_CORPUS keys that were `auto`).
    `auto` on any other model key is a ConfigError."""
    auto = [k for k, v in model_tree.items() if v == AUTO and k in FROM_CORPUS]
    other = [k for k, v in model_tree.items() if v == AUTO and k not in FROM_CORPUS]
    if other:
        raise ConfigError(f"model.{other[0]}=auto: only {' and '.join('model.' + k for k in FROM_CORPUS)} can be "
                          f"auto (read from the corpus); give model.{other[0]} a value")
    return {k: v for k, v in model_tree.items() if k not in auto}, auto
DEFAULT_LM_MICRO_BATCH = 8  # train.micro_batch_size when an LM run leaves it unset


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    # Directory written by `meo-prepare` (token shards + tokenizer). Required.
    path: str = ""
    # LM: tokens per training sequence. Translation: maximum source/target length in tokens.
    seq_len: int = 128
    # Translation: the token budget of one micro-batch per rank. A batch of B pairs costs B x the
    # longest padded side (max over its pairs of source + eos and bos + target), so the padded
    # source [B, S] and the padded target [B, T] each hold at most max_tokens tokens (padding
    # included; MTLoader). Ignored by the LM (its batch is train.micro_batch_size x data.seq_len).
    max_tokens: int = 2048
    # The split of `path` evaluated during and after training: `validation`, or `test` (a corpus prepared
    # with `meo-prepare ... --test FILE...` or, for translation by default, --test-fraction).
    val_split: str = "validation"
    # Shuffle seed of the training stream (the data order is a pure function of it and the step).
    seed: int = 1234
    # Check every shard against the manifest's sha256 before training (once per machine; reads the
    # whole corpus). Off: only the cheap checks (sizes, indexes; token ids batch by batch).
    verify: bool = False


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    # LM only: sequences of data.seq_len tokens per rank per micro-step (unset: 8). Translation
    # sizes a micro-batch by data.max_tokens instead; leave this unset there (1 is accepted).
    micro_batch_size: Optional[int] = None
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 10
    # "auto": warmup + cosine for LM, warmup + inverse square root for translation.
    schedule: Schedule = "auto"
    weight_decay: float = 0.1  # never applied to norms, biases, router/gate weights
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables); written into the DS config
    # None: take it from the DeepSpeed config; else it must agree with it.
    precision: Optional[Precision] = None
    seed: int = 1234
    # Stop the run after this many consecutive optimizer steps with a non-finite loss.
    max_nonfinite_in_a_row: int = 5
    # Collectives that wait longer than this fail (a dead rank makes the others exit).
    dist_timeout_s: float = 300.0


@dataclass
class CheckpointConfig:
    # "" -> <logging.out_dir>/checkpoints
    dir: str = ""
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # keep the newest K complete checkpoints
    save_at_end: bool = True
    save_initial: bool = False  # also save the untrained weights as step 0
    # "auto": resume from <dir>/latest when it exists; "none": start fresh; else a checkpoint dir.
    resume: str = "auto"
    # Start from these model weights (a checkpoint dir, or a tag dir inside one) when not resuming.
    init_from: str = ""


@dataclass
class LoggingConfig:
    out_dir: str = "runs/default"  # metrics.jsonl, train.log, monitor output, checkpoints
    interval: int = 10  # one log line every N steps (rank 0)
    throughput_warmup_steps: int = 2  # tokens/s excludes the first N steps (compilation, caches)
    # Which accelerator's peak FLOPS to use for MFU; "auto" detects it (CPU: MFU is n/a).
    peak_flops_device: str = "auto"


@dataclass
class EvalConfig:
    interval: int = 0  # evaluate every N steps (0: only at the end)
    at_end: bool = True
    max_batches: int = 20  # validation micro-batches per rank
    # Translation: BLEU/chrF with beam search on the first N validation pairs.
    bleu: bool = True
    bleu_sentences: int = 200
    beam_size: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0


@dataclass
class DebugConfig:
    """Fault-injection hooks for the tests. Leave them at their defaults for real runs."""

    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps
    die_at_step: int = 0  # rank `die_rank` exits abruptly at the start of this step
    die_in_save_at_step: int = 0  # rank `die_rank` exits in the middle of this step's checkpoint
    die_rank: int = 1
    step_sleep_s: float = 0.0  # sleep after each step (lets a test signal a run mid-way)


@dataclass
class ParallelConfig:
    """How the model is spread over the ranks (applied by meo_ds.parallel.parallelize)."""

    # Expert parallelism: the experts of every top-k/XMoE layer are sharded over groups of ep_size
    # ranks (tokens travel by all-to-all); MEO layers and dense weights stay data-parallel. Must
    # divide the world size and every such layer's num_experts; 1 for models without such layers.
    ep_size: int = 1


@dataclass
class RunConfig:
    task: Task = "lm"
    name: str = "run"
    model: Any = None  # the models package's config dataclass (resolved from a preset)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # ----------------------------------------------------------------- derived values
    @property
    def schedule(self) -> str:
        if self.train.schedule != "auto":
            return self.train.schedule
        return "cosine" if self.task == "lm" else "inverse_sqrt"

    @property
    def micro_batch_size(self) -> int:
        """Per rank per micro-step what DeepSpeed counts as a batch: LM sequences (train.micro_batch_size,
        unset: 8); translation 1 (one data.max_tokens budget)."""
        if self.task == "translation":
            return 1
        return DEFAULT_LM_MICRO_BATCH if self.train.micro_batch_size is None else self.train.micro_batch_size

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or os.path.join(self.logging.out_dir, "checkpoints"))

    def unresolved_sizes(self) -> list[str]:
        """The FROM_CORPUS model keys still waiting for pre-flight to read them from the corpus (`auto`)."""
        return [k for k in FROM_CORPUS if self.model is not None and getattr(self.model, k, 0) is None]

    def moe_configs(self) -> list[MoEConfig]:
        return list(iter_moe_configs(self.model))

    def to_dict(self) -> dict:
        return to_dict(self)

    # ----------------------------------------------------------------- checks
    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        problems = list(self._problems(world_size))
        if problems:
            raise ConfigError(listing("invalid run config", problems))
        return self

    def _problems(self, world_size: Optional[int]) -> Iterator[str]:
        t, c = self.train, self.checkpoint
        if self.task not in ("lm", "translation"):
            yield f"task={self.task!r} is unknown; use 'lm' or 'translation'"
        if self.model is None:
            yield "model is missing; set model.preset (a name in meo_ds/presets or a YAML file)"
        if not self.data.path:
            yield "data.path is empty; point it at a directory written by `meo-prepare`"
        for name in ("seq_len", "max_tokens"):
            if getattr(self.data, name) < 1:
                yield f"data.{name}={getattr(self.data, name)} must be >= 1"
        if self.data.seed < 0:
            yield f"data.seed={self.data.seed} must be >= 0 (it seeds numpy's generator of the data order)"
        if not t.dist_timeout_s > 0:
            yield f"train.dist_timeout_s={t.dist_timeout_s} must be > 0 (seconds a collective may wait)"
        if not (0 <= t.betas[0] < 1 and 0 <= t.betas[1] < 1) or not t.eps > 0:
            yield f"train.betas={list(t.betas)} must lie in [0, 1) and train.eps={t.eps} must be > 0"
        for name in ("steps", "grad_accum"):
            if getattr(t, name) < 1:
                yield f"train.{name}={getattr(t, name)} must be >= 1"
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            yield f"train.micro_batch_size={t.micro_batch_size} must be >= 1"
        elif self.task == "translation" and t.micro_batch_size not in (None, 1):
            yield (f"train.micro_batch_size={t.micro_batch_size} does not apply to translation: a micro-batch is "
                   f"one data.max_tokens={self.data.max_tokens} token budget of pairs; remove "
                   f"train.micro_batch_size and size batches with data.max_tokens")
        if not t.lr > 0:
            yield f"train.lr={t.lr} must be > 0"
        if t.warmup_steps < 0:
            yield f"train.warmup_steps={t.warmup_steps} must be >= 0"
        if t.schedule == "inverse_sqrt" and t.warmup_steps < 1:
            yield "train.schedule=inverse_sqrt needs train.warmup_steps >= 1"
        if not 0 <= t.min_lr_ratio <= 1:
            yield f"train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]"
        if t.grad_clip < 0:
            yield f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)"
        if t.precision not in (None, "fp32", "bf16", "fp16"):
            yield f"train.precision={t.precision!r} is unknown; use fp32, bf16, fp16 or null (from the DS config)"
        if t.max_nonfinite_in_a_row < 1:
            yield f"train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row} must be >= 1"
        if c.interval < 0 or c.keep_last < 1:
            yield "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1"
        if self.logging.interval < 1:
            yield f"logging.interval={self.logging.interval} must be >= 1"
        if self.eval.beam_size < 1:
            yield f"eval.beam_size={self.eval.beam_size} must be >= 1"
        if self.eval.interval < 0 or self.eval.max_batches < 1:
            yield "eval.interval must be >= 0 and eval.max_batches >= 1"
        if self.logging.throughput_warmup_steps < 0:
            yield f"logging.throughput_warmup_steps={self.logging.throughput_warmup_steps} must be >= 0"
        yield from self._moe_problems(world_size)

    def _moe_problems(self, world_size: Optional[int]) -> Iterator[str]:
        if self.model is None:
            return
        for moe in self.moe_configs():
            try:
                moe.validate()
            except ValueError as err:
                yield str(err)
                return
        yield from ep_size_problems(self.parallel.ep_size, self.moe_configs(), world_size)


def iter_moe_configs(obj: Any) -> Iterator[MoEConfig]:
    """Every MoEConfig inside a (nested) model config dataclass."""
    if isinstance(obj, MoEConfig):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_moe_configs(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_moe_configs(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_moe_configs(v)
