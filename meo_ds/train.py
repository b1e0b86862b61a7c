"""The DeepSpeed trainer for MoE language models and translation models.

    deepspeed --num_gpus 8 --module meo_ds.train --config run.yaml \\
        --deepspeed_config ds_configs/zero2_bf16.json --set model.moe.kind=xmoe
    meo-train ...            # the same, on the ranks the environment already describes

Every rank first runs the pre-flight checks (meo_ds/preflight.py: configs, paths, corpus, and
what a resume or init_from would load), before the process group exists and before anything is
written (`ConfigError` -> one line and exit status 2 on every rank). Rank 0 then locks the run
directory (meo_ds/run_lock.py: one job per directory). Then `Trainer` owns the run: setup
(process group with a timeout, model, parallelize, parameter groups, engine, loaders, resume;
config.json is written once resume succeeded; weights-only starts that involve ZeRO-3 are
consolidated into the model before the engine), the step loop, evaluation, checkpoints, and
stopping (SIGTERM/SIGINT, non-finite losses, a dead rank). Whatever depends on the task (lm or
translation: corpus, loader, fit checks, FLOPs per token, evaluation) the trainer asks of
`task_for(cfg)` (meo_ds/tasks.py); what a batch feeds the model and how many tokens it counts
comes from meo_ds/data/batch.py.

Per step the ranks agree on a `StepSums` (non-finite flag, stop flag, token-weighted loss sums,
counted tokens), one all_reduce per micro-batch; the log line sums the steps' results in a
`LogWindow`. Throughput counts the tokens the task names (Task.token_counts: LM "tokens";
translation "source_tokens" and "target_tokens", each timed separately) over the steps after
logging.throughput_warmup_steps of this process: the log line shows it ("tok/s", or "src tok/s"
and "tgt tok/s"), and every metrics.jsonl record carries the step's counts and the rate so far
(`<name>_per_s`, null during the warm-up).

Exit status: 0 done (or stopped by a signal after saving), 2 bad input (config, paths, corpus,
a checkpoint that does not fit, a run directory in use; also a corrupt shard met mid-run),
3 non-finite losses, 4 a collective failed (a peer rank stuck past train.dist_timeout_s, or dead;
the line names the collective, its ranks and our call site), 5 a checkpoint could not be written
(disk full, read-only), 1 anything else.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from meo_ds import checkpoint as ckpt
from meo_ds import distributed
from meo_ds import metrics
from meo_ds.distributed import describe_collective_failure, free_port, init_distributed, rank_device
from meo_ds.config import ConfigError, RunConfig, zero_stage
from meo_ds.data.batch import model_inputs, source_tokens, target_tokens
from meo_ds.data.readers import CorpusError
from meo_ds.fileio import atomic_write
from meo_ds.moe.experts import deferred_experts
from meo_ds.optim import SkippableAdamW, lr_at, param_groups, set_lr
from meo_ds.parallel import parallelize
from meo_ds.preflight import check_checkpoints, load_configs
from meo_ds.run_lock import RunDirBusy, lock_run_dirs
from meo_ds.tasks import task_for

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_COLLECTIVE = 4  # a collective timed out or lost a peer: some rank is stuck or dead
EXIT_SAVE = 5  # a checkpoint could not be written (disk full, read-only, no permission)


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meo-train", description="Train an MoE model with DeepSpeed (LM or translation).")
    p.add_argument("--config", required=True, help="run config (YAML/JSON): task, model preset, data, train, ...")
    p.add_argument("--deepspeed_config", "--ds_config", dest="ds_config", required=True, help="DeepSpeed JSON config (ds_configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.moe.kind=xmoe (repeatable)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- model
def build_model(cfg: RunConfig) -> torch.nn.Module:
    from meo_ds import models

    return models.build_model(cfg.model)


# --------------------------------------------------------------------------- stopping
class StopSignal:
    """SIGTERM/SIGINT set a flag; the ranks agree on it at the next step (all_reduce)."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class StepSums:
    """What the ranks agree on in one optimizer step: per micro-batch one all_reduce of `stack(...)`
    sums these over the ranks, and `+` sums the reduced values over the micro-batches (float64)."""

    nonfinite: float = 0.0  # micro-batches whose loss is not finite on some rank
    stop: float = 0.0  # ranks that caught a stop signal
    loss_tokens: float = 0.0  # task loss x target tokens
    tokens: float = 0.0  # target tokens
    aux: float = 0.0  # MoE auxiliary loss
    nll_tokens: float = 0.0  # cross-entropy x target tokens
    source_tokens: float = 0.0  # real source tokens (an encoder's inputs; 0 for the LM)

    @classmethod
    def stack(cls, **values: torch.Tensor) -> torch.Tensor:
        """The fields' values (0-d float64 tensors, by field name) as one tensor to reduce."""
        return torch.stack([values[f.name] for f in fields(cls)])

    @classmethod
    def of(cls, reduced: torch.Tensor) -> "StepSums":
        """From a `stack` tensor the seam reduced (already on the host: reading it costs no sync)."""
        return cls(*reduced.tolist())

    def __add__(self, other: "StepSums") -> "StepSums":
        return StepSums(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass
class StepResult:
    loss: float  # mean task loss (the training objective) per target token over all ranks (nan when skipped)
    nll: float  # mean cross-entropy per target token (= loss unless the objective is label-smoothed)
    aux: float
    tokens: int  # target tokens (the loss's weight)
    source_tokens: int
    skipped: bool
    stop: bool
    grad_norm: Optional[float]


@dataclass
class LogWindow:
    """The steps since the last log line (host numbers from the StepResults)."""

    loss_tokens: float = 0.0  # sum of loss x tokens over the steps that updated
    nll_tokens: float = 0.0
    aux: float = 0.0
    tokens: int = 0
    steps: int = 0  # steps that updated
    skipped: int = 0  # steps skipped for a non-finite loss
    grad_norm: Optional[float] = None  # of the last step that updated

    def add(self, r: StepResult) -> None:
        if r.skipped:
            self.skipped += 1
            return
        self.loss_tokens += r.loss * r.tokens
        self.nll_tokens += r.nll * r.tokens
        self.tokens += r.tokens
        self.aux += r.aux
        self.steps += 1
        self.grad_norm = r.grad_norm

    def per_token(self, total: float) -> float:
        return total / self.tokens if self.tokens else float("nan")


@dataclass
class StartPoint:
    """The checkpoint a run starts from: a resume (exact: everything restored; else weights only)
    or init_from (weights only)."""

    point: ckpt.ResumePoint
    resume: bool
    exact: bool


# --------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict) -> None:
        self.cfg, self.ds_config = cfg, ds_config
        self.task = task_for(cfg)
        self.out_dir = Path(cfg.logging.out_dir)
        self.stop_signal = StopSignal()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.start_time = time.time()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        init_distributed(cfg.train.dist_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = rank_device()
        self._prepare_dirs()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with deferred_experts():  # experts take memory only once parallelize has kept this rank's
            model = build_model(cfg)
        model = parallelize(model, cfg.parallel.ep_size, use_data_before_expert_parallel=bool(
            self.ds_config.get("use_data_before_expert_parallelism", False)))
        with self._checkpoint_errors():
            start = self._start_point()
            preloaded = self._load_weights_before_engine(model, start)
        self.optimizer = SkippableAdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                        betas=tuple(cfg.train.betas), eps=cfg.train.eps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.flops = self.task.train_flops(model)
        self.loader = self.task.loader("train", self.rank, self.world)
        self.val_loader = self.task.loader(cfg.data.val_split, self.rank, self.world, shuffle=False)
        self._seed_rank()
        with self._checkpoint_errors():
            self._load_start_point(start, preloaded)
        self._write_run_config()
        self.log(f"run {cfg.name}: task={cfg.task} world={self.world} ep={cfg.parallel.ep_size} "
                 f"zero={self.engine.zero_optimization_stage()} precision={cfg.train.precision} "
                 f"params={sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} (this rank) "
                 f"device={metrics.device_name()}")

    def _prepare_dirs(self) -> None:
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_incomplete(self.cfg.checkpoint_dir)
            if removed:
                self.log(f"removed incomplete checkpoint(s) {removed} left by an interrupted save")
            ckpt.repair_latest(self.cfg.checkpoint_dir, log=self.log)
        dist.barrier()

    def _write_run_config(self) -> None:
        """config.json describes the checkpoints in out_dir: written only once resume succeeded."""
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def _seed_rank(self) -> None:
        import random

        import numpy as np

        seed = self.cfg.train.seed + 1000 * (self.rank + 1)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- resume
    @contextlib.contextmanager
    def _checkpoint_errors(self) -> Iterator[None]:
        """A damaged or unsafe checkpoint (CheckpointError, agreed by every rank) ends the run with
        exit status 2 and one line naming the file, before any weight is loaded."""
        try:
            yield
        except ckpt.CheckpointError as err:
            if self.rank == 0 or not err.all_ranks:
                print(f"[meo-train] checkpoint error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CONFIG) from err

    def _start_point(self) -> Optional[StartPoint]:
        """What this run starts from: a resume (exact, or weights only at another layout) or
        init_from (weights only); None: fresh weights."""
        cfg = self.cfg
        point = ckpt.resolve(cfg.checkpoint.resume, cfg.checkpoint_dir)
        if point is not None:
            return StartPoint(point, resume=True, exact=ckpt.exact_resume(point, self.world, cfg.parallel.ep_size,
                                                                          self.zero3))
        if cfg.checkpoint.init_from:
            return StartPoint(ckpt.resolve(cfg.checkpoint.init_from, cfg.checkpoint_dir), resume=False, exact=False)
        return None

    @property
    def zero3(self) -> bool:
        return zero_stage(self.ds_config) == 3

    def _load_weights_before_engine(self, model: nn.Module, start: Optional[StartPoint]) -> bool:
        """A weights-only start with ZeRO-3 on either side: DeepSpeed reads only the files of its
        own regime (ZeRO-3 partitions vs ZeRO 0-2's or meo-upcycle's whole module), and its ZeRO-3
        weights-only load (zero_to_fp32) unpickles the optimizer files with weights_only=False. So
        the tag is consolidated here (checksums, safe_load; meo_ds/export/consolidate.py reads
        both) and loaded into the model before deepspeed.initialize. Such models have no
        expert-parallel layers (ZeRO-3 refuses them, and the architecture is the checkpoint's).
        Every rank reads the whole model on the CPU (and hashes its share of the files). Returns
        whether it loaded."""
        if start is None or start.exact:
            return False
        if not self.zero3 and ckpt.holds_whole_module(start.point):  # ZeRO 0-2 on both sides: DeepSpeed's load
            return False
        from meo_ds.export.consolidate import consolidate

        point = start.point
        try:  # every rank reads the same files, so every rank raises the same error
            weights = consolidate(point.load_dir, point.tag, collective=True)
            model.load_state_dict(weights.state_dict, strict=True)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(str(err), all_ranks=True) from None
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{point.path} does not fit the model: {str(err).splitlines()[0]}",
                                       all_ranks=True) from None
        for note in weights.notes:
            self._warn(note)
        return True

    def _load_start_point(self, start: Optional[StartPoint], preloaded: bool) -> None:
        if start is None:
            return
        if start.resume:
            self._resume(start, preloaded)
            return
        if not preloaded:
            self._warn(ckpt.load_engine_checkpoint(self.engine, start.point, load_module_only=True,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False))
        self.log(f"initialised model weights from {start.point.path}")

    def _warn(self, note: Optional[str]) -> None:
        if note:
            self.log(f"warning: {note}")

    def _resume(self, start: StartPoint, preloaded: bool) -> None:
        point = start.point
        info = ckpt.read_marker(point.path)
        if start.exact:
            self._warn(ckpt.load_engine_checkpoint(self.engine, point))
        elif not preloaded:
            self._warn(ckpt.load_engine_checkpoint(self.engine, point, load_module_only=True,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False))
        state = ckpt.load_rank_state(point, self.rank) if start.exact else None
        self.step = int(info["step"])
        if self.rank == 0:  # the steps after the checkpoint are trained (and logged) again
            for name in ("metrics.jsonl", "eval.jsonl", "intervals.jsonl"):
                ckpt.truncate_log(self.out_dir / name, self.step)
        if state is not None:
            self.loader.load_state_dict(state["data"])
            self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
            ckpt.set_rng_state(state["rng"])
            self.log(f"resumed exactly from {point.path} at step {self.step}")
            return
        self._carry_data_position(point)
        self.log(
            f"resumed model weights from {point.path} (step {self.step}), saved at world size "
            f"{info.get('world_size')} / ep {info.get('ep_size')}, now {self.world} / ep {self.cfg.parallel.ep_size}"
            f"{'' if ckpt.holds_whole_module(point) != self.zero3 else self._zero_change()}. "
            f"NOT carried over: optimizer state (AdamW moments; the schedule continues at step {self.step}), "
            f"per-rank RNG streams"
        )

    def _zero_change(self) -> str:
        return ", ZeRO 0-2 then, ZeRO-3 now" if self.zero3 else ", ZeRO-3 then, ZeRO 0-2 now"

    def _carry_data_position(self, point: ckpt.ResumePoint) -> None:
        state = ckpt.load_rank_state(point, 0)
        try:
            self.loader.load_state_dict(state["data"])
        except (ValueError, KeyError, TypeError) as err:
            self.log(f"data position NOT carried over ({err}); the data stream restarts")

    # ---------------------------------------------------------------- loop
    def train(self) -> int:
        cfg = self.cfg
        self.routing = metrics.RoutingAccumulator()
        self.window = LogWindow()
        self.timed_counts: dict[str, int] = {}
        self.timed_since: Optional[float] = None
        self.steps_this_run = 0
        self.data_iter: Iterator[dict] = self.loader.forever()
        if cfg.checkpoint.save_initial and self.step == 0:
            self.save()
        while self.step < cfg.train.steps:
            self.step += 1
            self._debug_die(cfg.debug.die_at_step)
            result = self.train_step()
            self._after_step(result)
            if result.stop:
                self.log(f"stopping on {self.stop_signal.name or 'a signal on another rank'} after step {self.step}")
                self.save()
                return 0
        self._finish()
        return 0

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches.

        Per micro-batch the ranks agree (one all-reduce through meo_ds.distributed, whose host
        read-back is the step's one host sync per micro-batch) on: a non-finite loss anywhere
        (then every rank backpropagates a zero loss and the step is skipped), a stop signal, and
        the loss/aux/nll sums. Routing statistics stay on the device until the log interval."""
        cfg, engine = self.cfg, self.engine
        set_lr(self.optimizer, self.lr())
        sums = StepSums()
        gnorm = None
        for micro in range(cfg.train.grad_accum):
            batch = next(self.data_iter)
            out = engine(**model_inputs(batch, self.device, self.loader.MODEL_INPUTS))
            loss, aux, nll = out.loss.float(), out.aux_loss.float(), out.nll_loss.float()
            if self.step in cfg.debug.nan_at_steps:
                loss = loss * float("nan")
            tokens = target_tokens(batch)
            stop = loss.new_full((), float(self.stop_signal.requested), dtype=torch.float64)  # fills: no host copy
            local = StepSums.stack(nonfinite=(~torch.isfinite(loss + aux)).double(), stop=stop,
                                   loss_tokens=loss.double() * tokens, tokens=stop.new_full((), tokens),
                                   aux=aux.double(), nll_tokens=nll.double() * tokens,
                                   source_tokens=stop.new_full((), source_tokens(batch)))
            flags = StepSums.of(distributed.all_reduce(local.detach()))
            bad = flags.nonfinite > 0
            engine.backward(self._zero_loss() if bad else loss + aux)
            if micro == cfg.train.grad_accum - 1:
                self.optimizer.skip_next_step = sums.nonfinite > 0 or bad
                gnorm = self._grad_norm_before_step()
            engine.step()
            sums += flags if not bad else StepSums(nonfinite=1.0, stop=flags.stop)
            self.routing.add(out.stats)
        return self._step_result(sums, gnorm)

    def _step_result(self, sums: StepSums, gnorm: Optional[float]) -> StepResult:
        """StepResult from the host sums of train_step (no collective, no device read but the norm)."""
        skipped, tokens = sums.nonfinite > 0, int(sums.tokens)
        if gnorm is None and not skipped:
            value = self.engine.get_global_grad_norm()
            gnorm = float(value) if value is not None else None
        per_token = (lambda total: total / tokens) if tokens and not skipped else (lambda total: float("nan"))
        return StepResult(
            loss=per_token(sums.loss_tokens), nll=per_token(sums.nll_tokens),
            aux=sums.aux / (self.world * self.cfg.train.grad_accum), tokens=tokens,
            source_tokens=int(sums.source_tokens), skipped=skipped, stop=sums.stop > 0, grad_norm=gnorm,
        )

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss touching every parameter: keeps the collectives of backward in step."""
        return sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0

    def _grad_norm_before_step(self) -> Optional[float]:
        """Stage 0 fp32: DeepSpeed keeps no norm and its clip averages per-rank norms, which is not
        the global norm under expert parallelism; compute the exact one (expert grads summed over
        the EP group) and clip with it."""
        if self.engine.zero_optimization() or self.engine.bfloat16_enabled() or self.engine.fp16_enabled():
            return None
        from deepspeed.moe.utils import is_moe_param
        from deepspeed.utils import groups

        # Squared norms summed on the device; one reduce per expert group, then one host read.
        dense, expert = None, {}
        for p in self.engine.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if is_moe_param(p):
                expert[p.group_name] = sq if p.group_name not in expert else expert[p.group_name] + sq
            else:
                dense = sq if dense is None else dense + sq
        total = 0.0 if dense is None else float(dense)
        for name, sq in sorted(expert.items()):
            total += float(distributed.all_reduce(sq.reshape(1), group=groups._get_expert_parallel_group(name))[0])
        norm = math.sqrt(total)
        clip = self.cfg.train.grad_clip
        if clip > 0 and norm > clip:  # exact global clip; DeepSpeed's stage-0 clip then finds nothing to do
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        return norm

    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.step, schedule=self.cfg.schedule, lr=t.lr, warmup=t.warmup_steps, total=t.steps,
                     min_ratio=t.min_lr_ratio)

    # ---------------------------------------------------------------- after a step
    def _after_step(self, r: StepResult) -> None:
        cfg = self.cfg
        self._account(r)
        self._record_step(r)
        if r.skipped:
            self.nonfinite_in_a_row += 1
            self.log(f"non-finite loss at step {self.step}: step skipped (no update; "
                     f"{self.nonfinite_in_a_row} in a row, limit {cfg.train.max_nonfinite_in_a_row})")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLoss(f"stopping: {self.nonfinite_in_a_row} consecutive steps with a non-finite loss "
                                    f"(last at step {self.step}); lower train.lr, check the data, or resume "
                                    f"from an earlier checkpoint")
        else:
            self.nonfinite_in_a_row = 0
        if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
            self._log_interval()
        if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step != cfg.train.steps:
            self.evaluate()
        if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step != cfg.train.steps and not r.stop:
            self.save()
        if cfg.debug.step_sleep_s:
            time.sleep(cfg.debug.step_sleep_s)

    def _account(self, r: StepResult) -> None:
        self.window.add(r)
        self.steps_this_run += 1
        if self.timed_since is not None:
            for name, count in self.task.token_counts(r.source_tokens, r.tokens).items():
                self.timed_counts[name] = self.timed_counts.get(name, 0) + count
        elif self.steps_this_run >= self.cfg.logging.throughput_warmup_steps:
            self.timed_since, self.timed_counts = time.time(), {}  # the clock starts after the warm-up steps

    def _record_step(self, r: StepResult) -> None:
        if self.rank != 0:
            return
        rec = {"step": self.step, "loss": r.loss if not r.skipped else None, "nll": r.nll if not r.skipped else None,
               "aux": r.aux, "lr": self.lr(),
               "grad_norm": r.grad_norm, **self.task.token_counts(r.source_tokens, r.tokens), **self.throughput(),
               "skipped": r.skipped, "time": time.time() - self.start_time}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def throughput(self) -> dict[str, Optional[float]]:
        """{<counted name>_per_s: tokens per second since the warm-up, or None before any timed step}
        for every name of Task.token_counts (LM: tokens_per_s; translation: source_ and target_)."""
        elapsed = None if self.timed_since is None else max(1e-9, time.time() - self.timed_since)
        rates: dict[str, Optional[float]] = {}
        for name in self.task.token_counts(0, 0):  # the names, in the task's order
            count = self.timed_counts.get(name, 0)
            rates[f"{name}_per_s"] = count / elapsed if elapsed and count else None
        return rates

    def _log_interval(self) -> None:
        w, cfg = self.window, self.cfg
        global_loads, details = self._global_routing_loads()
        loss, nll = w.per_token(w.loss_tokens), w.per_token(w.nll_tokens)
        rates = self.throughput()
        peak = metrics.peak_flops(metrics.device_name() if cfg.logging.peak_flops_device == "auto"
                                  else cfg.logging.peak_flops_device, cfg.train.precision)
        routing = self.routing.summary(global_loads)
        flops = self.flops.per_token(routing)  # model and executed FLOPs/token of this interval; MFU from executed
        m = {"step": self.step, "loss": loss, "ppl": metrics.safe_ppl(nll), "aux": w.aux / max(1, w.steps),
             "lr": self.lr(), "grad_norm": w.grad_norm, **rates, **flops,
             "mfu": metrics.mfu(rates[f"{self.task.FLOPS_TOKENS}_per_s"] or 0.0, flops["executed_flops_per_token"],
                                peak, self.world),
             "routing": routing, "skipped": w.skipped}
        self.log(metrics.format_line(m))
        self._monitor(m)
        self._record_interval(m, details)
        self.routing.reset()
        self.window = LogWindow()

    def _global_routing_loads(self) -> tuple[Optional[list[torch.Tensor]], list[dict]]:
        """The interval's expert loads summed over the ranks, and the per-layer details of
        RoutingAccumulator.split_reduced (loads, experts-per-token histogram, a2a bytes/token)."""
        parts = self.routing.reduction_parts()
        if not parts:
            return None, []
        flat = distributed.all_reduce(torch.cat([p.flatten() for p in parts]))
        return self.routing.split_reduced(list(flat.split([p.numel() for p in parts])))

    def _record_interval(self, m: dict, details: list[dict]) -> None:
        """intervals.jsonl (rank 0): the log line's figures plus per-layer routing details, for meo-study."""
        if self.rank != 0:
            return
        rec = {**m, "flops_tokens": self.task.FLOPS_TOKENS, "time": time.time() - self.start_time,
               "routing": [{**r, **d} for r, d in zip(m["routing"], details)] if details else m["routing"]}
        with open(self.out_dir / "intervals.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _write_summary(self, elapsed: float) -> None:
        """summary.json (rank 0) at the end of a run: steps, this process's wall time, and the peak
        memory of the busiest rank (accelerator: max allocated; CPU: the process's max RSS)."""
        from deepspeed.accelerator import get_accelerator

        if self.device.type == "cpu":
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        else:
            peak = get_accelerator().max_memory_allocated()
        peak = distributed.all_reduce_max_int(int(peak))
        if self.rank == 0:
            summary = {"steps": self.step, "wall_s": elapsed, "world_size": self.world, "peak_memory_bytes": peak,
                       "peak_memory_kind": "max RSS" if self.device.type == "cpu" else "max allocated",
                       **self.throughput()}
            atomic_write(self.out_dir / "summary.json", json.dumps(summary, indent=2))  # meo-study: "finished"

    def _monitor(self, m: dict, prefix: str = "Train") -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False):
            return
        events = [(f"{prefix}/{k}", float(v), self.step) for k, v in m.items()
                  if isinstance(v, (int, float)) and v is not None and k != "step" and math.isfinite(float(v))]
        for i, r in enumerate(m.get("routing") or []):
            events += [(f"{prefix}/moe_layer{i}/{k}", float(v), self.step) for k, v in r.items() if math.isfinite(v)]
        monitor.write_events(events)

    # ---------------------------------------------------------------- evaluation, checkpoints, end
    def evaluate(self) -> dict:
        rng = ckpt.rng_state()  # evaluation never changes the training trajectory
        try:
            result = self.task.evaluate(self.engine, self.val_loader, self.device)
        finally:
            ckpt.set_rng_state(rng)
        self.log("eval  | step " + str(self.step) + " | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in result.items() if k != "samples"))
        self._monitor({k: v for k, v in result.items() if isinstance(v, (int, float))}, prefix="Eval")
        if self.rank == 0:
            with open(self.out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **result}) + "\n")
        return result

    def save(self) -> None:
        cfg = self.cfg
        if (cfg.checkpoint_dir / ckpt.tag_for(self.step) / ckpt.COMPLETE).is_file():
            return  # already saved (a finished run started again): never rewrite the checkpoint `latest` names
        client = {"trainer_step": self.step, "config": cfg.to_dict(), "world_size": self.world}
        rank_state = {"step": self.step, "data": self.loader.state_dict(), "rng": ckpt.rng_state(),
                      "nonfinite_in_a_row": self.nonfinite_in_a_row}
        hook = None
        if cfg.debug.die_in_save_at_step == self.step:
            hook = lambda: self._debug_die(self.step)  # noqa: E731
        result = ckpt.save(self.engine, cfg.checkpoint_dir, self.step, client, rank_state, cfg.checkpoint.keep_last,
                           mid_save_hook=hook, info={"ep_size": cfg.parallel.ep_size})
        self.log(f"saved checkpoint {result.path}" + (f" (removed {result.removed})" if result.removed else ""))

    def _finish(self) -> None:
        cfg = self.cfg
        if cfg.eval.at_end:
            self.evaluate()
        if cfg.checkpoint.save_at_end:
            self.save()
        elapsed = time.time() - self.start_time
        self._write_summary(elapsed)
        self.log(f"done: {self.step} steps in {elapsed:.1f} s" + metrics.format_throughput_summary(self.throughput())
                 + f"; logs in {self.out_dir}, checkpoints in {cfg.checkpoint_dir}")

    def _debug_die(self, step: int) -> None:
        if step and step == self.step and self.rank == self.cfg.debug.die_rank:
            print(f"[rank {self.rank}] debug: dying at step {self.step}", file=sys.stderr, flush=True)
            os._exit(17)

    def log(self, text: str) -> None:
        if getattr(self, "rank", 0) != 0:
            return
        line = f"[meo-train] {text}"
        print(line, flush=True)
        if self.out_dir.is_dir():
            with open(self.out_dir / "train.log", "a") as f:
                f.write(line + "\n")


# --------------------------------------------------------------------------- entry point
def single_process_env() -> None:
    """`meo-train` run directly (no launcher): one rank on this machine."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run_dirs(cfg: RunConfig) -> list[Path]:
    """The directories one job owns: out_dir, and the checkpoint directory when it lies elsewhere."""
    out, ckpt_dir = Path(cfg.logging.out_dir).resolve(), cfg.checkpoint_dir.resolve()
    return [out] if ckpt_dir == out or out in ckpt_dir.parents else [out, ckpt_dir]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    single_process_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    locks = []
    try:
        try:
            cfg, ds = load_configs(args, world)
            locks = lock_run_dirs(*run_dirs(cfg)) if os.environ.get("RANK", "0") == "0" else []
            # under the lock: another job could be saving or pruning them
            check_checkpoints(cfg, world, zero_stage(ds) == 3)
        except (ConfigError, RunDirBusy, ValueError, KeyError, OSError) as err:
            print(f"[meo-train] configuration error: {err}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        return run(cfg, ds)
    finally:
        for lock in locks:
            lock.release()


def run(cfg: RunConfig, ds: dict) -> int:
    trainer = Trainer(cfg, ds)
    try:
        trainer.setup()
        code = trainer.train()
    except NonFiniteLoss as err:
        trainer.log(str(err))
        print(f"[meo-train] {err}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except (CorpusError, ckpt.CheckpointSaveError) as err:  # one line; the launcher stops the other ranks
        trainer.log(f"error: {err}")
        print(f"[meo-train] error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG if isinstance(err, CorpusError) else EXIT_SAVE
    except RuntimeError as err:  # after the line above: CheckpointSaveError is a RuntimeError too
        failure = describe_collective_failure(err)
        if failure is None:
            raise
        # No barrier or destroy_process_group: a peer is gone, they would wait for it.
        print(f"[meo-train] {failure}; stopping with exit status {EXIT_COLLECTIVE}", file=sys.stderr, flush=True)
        return EXIT_COLLECTIVE
    dist.barrier()
    dist.destroy_process_group()
    return code


def cli() -> NoReturn:
    """`meo-train` and `python -m meo_ds.train` (every launched rank): main(), then end the process
    through distributed.exit_process (why not plain sys.exit: its docstring)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
