"""The study's runs: one run config per variant, launched in turn through the real launcher.

Layout of a study directory OUT:

    OUT/data (or data-mt)    the demo corpus, when no --data is given
    OUT/configs/V.yaml       variant V's complete run config (overrides applied)
    OUT/runs/V/              its run directory (metrics.jsonl, eval.jsonl, intervals.jsonl,
                             summary.json, train.log, checkpoints/)
    OUT/wall.json            per variant, seconds spent in its launches (start-up included)

Resuming: a variant whose summary.json records the study's steps is finished and never run
again; any other is launched, and the trainer resumes it from its latest checkpoint
(checkpoint.resume: auto; checkpoints are saved at every evaluation).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from meo_ds import launcher
from meo_ds.config.loading import apply_override, preset_dict
from meo_ds.config.schema import DEFAULT_LM_MICRO_BATCH
from meo_ds import demo
from meo_ds.demo import recipe
from meo_ds.fileio import atomic_write
from meo_ds.study.variants import variant_model

@dataclass
class Study:
    out: Path
    task: str  # lm | mt
    preset: str
    variants: list[str]
    steps: Optional[int] = None
    tokens: Optional[int] = None
    eval_interval: Optional[int] = None
    overrides: list[str] = field(default_factory=list)
    data: Optional[Path] = None  # a prepared corpus (shards directory); None: the demo corpus
    ranks: int = 2
    hostfile: Optional[str] = None
    num_nodes: Optional[int] = None

    def world(self) -> int:
        return self.ranks * (self.num_nodes or _hostfile_nodes(self.hostfile))

    def evaluate_every(self, steps: int) -> int:
        """Validation (and checkpoint) interval: --eval-interval, else six evaluations per run."""
        return self.eval_interval or max(1, steps // 6)

    def run_dir(self, variant: str) -> Path:
        return self.out / "runs" / variant


def _hostfile_nodes(hostfile: Optional[str]) -> int:
    if not hostfile:
        return 1
    lines = [l.split("#")[0].strip() for l in Path(hostfile).read_text().splitlines()]
    return max(1, sum(1 for l in lines if l))


def base_tree(study: Study, data_dir: Path, steps: int) -> tuple[dict, dict]:
    """(the model mapping every variant derives from, the rest of the run config), overrides applied."""
    tree = {"task": demo.TASKS[study.task]["task"], "model": preset_dict(study.preset),
            **recipe(study.task, steps, data_dir)}
    for item in study.overrides:
        apply_override(tree, item)
    return tree.pop("model"), tree


def tokens_per_step(rest: dict, world: int) -> int:
    """Tokens one optimizer step trains on: LM sequences x seq_len; translation the padded-token batch bound."""
    train, data = rest["train"], rest["data"]
    micro = train.get("micro_batch_size") or DEFAULT_LM_MICRO_BATCH
    per_rank = micro * data["seq_len"] if "seq_len" in data else data["max_tokens"]
    return per_rank * (train.get("grad_accum") or 1) * world


def resolve_steps(study: Study, data_dir: Path) -> int:
    if study.steps is not None:
        return study.steps
    _, rest = base_tree(study, data_dir, 1)
    return max(1, math.ceil(study.tokens / tokens_per_step(rest, study.world())))


def run_config(study: Study, variant: str, data_dir: Path, steps: int) -> dict:
    """Variant's complete run config: the base's sections, its model and ep, the study's intervals."""
    base_model, rest = base_tree(study, data_dir, steps)
    model, ep = variant_model(variant, base_model, study.world())
    every = study.evaluate_every(steps)
    cfg = copy.deepcopy(rest)
    cfg.update(name=f"study-{variant}", model={**model, "vocab_size": "auto"}, parallel={"ep_size": ep})
    cfg["train"]["steps"] = steps
    cfg["eval"] = {**cfg.get("eval", {}), "interval": every, "at_end": True}
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "interval": every, "keep_last": 1, "resume": "auto"}
    cfg["logging"] = {**cfg.get("logging", {}), "out_dir": str(study.run_dir(variant)),
                      "interval": max(1, min(every, steps // 20))}
    return cfg


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps", -1) >= steps


def read_wall(out: Path) -> dict:
    path = out / "wall.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def add_wall(out: Path, variant: str, seconds: float) -> None:
    wall = read_wall(out)
    wall[variant] = wall.get(variant, 0.0) + seconds
    atomic_write(out / "wall.json", json.dumps(wall, indent=2))  # read back on resume


def run_all(study: Study, data_dir: Path, steps: int, say=print) -> int:
    """Train every unfinished variant in turn; returns 0, or the first failing launch's exit status."""
    gpu = launcher.use_gpus(study.ranks)
    configs, ds_path = study.out / "configs", study.out / "ds_config.json"
    configs.mkdir(parents=True, exist_ok=True)
    ds_path.write_text(json.dumps(launcher.ds_config(gpu), indent=2))
    plans = {v: run_config(study, v, data_dir, steps) for v in study.variants}  # every config checked first
    for variant, cfg in plans.items():
        if finished(study.run_dir(variant), steps):
            say(f"{variant}: finished earlier ({study.run_dir(variant)}), not run again")
            continue
        path = configs / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        say(f"{variant}: training {steps} steps (ep {cfg['parallel']['ep_size']}) in {study.run_dir(variant)}")
        start = time.time()
        try:
            code = launcher.launch(path, ds_path, study.ranks, gpu, prefix="meo-study", hostfile=study.hostfile,
                                   num_nodes=study.num_nodes)
        finally:
            add_wall(study.out, variant, time.time() - start)
        if code != 0:
            say(f"{variant}: training failed (exit {code}); see {study.run_dir(variant) / 'train.log'}. "
                f"Run the same command again to resume.")
            return code
    return 0
