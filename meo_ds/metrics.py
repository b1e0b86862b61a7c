"""Training metrics: peak-FLOPS table and MFU, FLOPs per token, routing-statistics summaries, the log line.

FLOPs per token come in two counts, both from the model's own accounting (each MoE layer's
`flops_per_token`, meo_ds/moe): the model count (the work the routing asks for: top-k k experts,
XMoE the measured experts per token, MEO the paper's k-expert sparse merge) and the executed
count (what the code runs: capacity dispatch's E*C padded rows, MEO's dense E-expert merge).
`TrainFlops.per_token` computes both for a log interval from that interval's measured routing;
MFU is computed from the executed count (the work the hardware did).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

# Dense peak FLOP/s per device (vendor datasheets, no sparsity). Keys are matched as
# substrings of the accelerator's device name, most specific first.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "GH200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "MI300X": {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163e12},
    "MI250X": {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12},
}


def device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return "cpu"
    try:  # torch's module for the accelerator (torch.cuda, torch.xpu, ...) knows the product name
        return torch.get_device_module(acc.device_name()).get_device_name()
    except Exception:  # noqa: BLE001 - any accelerator without a name lookup
        return acc.device_name()


def peak_flops(name: str, precision: str) -> Optional[float]:
    """Per-device peak FLOP/s for `precision`, or None (CPU, unknown device): MFU is n/a."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_FLOPS[key].get(precision)
    return None


class TrainFlops:
    """Training FLOPs per trained token of `model` at fixed lengths (the arguments of its
    flops_per_token after the routing: LM seq_len; translation mean source and target lengths)."""

    def __init__(self, model: torch.nn.Module, *lengths: float):
        self.model, self.lengths = model, lengths

    def per_token(self, routing: Sequence[Mapping[str, float]] = ()) -> dict[str, float]:
        """{model_flops_per_token, executed_flops_per_token} for an interval's routing summary
        (RoutingAccumulator.summary: per MoE layer in forward order); empty: nothing measured."""
        measured = list(routing) or None
        return {key: float(self.model.flops_per_token(*self.lengths, routing=measured, executed=executed))
                for key, executed in (("model_flops_per_token", False), ("executed_flops_per_token", True))}


def mfu(tokens_per_s: float, train_flops_per_token: Optional[float], peak: Optional[float], world: int) -> Optional[float]:
    """Model FLOPs utilisation; pass the executed FLOPs per token (TrainFlops.per_token)."""
    if not train_flops_per_token or not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * train_flops_per_token / (peak * world)


class RoutingAccumulator:
    """Sums per-layer routing statistics over a logging interval (one entry per MoE layer).

    Everything is summed where the statistics live (the accelerator): `add`, called every
    micro-batch, never reads a value back; `summary`, once per interval, reads everything back in
    one transfer.
    """

    def __init__(self) -> None:
        self.loads: list[torch.Tensor] = []  # per layer: [num_experts] float64 load, summed
        self.hists: list[torch.Tensor] = []  # per layer: [num_experts + 1] tokens that got j experts, summed
        self.a2a: list[int] = []  # per layer: all-to-all bytes this rank sent (host ints, known without a sync)
        # [layers, 4] float64, summed: dropped fraction, experts/token, expert rows computed, tokens
        self.scalars: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, stats: Optional[Sequence[Any]]) -> None:
        if not stats:
            return
        # Either RoutingStats per MoE layer, or (layer name, RoutingStats) pairs.
        stats = [s[1] if isinstance(s, tuple) else s for s in stats]
        stats = [s for s in stats if s is not None]
        if not self.loads:
            self.loads = [torch.zeros_like(s.expert_load, dtype=torch.float64) for s in stats]
            self.hists = [torch.zeros_like(s.experts_per_token_hist, dtype=torch.float64) for s in stats]
            self.a2a = [0] * len(stats)
            self.scalars = torch.zeros(len(stats), 4, dtype=torch.float64, device=stats[0].expert_load.device)
        stats = stats[: len(self.loads)]
        for i, s in enumerate(stats):
            self.loads[i] += s.expert_load.detach()
            self.hists[i] += s.experts_per_token_hist.detach()
            self.a2a[i] += int(s.a2a_bytes)
        self.scalars += torch.stack([torch.stack(self._scalars(s)) for s in stats])
        self.count += 1

    @staticmethod
    def _scalars(s: Any) -> list[torch.Tensor]:
        """Layers that report no expert rows (MEO: its cost does not depend on routing) count their experts/token."""
        tokens = s.num_tokens.double()
        rows = s.extra.get("rows")
        rows = s.experts_per_token_mean.double() * tokens if rows is None else rows.double()
        return [s.dropped_fraction.double(), s.experts_per_token_mean.double(), rows, tokens]

    def summary(self, global_loads: Optional[list[torch.Tensor]] = None) -> list[dict]:
        """Per layer: balance = max/mean expert load (1.0 is perfect), drop rate, experts/token (kept
        after drops, mean over micro-batches), rows_per_token (expert rows computed per token: with
        capacity E*C padded rows; this rank's)."""
        loads = global_loads if global_loads is not None else self.loads
        if not loads:
            return []
        # Read back once per interval: per layer max load, mean load, and the summed scalars.
        table = torch.stack([torch.stack([l.max(), l.mean()]).double().cpu() for l in loads])
        rows = torch.cat([table, self.scalars[: len(loads)].cpu()], dim=1).tolist()
        n = max(1, self.count)
        return [{"balance": top / mean if mean > 0 else float("nan"), "drop": drop / n, "experts_per_token": ept / n,
                 "rows_per_token": expert_rows / tokens if tokens > 0 else ept / n}
                for top, mean, drop, ept, expert_rows, tokens in rows]

    def reduction_parts(self) -> list[torch.Tensor]:
        """What the trainer sums over the ranks once per interval (one all-reduce, one host read):
        per layer the expert loads, then per layer the experts-per-token histograms, then the
        per-layer token counts and all-to-all bytes. Empty when no MoE layer ran."""
        if not self.loads:
            return []
        device = self.scalars.device
        return [*self.loads, *self.hists, self.scalars[:, 3], torch.tensor(self.a2a, dtype=torch.float64, device=device)]

    def split_reduced(self, parts: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
        """`reduction_parts` summed over the ranks (host tensors) -> (global loads per layer, per layer
        {load, experts_hist, a2a_bytes_per_token}: the interval record's routing details)."""
        n = len(self.loads)
        loads, hists, tokens, a2a = list(parts[:n]), parts[n:2 * n], parts[2 * n].tolist(), parts[2 * n + 1].tolist()
        details = [{"load": l.tolist(), "experts_hist": h.tolist(), "a2a_bytes_per_token": b / t if t > 0 else 0.0}
                   for l, h, t, b in zip(loads, hists, tokens, a2a)]
        return loads, details

    def reset(self) -> None:
        self.__init__()


# Throughput keys of the trainer's metrics (Task.token_counts names + "_per_s": the LM's tokens;
# translation's source and target tokens, counted separately) -> (log-line label, summary word).
THROUGHPUT = {"tokens_per_s": ("tok/s", ""), "source_tokens_per_s": ("src tok/s", " source"),
              "target_tokens_per_s": ("tgt tok/s", " target")}


def format_line(m: dict) -> str:
    """One log line; `m` holds the interval's metrics (a throughput key present with None: warm-up)."""
    mfu_text = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    parts = [
        f"step {m['step']:>6d}",
        f"loss {m['loss']:.4f}",
        f"ppl {m['ppl']:.2f}",
        f"aux {m['aux']:.4f}",
        f"lr {m['lr']:.3e}",
        f"gnorm {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "gnorm n/a",
    ]
    parts += [f"{label} {m[key]:,.0f}" if m[key] else f"{label} warm-up"
              for key, (label, _) in THROUGHPUT.items() if key in m]
    parts.append(f"mfu {mfu_text}")
    if m.get("model_flops_per_token") is not None:
        parts.append(f"flops/tok model {m['model_flops_per_token']:.4g} executed {m['executed_flops_per_token']:.4g}")
    routing = m.get("routing") or []
    if routing:
        parts.append(
            "moe[" + " ".join(f"L{i}:bal {r['balance']:.2f} drop {r['drop']:.3f} k {r['experts_per_token']:.2f}" for i, r in enumerate(routing)) + "]"
        )
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


def format_throughput_summary(rates: Mapping[str, Optional[float]]) -> str:
    """The end-of-run throughput, e.g. ", 4,738 tokens/s after warm-up" or ", 1,200 source + 1,300
    target tokens/s after warm-up"; empty when nothing was timed."""
    if not rates or not all(rates.values()):
        return ""
    return ", " + " + ".join(f"{v:,.0f}{THROUGHPUT[k][1]}" for k, v in rates.items()) + " tokens/s after warm-up"


def safe_ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")
