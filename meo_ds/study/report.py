"""results.json and report.md: the table and the plain reading computed from the figures.

The reading compares validation perplexity three ways (each from results.json's curves):
- at equal steps: the final evaluation (every variant trains the same steps and tokens);
- at equal time: every curve's validation loss interpolated linearly at the training time of
  the fastest variant's final evaluation (a variant not yet evaluated by then is left out);
- at equal FLOPs: the same at the smallest final cumulative executed FLOPs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def interpolate(curve: list[dict], axis: str, at: float) -> Optional[float]:
    """Validation loss on a curve at `at` along `axis` (time_s or flops); None outside its range."""
    points = sorted((p[axis], p["val_loss"]) for p in curve if p.get(axis) is not None)
    if not points or at < points[0][0] - 1e-9 or at > points[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[-1][1] if abs(at - points[-1][0]) <= 1e-9 else points[0][1]


def comparisons(variants: dict[str, dict]) -> dict:
    """{steps, time, flops}: where each comparison is made and each variant's validation perplexity there."""
    out = {"steps": {"at": min(v["steps"] for v in variants.values()),
                     "ppl": {n: v["val_ppl"] for n, v in variants.items()}}}
    for name, axis in (("time", "time_s"), ("flops", "flops")):
        ends = [v["curve"][-1][axis] for v in variants.values() if v["curve"] and v["curve"][-1].get(axis) is not None]
        if not ends:
            continue
        at = min(ends)
        ppl = {}
        for n, v in variants.items():
            loss = interpolate(v["curve"], axis, at)
            if loss is not None:
                ppl[n] = math.exp(min(loss, 50.0))
        out[name] = {"at": at, "ppl": ppl}
    return out


def _winner_sentence(label: str, ppl: dict[str, float], left_out: list[str]) -> str:
    ranked = sorted(ppl.items(), key=lambda kv: kv[1])
    if not ranked:
        return f"{label}: no variant was evaluated by then."
    best, best_ppl = ranked[0]
    text = f"{label}, **{best}** has the lowest validation perplexity ({best_ppl:.2f})"
    if len(ranked) > 1:
        second, second_ppl = ranked[1]
        text += f", ahead of {second} ({second_ppl:.2f}, +{100 * (second_ppl / best_ppl - 1):.1f}%)"
    dense = [f"{n} {p:.2f}" for n, p in ranked[2:] if n.startswith("dense")]
    if dense:
        text += "; dense: " + ", ".join(dense)
    if left_out:
        text += f" ({', '.join(left_out)} not evaluated by then)"
    return text + "."


def reading(results: dict) -> list[str]:
    """The report's plain-reading sentences, from results['comparisons']."""
    comp, names = results["comparisons"], list(results["variants"])
    lines = [_winner_sentence(f"At equal steps ({comp['steps']['at']})", comp["steps"]["ppl"], [])]
    if "time" in comp:
        c = comp["time"]
        lines.append(_winner_sentence(f"At equal training time ({c['at']:.0f} s, the fastest variant's whole run)",
                                      c["ppl"], [n for n in names if n not in c["ppl"]]))
    if "flops" in comp:
        c = comp["flops"]
        lines.append(_winner_sentence(f"At equal executed FLOPs ({c['at']:.3g}, the cheapest variant's whole run)",
                                      c["ppl"], [n for n in names if n not in c["ppl"]]))
    return lines


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(results: dict) -> list[str]:
    mt = any("bleu" in v for v in results["variants"].values())
    head = ["variant", "val ppl", *(["BLEU", "chrF"] if mt else []), "params total", "params active",
            "model FLOPs/tok", "executed FLOPs/tok", "tok/s", "wall s", "peak MiB/rank", "experts/tok", "drop",
            "balance", "a2a B/tok"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in results["variants"].items():
        r = v["routing"] or {}
        cells = [name, _fmt(v["val_ppl"], ".2f"), *([_fmt(v.get("bleu"), ".1f"), _fmt(v.get("chrf"), ".1f")] if mt else []),
                 f"{v['params']['total']:,.0f}", f"{v['params']['active']:,.0f}", _fmt(v["model_flops_per_token"], ".3g"),
                 _fmt(v["executed_flops_per_token"], ".3g"), _fmt(v["tokens_per_s"], ",.0f"), _fmt(v["wall_s"], ".0f"),
                 _fmt(v["peak_memory_bytes"] / 2**20, ".0f"), _fmt(r.get("experts_per_token"), ".2f"),
                 _fmt(r.get("drop_rate"), ".3f"), _fmt(r.get("load_balance"), ".2f"), _fmt(r.get("a2a_bytes_per_token"), ",.0f")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write(results: dict, out: Path, plots: list[str]) -> None:
    """results.json and report.md in `out` (plots: file names relative to out)."""
    results = {**results, "comparisons": comparisons(results["variants"])}
    results["reading"] = reading(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    s = results["settings"]
    kinds = {v["peak_memory_kind"] for v in results["variants"].values()}
    lines = [f"# meo-study: {s['task']} on {s['data']}", "",
             f"Preset {s['preset']}, {s['steps']} steps per variant on {s['world']} rank(s), same data order, seed, "
             f"tokens and schedule; validation every {s['eval_interval']} steps. Peak memory: {', '.join(sorted(kinds))} "
             f"of the busiest rank. Routing columns are means over training (balance = max/mean expert load). "
             f"tok/s: {'target tokens' if s['task'] == 'mt' else 'tokens'} per second of the last launch, after warm-up; "
             f"wall s: all of the variant's launches, start-up included.", "",
             *table(results), "", *[f"- {line}" for line in results["reading"]], "",
             *[f"![{p}]({p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
