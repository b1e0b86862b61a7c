"""The DeepSpeed JSON config, reconciled with the run config before any rank does work.

`reconcile_ds_config` checks it against the run config and fills what it leaves out: the run
config owns batch sizes (micro batch x accumulation x world size), gradient clipping and the
optimizer/schedule (a DeepSpeed `optimizer` or `scheduler` section is an error); the DeepSpeed
config owns ZeRO, precision (unless train.precision is set) and monitors (whose `auto` paths
become <logging.out_dir>/monitor). Values both give must agree; every disagreement is listed in
one ConfigError. The world size against the expert-parallel size is the run config's own check
(RunConfig.validate).
"""
from __future__ import annotations

import copy
import os
from typing import Optional

from meo_ds.moe import registry

from .errors import ConfigError, listing
from .loading import read_mapping
from .schema import RunConfig


def load_ds_config(path: Optional[str]) -> dict:
    if not path:
        raise ConfigError("no DeepSpeed config; pass --deepspeed_config ds_configs/<one>.json (see ds_configs/README.md)")
    return read_mapping(path)


def ds_precision(ds: dict) -> Optional[str]:
    bf16 = bool(ds.get("bf16", {}).get("enabled", False)) or bool(ds.get("bfloat16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError("the DeepSpeed config enables both bf16 and fp16; enable one")
    return "bf16" if bf16 else "fp16" if fp16 else None


def reconcile_ds_config(cfg: RunConfig, ds: dict, world_size: int, device: str = "cuda") -> dict:
    """Check the DeepSpeed config against the run config; return it completed. Raises ConfigError.

    The run config owns batch sizes, gradient clipping and the optimizer; the DeepSpeed config
    owns ZeRO, precision (unless train.precision is set) and monitors. Values both give must agree.
    """
    ds, problems = copy.deepcopy(ds), []
    t, micro = cfg.train, cfg.micro_batch_size
    want = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have not in (None, "auto") and have != value:
            problems.append(
                f"DeepSpeed config {key}={have} but the run config gives {value} (micro-batch {micro} "
                f"[train.micro_batch_size for lm, 1 for translation] x train.grad_accum={t.grad_accum} "
                f"x world size {world_size}); "
                f"remove {key} from the DeepSpeed config or make the two agree"
            )
        ds[key] = value
    problems += _precision_problems(cfg, ds, device)
    clip = ds.get("gradient_clipping", "auto")
    if clip not in (None, "auto") and float(clip) != t.grad_clip:
        problems.append(f"DeepSpeed config gradient_clipping={clip} but train.grad_clip={t.grad_clip}; make them agree")
    ds["gradient_clipping"] = t.grad_clip
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"the DeepSpeed config has an {key!r} section; the trainer builds AdamW and the LR "
                            f"schedule from the run config's train section: remove {key!r}")
    problems += _zero_problems(cfg, ds)
    problems += _monitor_problems(cfg, ds)
    if problems:
        raise ConfigError(listing("run config and DeepSpeed config disagree", problems))
    ds["zero_allow_untested_optimizer"] = True  # our AdamW subclass (skippable steps)
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own log lines
    return ds


def _precision_problems(cfg: RunConfig, ds: dict, device: str) -> list[str]:
    have = ds_precision(ds)
    want = cfg.train.precision
    problems = []
    if want is not None and have is not None and want != have:
        problems.append(f"train.precision={want} but the DeepSpeed config enables {have}; make them agree "
                        f"(or set train.precision: null to follow the DeepSpeed config)")
    if want is not None and have is None:
        explicit = any(ds.get(k, {}).get("enabled") is False for k in ("bf16", "fp16"))
        if want != "fp32" and explicit:
            problems.append(f"train.precision={want} but the DeepSpeed config disables it; enable {want} there")
        if want in ("bf16", "fp16"):
            ds.setdefault(want, {})["enabled"] = True
    precision = want or have or "fp32"
    if precision == "fp16" and device == "cpu":
        problems.append("fp16 training is not supported on the CPU accelerator; use ds_configs/cpu_fp32.json")
    cfg.train.precision = precision
    return problems


def zero_stage(ds: dict) -> int:
    """The DeepSpeed config's ZeRO stage (0 when it has no zero_optimization section)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _zero_problems(cfg: RunConfig, ds: dict) -> list[str]:
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        return [f"zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3"]
    sharded = sorted({m.kind for m in cfg.moe_configs() if registry.get(m.kind).expert_parallel})
    if stage == 3 and sharded:
        return [f"ZeRO stage 3 needs every MoE layer's experts to be ordinary parameters (MEO); this model has "
                f"expert-parallel {sharded} layers: use ZeRO stage 2 (ds_configs/zero2_*.json)"]
    return []


def _monitor_problems(cfg: RunConfig, ds: dict) -> list[str]:
    problems = []
    for key in ("csv_monitor", "tensorboard", "wandb", "comet"):
        section = ds.get(key)
        if not isinstance(section, dict) or not section.get("enabled"):
            continue
        if key in ("csv_monitor", "tensorboard"):
            if section.get("output_path") in (None, "", "auto"):
                section["output_path"] = os.path.join(cfg.logging.out_dir, "monitor") + os.sep
            if section.get("job_name") in (None, "", "auto"):
                section["job_name"] = cfg.name
        if key == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                problems.append("the DeepSpeed config enables tensorboard but the tensorboard package is not "
                                "installed: `pip install tensorboard`, or disable it (csv_monitor needs nothing)")
    return problems
