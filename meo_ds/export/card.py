"""The model card (README.md) written into every export directory.

Sources: the exported HuggingFace config, the run config saved in the checkpoint's client state
(MoE settings, data), the data directory's manifest (corpus summary) and the trainer's
`metrics.jsonl` and `eval.jsonl` (the last value of every training/evaluation metric logged at
or before the exported checkpoint's step: a run that went on after the tag, or trained the same
steps twice after a crash, does not leak later numbers into the card), when present. The MoE
settings listed per layer group are each kind's own (meo_ds.moe.registry.describe, via
export/remote.py's moe_summary); the card never compares kind names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

LOG_FILES = {"metrics.jsonl": "train", "eval.jsonl": "eval"}


def find_logs(checkpoint_dir: Path, run_config: Optional[dict]) -> dict[str, Path]:
    """The trainer's logs {prefix: path}: in logging.out_dir, else beside the checkpoint directory."""
    dirs = []
    out_dir = ((run_config or {}).get("logging") or {}).get("out_dir")
    if out_dir:
        dirs.append(Path(out_dir))
    dirs += [checkpoint_dir, checkpoint_dir.parent]
    found = {}
    for name, prefix in LOG_FILES.items():
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is not None:
            found[prefix] = path
    return found


def logged_metrics(logs: dict[str, Path], up_to_step: Optional[int] = None) -> dict[str, Any]:
    """{prefix/key: last value} over every log file (records with "step" <= up_to_step only)."""
    out = {}
    for prefix, path in logs.items():
        out.update({f"{prefix}/{k}": v for k, v in last_metrics(path, up_to_step).items()})
    return out


def last_metrics(path: Path, up_to_step: Optional[int] = None) -> dict[str, Any]:
    """Last finite value of every numeric key over the JSON lines (unparseable lines skipped), in
    file order, over the records with "step" <= up_to_step when it is given."""
    latest: dict[str, Any] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if up_to_step is not None and not (isinstance(step, int) and step <= up_to_step):
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                latest[key] = value
    return latest


def _table(rows: Iterable[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_card(
    *,
    title: str,
    target: str,
    hf_config: dict,
    moe: list[dict],
    run_config: Optional[dict],
    data_manifest: Optional[dict],
    metrics: dict[str, Any],
    source: dict[str, Any],
    usage: str,
    step: Optional[int] = None,
) -> str:
    """Markdown model card."""
    out = [f"# {title}", "", f"Exported by meo_ds (`meo-export`) as **{target}**.", ""]
    out += ["## Architecture", ""]
    keys = sorted(k for k, v in hf_config.items() if isinstance(v, (int, float, str, bool)) and k != "transformers_version")
    out += _table((k, _fmt(hf_config[k])) for k in keys) + [""]
    out += ["## MoE settings", ""]
    if not moe:
        out += ["Dense model (no MoE layers).", ""]
    for i, layer_cfg in enumerate(moe):
        where = layer_cfg.pop("where", f"group {i}")
        out += [f"**{where}**", ""] + _table((k, _fmt(v)) for k, v in sorted(layer_cfg.items())) + [""]
    out += ["## Training data", ""]
    out += _data_lines(run_config, data_manifest) + [""]
    out += ["## Metrics (last logged values" + (f" up to step {step}, the exported checkpoint)" if step is not None
                                                else ")"), ""]
    if metrics:
        out += _table((k, _fmt(v)) for k, v in sorted(metrics.items())) + [""]
    else:
        out += ["No trainer metrics log was found beside the checkpoint.", ""]
    out += ["## Source checkpoint", ""] + _table(sorted(source.items())) + [""]
    out += ["## Usage", "", "```python", usage.strip(), "```", ""]
    return "\n".join(out)


def _data_lines(run_config: Optional[dict], manifest: Optional[dict]) -> list[str]:
    rows: list[tuple[str, Any]] = []
    if run_config:
        rows.append(("task", run_config.get("task")))
        data = run_config.get("data") or {}
        rows += [(f"data.{k}", v) for k, v in sorted(data.items())]
        train = run_config.get("train") or {}
        rows += [(f"train.{k}", v) for k, v in sorted(train.items()) if k in ("steps", "micro_batch_size", "grad_accum", "lr", "precision")]
    if manifest:
        for key in ("task", "documents", "tokens", "pairs", "format"):
            if key in manifest:
                rows.append((f"corpus.{key}", manifest[key]))
        inputs = manifest.get("inputs") or []
        names = [Path(str(i.get("path", "?"))).name for i in inputs if isinstance(i, dict)]
        if names:
            rows.append(("corpus.inputs", ", ".join(names)))
        tok = manifest.get("tokenizer") or {}
        if "vocab_size" in tok:
            rows.append(("tokenizer.vocab_size", tok["vocab_size"]))
    if not rows:
        return ["The checkpoint records no training-data information."]
    return _table((k, _fmt(v)) for k, v in rows)
