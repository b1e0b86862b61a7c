"""The DeepSpeed trainer for MoE language models and translation models.

    deepspeed --num_gpus 8 --module meo_ds.train --config run.yaml \\
        --deepspeed_config ds_configs/zero2_bf16.json --set model.moe.kind=xmoe
    meo-train ...            # the same, on the ranks the environment already describes

Every rank reads and checks its inputs first, before the process group exists and before
anything is written (`ConfigError` -> one line and exit status 2 on every rank): both configs,
the output paths, the corpus (manifest, file sizes, indexes, and that it fills one global batch
of the train and validation splits; with data.verify also every checksum), and what a resume or
init_from would load (the checkpoint exists, has the same model architecture and, at the same
world/ep size, the same data stream). Rank 0 then locks the run directory (meo_ds/run_lock.py:
one job per directory). Then `Trainer` owns the run: setup (process group with a timeout,
model, parameter groups, engine, loaders, resume; config.json is written once resume succeeded),
the step loop, evaluation, checkpoints, and stopping (SIGTERM/SIGINT, non-finite losses, a dead
rank).

Exit status: 0 done (or stopped by a signal after saving), 2 bad input (config, paths, corpus,
a checkpoint that does not fit, a run directory in use; also a corrupt shard met mid-run),
3 non-finite losses, 4 a collective failed (a peer rank stuck past train.dist_timeout_s, or dead;
the line names the collective, its ranks and our call site), 5 a checkpoint could not be written
(disk full, read-only), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from meo_ds import checkpoint as ckpt
from meo_ds import distributed
from meo_ds import metrics
from meo_ds.distributed import describe_collective_failure, init_distributed
from meo_ds.config import (ConfigError, RunConfig, build_model_config, iter_moe_configs, load_ds_config,
                           load_run_config, reconcile_ds_config)
from meo_ds.data.io import StreamMismatch
from meo_ds.data.readers import CorpusError
from meo_ds.optim import SkippableAdamW, lr_at, param_groups, set_lr
from meo_ds.run_lock import RunDirBusy, lock_run_dirs

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


def accelerator_kind() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def load_configs(args: argparse.Namespace, world_size: int) -> tuple[RunConfig, dict]:
    """Both configs, checked against each other, the world size, the paths and the corpus.
    Raises ConfigError (or a ValueError/OSError naming the file). See also check_checkpoints."""
    cfg = load_run_config(args.config, args.set)
    cfg.validate(world_size)
    ds = reconcile_ds_config(cfg, load_ds_config(args.ds_config), world_size, accelerator_kind())
    check_paths(cfg)
    check_data(cfg, world_size)
    return cfg, ds


def check_paths(cfg: RunConfig) -> None:
    """logging.out_dir and the checkpoint directory are (or can be created as) writable directories."""
    for key, path in (("logging.out_dir", Path(cfg.logging.out_dir)), ("checkpoint.dir", cfg.checkpoint_dir)):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={str(path)!r} is a file, not a directory; choose another {key}")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}={str(path)!r} lies under {str(existing)!r}, which is a file; choose another {key}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={str(path)!r}: {str(existing)!r} is not writable (permissions or a read-only "
                              f"file system); choose another {key}")


def check_data(cfg: RunConfig, world_size: int = 1) -> None:
    """The corpus exists, passes the cheap checks (data.verify: the full one), fits the model
    (vocabulary, sequence length) and fills one global batch of the train and validation splits."""
    path = Path(cfg.data.path)
    if not (path / "manifest.json").is_file():
        raise ConfigError(
            f"data.path={str(path)!r} holds no prepared corpus (no manifest.json); prepare one with "
            f"`meo-prepare demo --task {'lm' if cfg.task == 'lm' else 'mt'} --out {path}` or `meo-prepare lm|mt ...`"
        )
    if cfg.data.verify and os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine
        from meo_ds.data.verify import verify_corpus

        verify_corpus(path)
    ds = train_dataset(cfg)
    vocab = ds.tokenizer().vocab_size
    model_vocab = getattr(cfg.model, "vocab_size", None)
    if model_vocab is not None and vocab > model_vocab:
        raise ConfigError(f"the tokenizer of {path} has {vocab} tokens but model.vocab_size={model_vocab}; "
                          f"set --set model.vocab_size={vocab}")
    max_len = getattr(cfg.model, "max_seq_len", None)
    if cfg.task == "lm" and max_len is not None and cfg.data.seq_len > max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={max_len}; lower one or raise the other")
    if cfg.task == "translation" and max_len is not None:
        longest = max(int(ds.src_lens.max(initial=0)), int(ds.tgt_lens.max(initial=0))) + 1
        if longest > max_len:
            split = ds.split
            raise ConfigError(f"the {split} split of {path} holds a sentence of {longest} tokens (with eos/bos) but "
                              f"model.max_seq_len={max_len}; raise model.max_seq_len or prepare the corpus with "
                              f"--max-len {max_len - 1}")
    for split in ("train", cfg.data.val_split):
        check_loader(cfg, split, world_size)


def check_loader(cfg: RunConfig, split: str, world_size: int) -> Any:
    """Rank 0's loader of `split` (every rank gets as many batches); ConfigError if there is none."""
    try:
        return build_loader(cfg, split, 0, world_size, shuffle=split == "train")
    except KeyError as err:
        raise ConfigError(f"data.path={cfg.data.path!r} has no split {split!r} ({err.args[0]}); "
                          f"set data.val_split to one it has") from None
    except ValueError as err:
        if isinstance(err, CorpusError):
            raise
        size = (f"lower train.micro_batch_size={cfg.train.micro_batch_size} or data.seq_len={cfg.data.seq_len}"
                if cfg.task == "lm" else f"change data.max_tokens={cfg.data.max_tokens}")
        more = "prepare a larger corpus" + (" or a larger --valid-fraction" if split != "train" else "")
        raise ConfigError(f"{err}; {size}, run on fewer ranks, or {more}") from None


def check_checkpoints(cfg: RunConfig, world_size: int) -> None:
    """What checkpoint.resume / init_from would load exists, holds the same model architecture,
    and (a resume at the same world and ep size, which continues the data stream) the same data
    stream (data.path, data.seq_len / max_tokens, data.seed)."""
    try:
        point = ckpt.resolve(cfg.checkpoint.resume, cfg.checkpoint_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: {err} (use auto, none, a checkpoint "
                          f"directory or one of its step_* tags)") from None
    key = "checkpoint.resume"
    if point is None and cfg.checkpoint.init_from:
        key = "checkpoint.init_from"
        try:
            point = ckpt.resolve(cfg.checkpoint.init_from, cfg.checkpoint_dir)
        except FileNotFoundError as err:
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from!r}: {err}") from None
        if point is None:
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from!r} names no checkpoint")
    if point is None:
        return
    saved = saved_run_config(point, key)
    check_same_model(cfg, saved, point, key)
    if key == "checkpoint.resume":
        check_same_data_stream(cfg, point, world_size)


def saved_run_config(point: ckpt.ResumePoint, key: str) -> dict:
    """The run config the trainer stored with a checkpoint (client_state['config'] of its main file,
    `mp_rank_00_model_states.pt`, or rank 0's under ZeRO-3), read memory-mapped through
    checkpoint.safe_load: no code runs, no tensor is read."""
    from meo_ds.export.consolidate import MAIN_FILE

    names = (MAIN_FILE, "zero_pp_rank_0_" + MAIN_FILE)
    path = next((point.path / n for n in names if (point.path / n).is_file()), point.path / MAIN_FILE)
    try:
        main = ckpt.safe_load(path, mmap=True)
    except ckpt.CheckpointError as err:
        raise ConfigError(f"{key}: {err}; resume from an earlier tag with --set {key}=<dir>/<tag>") from None
    tree = main.get("config") if isinstance(main, dict) else None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{key}: {path} records no run config; it was not written by meo-train")
    return tree


def _param_shapes(model_cfg: Any) -> dict[str, tuple]:
    from meo_ds import models

    for moe in iter_moe_configs(model_cfg):
        moe.ep_size = 1  # the full set of experts: independent of the expert-parallel layout
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in models.build_model(model_cfg).state_dict().items()}


def check_same_model(cfg: RunConfig, saved: dict, point: ckpt.ResumePoint, key: str) -> None:
    import copy

    try:
        then = build_model_config(copy.deepcopy(saved["model"]), cfg.task)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{key}: the model of {point.path} cannot be rebuilt ({err}); is it a {cfg.task} "
                          f"checkpoint?") from None
    if _param_shapes(then) == _param_shapes(copy.deepcopy(cfg.model)):
        return
    now_tree, then_tree = _flat(cfg.to_dict()["model"]), _flat(saved["model"])
    diffs = [f"{k}={now_tree.get(k)!r} (checkpoint: {then_tree.get(k)!r})" for k in sorted(set(now_tree) | set(then_tree))
             if now_tree.get(k) != then_tree.get(k) and not k.endswith("ep_size")]
    raise ConfigError(f"{key}: {point.path} holds another model architecture: {', '.join(diffs) or 'parameter shapes'}"
                      f"; keep the checkpoint's model settings, or start a new run in another logging.out_dir")


def _flat(tree: dict, prefix: str = "model") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


DATA_KEYS = {"seq_len": "data.seq_len", "seed": "data.seed", "max_tokens": "data.max_tokens",
             "max_sentences": "data.max_tokens", "shuffle": "data.path", "num_samples": "data.path / data.seq_len",
             "num_pairs": "data.path", "corpus_sha256": "data.path"}


def check_same_data_stream(cfg: RunConfig, point: ckpt.ResumePoint, world_size: int) -> None:
    """At the same world/ep size a resume continues the data stream exactly: it must be the same one."""
    info = json.loads((point.path / ckpt.COMPLETE).read_text())
    if info.get("world_size") != world_size or info.get("ep_size") != cfg.ep_size:
        return  # another layout: the trainer carries the position over only where it can, and says so
    state = ckpt.load_rank_state(point, 0)
    if not state or "data" not in state:
        return
    loader = build_loader(cfg, "train", 0, world_size)
    try:
        loader.check_state(state["data"])
    except StreamMismatch as err:
        field = DATA_KEYS.get(err.key, "the data settings")
        raise ConfigError(f"checkpoint.resume: {point.path} continues another data stream ({err}); keep "
                          f"{field} as it was, or train these weights on new data with --set "
                          f"checkpoint.init_from={point.path} in another logging.out_dir") from None


def train_dataset(cfg: RunConfig) -> Any:
    from meo_ds import data

    if cfg.task == "lm":
        return data.LMDataset(cfg.data.path, "train")
    return data.MTDataset(cfg.data.path, "train")


# --------------------------------------------------------------------------- models / data integration
def build_model(cfg: RunConfig) -> torch.nn.Module:
    from meo_ds import models

    return models.build_model(cfg.model)


def train_flops(model: torch.nn.Module, cfg: RunConfig) -> metrics.TrainFlops:
    """Training (forward + backward) FLOPs per trained token as the model accounts them: LM at
    data.seq_len; translation per target token at the training corpus's mean sentence lengths."""
    if cfg.task == "lm":
        return metrics.TrainFlops(model, cfg.data.seq_len)
    ds = train_dataset(cfg)
    return metrics.TrainFlops(model, float(ds.src_lens.mean()) + 1, float(ds.tgt_lens.mean()) + 1)


def build_loader(cfg: RunConfig, split: str, rank: int, world: int, shuffle: bool = True) -> Any:
    from meo_ds import data

    if cfg.task == "lm":
        return data.LMLoader(cfg.data.path, seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                             dp_rank=rank, dp_world_size=world, seed=cfg.data.seed, shuffle=shuffle, split=split)
    return data.MTLoader(cfg.data.path, max_tokens=cfg.data.max_tokens, dp_rank=rank, dp_world_size=world,
                         seed=cfg.data.seed, shuffle=shuffle, split=split)


MODEL_INPUTS = ("input_ids", "labels", "position_ids", "segment_ids", "src_ids", "src_mask",
                "decoder_input_ids", "tgt_mask")


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and torch.is_tensor(v)}


def target_tokens(batch: dict) -> int:
    return int((batch["labels"] != -100).sum())


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
class StepResult:
    loss: float  # mean task loss (the training objective) per target token over all ranks (nan when skipped)
    nll: float  # mean cross-entropy per target token (= loss unless the objective is label-smoothed)
    aux: float
    tokens: int
    skipped: bool
    stop: bool
    grad_norm: Optional[float]


# --------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict) -> None:
        self.cfg, self.ds_config = cfg, ds_config
        self.out_dir = Path(cfg.logging.out_dir)
        self.stop_signal = StopSignal()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.start_time = time.time()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        cfg = self.cfg
        init_distributed(cfg.train.dist_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(get_accelerator().device_name(), get_accelerator().current_device()) \
            if get_accelerator().device_name() != "cpu" else torch.device("cpu")
        self._prepare_dirs()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        self.optimizer = SkippableAdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                        betas=tuple(cfg.train.betas), eps=cfg.train.eps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.flops = train_flops(model, cfg)
        self.loader = build_loader(cfg, "train", self.rank, self.world)
        self.val_loader = build_loader(cfg, cfg.data.val_split, self.rank, self.world, shuffle=False)
        self._seed_rank()
        self._resume_or_init()
        self._write_run_config()
        self.log(f"run {cfg.name}: task={cfg.task} world={self.world} ep={cfg.ep_size} "
                 f"zero={self.engine.zero_optimization_stage()} precision={cfg.train.precision} "
                 f"params={sum(p.numel() for p in model.parameters()):,} (this rank) device={metrics.device_name()}")

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
    def _resume_or_init(self) -> None:
        """A damaged or unsafe checkpoint (CheckpointError, agreed by every rank) ends the run with
        exit status 2 and one line naming the file, before any weight is loaded."""
        try:
            self._load_start_point()
        except ckpt.CheckpointError as err:
            if self.rank == 0 or not err.all_ranks:
                print(f"[meo-train] checkpoint error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CONFIG) from err

    def _load_start_point(self) -> None:
        cfg = self.cfg
        point = ckpt.resolve(cfg.checkpoint.resume, cfg.checkpoint_dir)
        if point is not None:
            self._resume(point)
        elif cfg.checkpoint.init_from:
            init = ckpt.resolve(cfg.checkpoint.init_from, cfg.checkpoint_dir)
            self._warn(ckpt.load_engine_checkpoint(self.engine, init, load_module_only=True,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False))
            self.log(f"initialised model weights from {init.path}")

    def _warn(self, note: Optional[str]) -> None:
        if note:
            self.log(f"warning: {note}")

    def _resume(self, point: ckpt.ResumePoint) -> None:
        info = ckpt.read_marker(point.path)
        same_layout = info.get("world_size") == self.world and info.get("ep_size") == self.cfg.ep_size
        if same_layout:
            self._warn(ckpt.load_engine_checkpoint(self.engine, point))
        else:
            self._warn(ckpt.load_engine_checkpoint(self.engine, point, load_module_only=True,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False))
        state = ckpt.load_rank_state(point, self.rank) if same_layout else None
        self.step = int(info["step"])
        if self.rank == 0:  # the steps after the checkpoint are trained (and logged) again
            for name in ("metrics.jsonl", "eval.jsonl"):
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
            f"{info.get('world_size')} / ep {info.get('ep_size')}, now {self.world} / ep {self.cfg.ep_size}. "
            f"NOT carried over: optimizer state (AdamW moments; the schedule continues at step {self.step}), "
            f"per-rank RNG streams"
        )

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
        self.window = {"loss_tokens": 0.0, "nll_tokens": 0.0, "aux": 0.0, "tokens": 0, "n": 0, "skipped": 0, "gnorm": None}
        self.timed_tokens, self.timed_since, self.steps_this_run = 0, None, 0
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
        sums = torch.zeros(6, dtype=torch.float64)  # non-finite, stop, loss*tokens, tokens, aux, nll*tokens
        gnorm = None
        for micro in range(cfg.train.grad_accum):
            batch = next(self.data_iter)
            out = engine(**model_inputs(batch, self.device))
            loss, aux, nll = out.loss.float(), out.aux_loss.float(), out.nll_loss.float()
            if self.step in cfg.debug.nan_at_steps:
                loss = loss * float("nan")
            tokens = target_tokens(batch)
            stop = loss.new_full((), float(self.stop_signal.requested), dtype=torch.float64)  # fills: no host copy
            local = torch.stack([(~torch.isfinite(loss + aux)).double(), stop, loss.double() * tokens,
                                 stop.new_full((), tokens), aux.double(), nll.double() * tokens])
            flags = distributed.all_reduce(local.detach())
            bad = bool(flags[0] > 0)
            engine.backward(self._zero_loss() if bad else loss + aux)
            if micro == cfg.train.grad_accum - 1:
                self.optimizer.skip_next_step = bool(sums[0] > 0) or bad
                gnorm = self._grad_norm_before_step()
            engine.step()
            sums += flags if not bad else torch.tensor([1.0, float(flags[1]), 0, 0, 0, 0], dtype=torch.float64)
            self.routing.add(out.stats)
        return self._step_result(sums, gnorm)

    def _step_result(self, sums: torch.Tensor, gnorm: Optional[float]) -> StepResult:
        """StepResult from the host sums of train_step (no collective, no device read but the norm)."""
        bad, stop, loss_sum, tokens_sum, aux_sum, nll_sum = sums.tolist()
        skipped, tokens = bad > 0, int(tokens_sum)
        if gnorm is None and not skipped:
            value = self.engine.get_global_grad_norm()
            gnorm = float(value) if value is not None else None
        per_token = (lambda total: total / tokens) if tokens and not skipped else (lambda total: float("nan"))
        return StepResult(
            loss=per_token(loss_sum), nll=per_token(nll_sum), aux=aux_sum / (self.world * self.cfg.train.grad_accum),
            tokens=tokens, skipped=skipped, stop=stop > 0, grad_norm=gnorm,
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
        w = self.window
        if not r.skipped:
            w["loss_tokens"] += r.loss * r.tokens
            w["nll_tokens"] += r.nll * r.tokens
            w["tokens"] += r.tokens
            w["aux"] += r.aux
            w["n"] += 1
            w["gnorm"] = r.grad_norm
        else:
            w["skipped"] += 1
        self.steps_this_run += 1
        if self.timed_since is not None:
            self.timed_tokens += r.tokens
        elif self.steps_this_run >= self.cfg.logging.throughput_warmup_steps:
            self.timed_since, self.timed_tokens = time.time(), 0  # the clock starts after the warm-up steps

    def _record_step(self, r: StepResult) -> None:
        if self.rank != 0:
            return
        rec = {"step": self.step, "loss": r.loss if not r.skipped else None, "nll": r.nll if not r.skipped else None,
               "aux": r.aux, "lr": self.lr(),
               "grad_norm": r.grad_norm, "tokens": r.tokens, "skipped": r.skipped, "time": time.time() - self.start_time}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def tokens_per_s(self) -> Optional[float]:
        if self.timed_since is None or self.timed_tokens == 0:
            return None
        return self.timed_tokens / max(1e-9, time.time() - self.timed_since)

    def _log_interval(self) -> None:
        w, cfg = self.window, self.cfg
        global_loads = self._global_routing_loads()
        loss = w["loss_tokens"] / w["tokens"] if w["tokens"] else float("nan")
        nll = w["nll_tokens"] / w["tokens"] if w["tokens"] else float("nan")
        tps = self.tokens_per_s()
        peak = metrics.peak_flops(metrics.device_name() if cfg.logging.peak_flops_device == "auto"
                                  else cfg.logging.peak_flops_device, cfg.train.precision)
        routing = self.routing.summary(global_loads)
        flops = self.flops.per_token(routing)  # model and executed FLOPs/token of this interval; MFU from executed
        m = {"step": self.step, "loss": loss, "ppl": metrics.safe_ppl(nll), "aux": w["aux"] / max(1, w["n"]),
             "lr": self.lr(), "grad_norm": w["gnorm"], "tokens_per_s": tps, **flops,
             "mfu": metrics.mfu(tps or 0.0, flops["executed_flops_per_token"], peak, self.world),
             "routing": routing, "skipped": w["skipped"]}
        self.log(metrics.format_line(m))
        self._monitor(m)
        self.routing.reset()
        self.window = {"loss_tokens": 0.0, "nll_tokens": 0.0, "aux": 0.0, "tokens": 0, "n": 0, "skipped": 0, "gnorm": None}

    def _global_routing_loads(self) -> Optional[list[torch.Tensor]]:
        loads = self.routing.loads
        if not loads:
            return None
        flat = distributed.all_reduce(torch.cat([l.flatten() for l in loads]))
        return list(flat.split([l.numel() for l in loads]))

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
        from meo_ds import evaluate as ev

        rng = ckpt.rng_state()  # evaluation never changes the training trajectory
        try:
            result = ev.evaluate(self.engine, self.cfg, self.val_loader, self.device)
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
        client = {"trainer_step": self.step, "config": cfg.to_dict(), "world_size": self.world, "ep_size": cfg.ep_size}
        rank_state = {"step": self.step, "data": self.loader.state_dict(), "rng": ckpt.rng_state(),
                      "nonfinite_in_a_row": self.nonfinite_in_a_row}
        hook = None
        if cfg.debug.die_in_save_at_step == self.step:
            hook = lambda: self._debug_die(self.step)  # noqa: E731
        result = ckpt.save(self.engine, cfg.checkpoint_dir, self.step, client, rank_state, cfg.checkpoint.keep_last,
                           mid_save_hook=hook, info={"ep_size": cfg.ep_size})
        self.log(f"saved checkpoint {result.path}" + (f" (removed {result.removed})" if result.removed else ""))

    def _finish(self) -> None:
        cfg = self.cfg
        if cfg.eval.at_end:
            self.evaluate()
        if cfg.checkpoint.save_at_end:
            self.save()
        elapsed = time.time() - self.start_time
        tps = self.tokens_per_s()
        self.log(f"done: {self.step} steps in {elapsed:.1f} s"
                 + (f", {tps:,.0f} tokens/s after warm-up" if tps else "")
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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
            check_checkpoints(cfg, world)  # under the lock: another job could be saving or pruning them
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


if __name__ == "__main__":
    sys.exit(main())
