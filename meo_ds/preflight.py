"""Pre-flight: every input of a run checked on every rank before the process group exists.

    cfg, ds = load_configs(args, world_size)   # both configs, paths, corpus
    check_checkpoints(cfg, world_size, zero3)   # what a resume / init_from would load

Nothing is written and no collective runs here, so a bad input ends every rank alike with one
`ConfigError` line (the trainer's exit status 2) before any work or data is lost. What is checked:
the run config against the world size and the DeepSpeed config (config/ds_config.py); that
logging.out_dir and the checkpoint directory are writable directories; the corpus (manifest,
the cheap per-file checks or, with data.verify, every checksum; `model.vocab_size: auto` /
`model.max_seq_len: auto` resolved from it (resolve_from_corpus); vocabulary and sequence length
against the model; one global batch of the train and validation splits); and the checkpoint a
resume or init_from names (it exists, its saved run config rebuilds the same parameter shapes,
and a resume at the same world/ep size continues the same data stream).
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import torch

from meo_ds import checkpoint as ckpt
from meo_ds.config import (ConfigError, RunConfig, build_model_config, load_ds_config, load_run_config,
                           migrate_saved_run_config, reconcile_ds_config)
from meo_ds.data.io import StreamMismatch
from meo_ds.data.readers import CorpusError
from meo_ds.tasks import task_for


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
    task, path = task_for(cfg), Path(cfg.data.path)
    if not (path / "manifest.json").is_file():
        raise ConfigError(
            f"data.path={str(path)!r} holds no prepared corpus (no manifest.json); prepare one with "
            f"`meo-prepare demo --task {task.PREPARE_NAME} --out {path}` or `meo-prepare lm|mt ...`"
        )
    if cfg.data.verify and os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine
        from meo_ds.data.verify import verify_corpus

        verify_corpus(path)
    ds = task.dataset("train")
    vocab = ds.tokenizer().vocab_size
    resolve_from_corpus(cfg, vocab)
    model_vocab = getattr(cfg.model, "vocab_size", None)
    if model_vocab is not None and vocab > model_vocab:
        raise ConfigError(f"the tokenizer of {path} has {vocab} tokens but model.vocab_size={model_vocab}; "
                          f"set --set model.vocab_size={vocab}, or model.vocab_size: auto (the tokenizer's size)")
    task.check_fits_model(ds)
    for split in ("train", cfg.data.val_split):
        check_loader(cfg, split, world_size)

def resolve_from_corpus(cfg: RunConfig, vocab: int) -> dict[str, int]:
    """Fill the model sizes the run config left `auto` (config/schema.py, FROM_CORPUS) from the
    corpus: vocab_size = `vocab` (its tokenizer's size), max_seq_len = task.longest_sequence().
    Changes cfg.model in place; returns what it set. Deterministic: every rank sets the same."""
    resolved = {}
    for key in cfg.unresolved_sizes():
        resolved[key] = vocab if key == "vocab_size" else task_for(cfg).longest_sequence()
        setattr(cfg.model, key, resolved[key])
    return resolved

def check_loader(cfg: RunConfig, split: str, world_size: int) -> Any:
    """Rank 0's loader of `split` (every rank gets as many batches); ConfigError if there is none."""
    task = task_for(cfg)
    try:
        return task.loader(split, 0, world_size, shuffle=split == "train")
    except KeyError as err:
        raise ConfigError(f"data.path={cfg.data.path!r} has no split {split!r} ({err.args[0]}); "
                          f"set data.val_split to one it has, or prepare the corpus with that split (`meo-prepare lm|mt "
                          f"... --valid FILE... --test FILE...`)") from None
    except ValueError as err:
        if isinstance(err, CorpusError):
            raise
        more = "prepare a larger corpus" + (" or a larger --valid-fraction" if split != "train" else "")
        raise ConfigError(f"{err}; {task.batch_size_advice()}, run on fewer ranks, or {more}") from None

def check_checkpoints(cfg: RunConfig, world_size: int, zero3: bool = False) -> None:
    """What checkpoint.resume / init_from would load exists, holds the same model architecture,
    and (an exact resume, which continues the data stream; `zero3`: the DeepSpeed config's stage
    is 3) the same data stream (data.path, data.seq_len / max_tokens, data.seed)."""
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
        check_same_data_stream(cfg, point, world_size, zero3)

def saved_run_config(point: ckpt.ResumePoint, key: str) -> dict:
    """The run config the trainer stored with a checkpoint (client_state['config'] of its main file,
    `mp_rank_00_model_states.pt`, or rank 0's under ZeRO-3), read memory-mapped through
    checkpoint.safe_load: no code runs, no tensor is read. Keys that moved since are moved (config.loading)."""
    names = (ckpt.MAIN_FILE, ckpt.ZERO3_MODEL_FILE.format(rank=0))
    path = next((point.path / n for n in names if (point.path / n).is_file()), point.path / ckpt.MAIN_FILE)
    try:
        main = ckpt.safe_load(path, mmap=True)
    except ckpt.CheckpointError as err:
        raise ConfigError(f"{key}: {err}; resume from an earlier tag with --set {key}=<dir>/<tag>") from None
    tree = main.get("config") if isinstance(main, dict) else None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{key}: {path} records no run config; it was not written by meo-train")
    return migrate_saved_run_config(tree)

def _param_shapes(model_cfg: Any) -> dict[str, tuple]:
    from meo_ds import models

    with torch.device("meta"):  # the full set of experts: models are built parallelism-free
        return {k: tuple(v.shape) for k, v in models.build_model(model_cfg).state_dict().items()}

def check_same_model(cfg: RunConfig, saved: dict, point: ckpt.ResumePoint, key: str) -> None:
    """The checkpoint's saved model config builds the same parameter shapes as cfg.model."""
    try:
        then = build_model_config(copy.deepcopy(saved["model"]), cfg.task)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{key}: the model of {point.path} cannot be rebuilt ({err}); is it a {cfg.task} "
                          f"checkpoint?") from None
    if _param_shapes(then) == _param_shapes(copy.deepcopy(cfg.model)):
        return
    now_tree, then_tree = _flat(cfg.to_dict()["model"]), _flat(saved["model"])
    diffs = [f"{k}={now_tree.get(k)!r} (checkpoint: {then_tree.get(k)!r})" for k in sorted(set(now_tree) | set(then_tree))
             if now_tree.get(k) != then_tree.get(k)]
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

def check_same_data_stream(cfg: RunConfig, point: ckpt.ResumePoint, world_size: int, zero3: bool) -> None:
    """An exact resume (ckpt.exact_resume) continues the data stream: it must be the same one."""
    if not ckpt.exact_resume(point, world_size, cfg.parallel.ep_size, zero3):
        return  # weights only: the trainer carries the position over only where it can, and says so
    state = ckpt.load_rank_state(point, 0)
    if not state or "data" not in state:
        return
    loader = task_for(cfg).loader("train", 0, world_size)
    try:
        loader.check_state(state["data"])
    except StreamMismatch as err:
        field = DATA_KEYS.get(err.key, "the data settings")
        raise ConfigError(f"checkpoint.resume: {point.path} continues another data stream ({err}); keep "
                          f"{field} as it was, or train these weights on new data with --set "
                          f"checkpoint.init_from={point.path} in another logging.out_dir") from None
