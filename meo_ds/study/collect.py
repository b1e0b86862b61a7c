"""From a variant's run directory to its figures (results.json's per-variant record).

Curves (one point per evaluation): step, training time and cumulative executed FLOPs at that
step, validation loss. Training time is metrics.jsonl's `time` (seconds since the process
started) made cumulative over resumed launches (each launch's clock restarts; the steps
re-trained after a resume replace the lost ones). Cumulative executed FLOPs sum, over the
steps, the step's counted tokens (metrics.jsonl, all ranks) times the executed FLOPs per token
of the log interval holding the step (intervals.jsonl).

Tokens/s is the last launch's rate after its warm-up (metrics.jsonl). Figures averaged over training (experts/token, drop rate, load balance = max/mean expert
load, all-to-all bytes per token) are the mean over log intervals of the mean over MoE layers
(a2a bytes: summed over layers); FLOPs per token are token-weighted over the run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def cumulative_time(metrics: list[dict]) -> dict[int, float]:
    """step -> training seconds so far, continuing across launches (a clock that goes back = a new launch)."""
    out, offset, last = {}, 0.0, 0.0
    for m in metrics:
        if m["time"] < last:
            offset += last
        last = m["time"]
        out[m["step"]] = offset + m["time"]
    return out


def cumulative_flops(metrics: list[dict], intervals: list[dict]) -> dict[int, float]:
    """step -> executed FLOPs so far (all ranks)."""
    ends = sorted((r["step"], r["executed_flops_per_token"], r.get("flops_tokens", "tokens")) for r in intervals)
    out, total, i = {}, 0.0, 0
    for m in sorted(metrics, key=lambda m: m["step"]):
        while i < len(ends) - 1 and ends[i][0] < m["step"]:
            i += 1
        if ends:
            total += m.get(ends[i][2], 0) * ends[i][1]
        out[m["step"]] = total
    return out


def param_counts(config: dict, experts_per_token: Optional[float]) -> dict:
    """Total and active parameters of the run's model (built on the meta device: no memory)."""
    from meo_ds.config.loading import migrate_saved_run_config, run_config_from_dict
    from meo_ds.models import build_model

    cfg = run_config_from_dict(migrate_saved_run_config(json.loads(json.dumps(config))))
    with torch.device("meta"):
        model = build_model(cfg.model)
    return model.param_counts(experts_per_token)


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def routing_means(intervals: list[dict]) -> dict:
    rows = [r["routing"] for r in intervals if r.get("routing")]
    per = lambda key: _mean([_mean([layer[key] for layer in row if key in layer]) for row in rows])  # noqa: E731
    return {"experts_per_token": per("experts_per_token"), "drop_rate": per("drop"), "load_balance": per("balance"),
            "a2a_bytes_per_token": _mean([sum(l.get("a2a_bytes_per_token", 0.0) for l in row) for row in rows])}


def collect(run_dir: Path, wall_s: Optional[float], moe: bool) -> dict:
    """The variant's record: final evaluation, curves, sizes, costs, routing (None for dense baselines)."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # A run resumed from its final checkpoint evaluates that step again: one record per step, the latest.
    evals = sorted({e["step"]: e for e in read_jsonl(run_dir / "eval.jsonl")}.values(), key=lambda e: e["step"])
    intervals = read_jsonl(run_dir / "intervals.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    times, flops = cumulative_time(metrics), cumulative_flops(metrics, intervals)
    key = intervals[-1].get("flops_tokens", "tokens") if intervals else "tokens"
    tokens = sum(m.get(key, 0) for m in metrics)
    routing = routing_means(intervals) if moe else None
    final = evals[-1]
    record = {
        "steps": summary["steps"],
        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"],
        **{k: final[k] for k in ("bleu", "chrf") if k in final},
        "params": param_counts(config, routing["experts_per_token"] if routing else None),
        "model_flops_per_token": _weighted(intervals, metrics, "model_flops_per_token"),
        "executed_flops_per_token": flops[max(flops)] / tokens if tokens else None,
        "tokens_per_s": next((m[f"{key}_per_s"] for m in reversed(metrics) if m.get(f"{key}_per_s")), None),
        "train_time_s": times[max(times)], "wall_s": wall_s if wall_s is not None else summary["wall_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"], "peak_memory_kind": summary["peak_memory_kind"],
        "routing": routing,
        "curve": [{"step": e["step"], "time_s": times.get(e["step"]), "flops": flops.get(e["step"]),
                   "val_loss": e["val_loss"]} for e in evals],
        "expert_load": [{"step": r["step"], "layers": [l["load"] for l in r["routing"] if "load" in l]}
                        for r in intervals if r.get("routing")] if moe else None,
        "experts_hist": _hist(intervals) if moe else None,
    }
    return record


def _weighted(intervals: list[dict], metrics: list[dict], key: str) -> Optional[float]:
    """Token-weighted mean of an interval figure over the run."""
    if not intervals:
        return None
    counts, prev = [], 0
    for r in sorted(intervals, key=lambda r: r["step"]):
        n = sum(m.get(r.get("flops_tokens", "tokens"), 0) for m in metrics if prev < m["step"] <= r["step"])
        counts.append((n, r[key]))
        prev = r["step"]
    total = sum(n for n, _ in counts)
    return sum(n * v for n, v in counts) / total if total else None


def _hist(intervals: list[dict]) -> Optional[list[list[float]]]:
    """Per MoE layer: tokens that got j experts, j = 0..E, summed over training."""
    rows = [[l["experts_hist"] for l in r["routing"] if "experts_hist" in l] for r in intervals if r.get("routing")]
    rows = [r for r in rows if r]
    if not rows:
        return None
    return [[sum(col) for col in zip(*layer)] for layer in zip(*rows)]
