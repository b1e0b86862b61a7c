"""MoE layer benchmark: forward + backward time of dense, top-k, XMoE, MEO, DeepSpeed and Mixtral layers.

    python bench/bench_moe.py [--quick] [--json PATH] [--dtype bf16] [--reps 7]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/bench_moe.py --ep 2

Every row runs forward + backward of one layer on the same input tokens (each rank its own
tokens; MEO rows at other sequence lengths regroup the same tokens into longer sequences). The
loss is a fixed random projection of the output plus the layer's aux loss where it has one.
Rows are timed round-robin (each round starts one row later), after warm-up rounds; the table
shows the median over rounds. With several ranks a round's time is the slowest rank's.

Columns:
  ms          median forward + backward time of one micro-batch
  tokens/s    tokens of all ranks / ms
  x dense     ms / ms of the dense SwiGLU MLP of one expert's size (the baseline)
  MFLOP/tok   model forward matmul FLOPs per token (the work the routing asks for): dense 6 d f;
              top-k, XMoE, DeepSpeed and Mixtral 2 d E (router) + m * 6 d f_expert with m the
              measured experts per token after capacity drops; MEO the paper's sparse k-expert merge.
              Our layers count themselves (`layer.flops_per_token`, meo_ds/moe/layer.py and meo.py).
  exec MF/tok executed forward matmul FLOPs per token (what ran): capacity dispatch (ours and
              DeepSpeed's) computes E*C padded rows, so m = E*C / tokens; MEO the merge it ran
              (k selected experts where groups * k < E, else all E densely; meo.py's Choices);
              dropless layers and Mixtral equal the model count
  exp/tok     measured mean experts per token after drops (RoutingStats; DeepSpeed: its gate's
              kept routes; Mixtral never drops)
  a2a B/tok   forward all-to-all bytes a rank's tokens put on the wire to other ranks, per token
              (RoutingStats.a2a_bytes; DeepSpeed: counted at torch.distributed.all_to_all_single, and
              ours are checked against that count, summed over ranks); 0 without expert parallelism.
              Our dropless rows send a token once per other rank holding any of its experts (out and
              back) plus 2 floats per remote assignment; capacity rows send E/ep*C slots per other rank
              (the wire format: meo_ds/moe/dispatch.py)

With --ep N (N > 1, under the deepspeed launcher) our top-k/XMoE layers (built whole, then
`meo_ds.parallel.parallelize`d) and DeepSpeed's layer hold E/N experts per rank and exchange tokens; MEO, dense and Mixtral rows run on each rank's
tokens alone (MEO moves weights, not tokens, so it has no all-to-all).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024, help="width of one expert (and of the dense MLP)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per micro-batch")
    p.add_argument("--batch", type=int, help="sequences per rank (overrides --tokens: tokens = batch * seq-len)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--experts", type=int, default=8, help="experts of the top-k, DeepSpeed and Mixtral layers")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--xmoe-experts", type=int, default=64)
    p.add_argument("--xmoe-width", type=int, help="XMoE expert width (default d_ff / 8)")
    p.add_argument("--xmoe-thresholds", default="0.5,0.7,0.9")
    p.add_argument(
        "--xmoe-router-scale", type=float, default=3.0,
        help="multiply the XMoE router's weights (inverse temperature); a fresh router is far flatter "
        "than a trained one and would take ~40 of 64 experts at t=0.9",
    )
    p.add_argument("--meo-experts", default="8,16")
    p.add_argument("--meo-k", default="1,2,4,8")
    p.add_argument("--meo-seq-lens", help="sequence lengths of the MEO rows (default: seq-len and 4 x seq-len)")
    p.add_argument("--hf-impls", default="eager,grouped_mm", help="Mixtral experts implementations to time")
    p.add_argument("--rows", help="regular expression: time only the rows whose name matches (plus the dense baseline)")
    p.add_argument("--reps", type=int, default=15, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (run under the deepspeed launcher)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / local ranks)")
    p.add_argument(
        "--malloc", choices=("tuned", "system"), default="tuned",
        help="CPU only: 'tuned' keeps freed large blocks in glibc's heap (see tune_malloc); 'system' leaves defaults",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.tokens, args.seq_len = 64, 128, 512, 64
        args.batch, args.reps, args.warmup = None, 2, 1
        args.meo_seq_lens = args.meo_seq_lens or "128,256"
    if args.batch is not None:
        args.tokens = args.batch * args.seq_len
    args.meo_seq_lens = args.meo_seq_lens or f"{args.seq_len},{4 * args.seq_len}"
    for seq in [args.seq_len] + _ints(args.meo_seq_lens):
        if args.tokens % seq:
            p.error(f"--tokens {args.tokens} is not a multiple of sequence length {seq}")
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


# ----------------------------------------------------------------------------------------------
# device and process group


@dataclass
class Env:
    device: torch.device
    rank: int
    world: int
    created_group: bool

    def sync(self) -> None:
        if self.device.type != "cpu":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()


def setup(args: argparse.Namespace) -> Env:
    """Pick the device, start (or join) the process group DeepSpeed's MoE needs, set threads."""
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    from meo_ds.distributed import free_port, init_distributed

    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not launched:  # a 1-rank group in this process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    created = not dist.is_initialized()
    if created:
        init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        device = torch.device(get_accelerator().device_name(local_rank))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_ranks)
    torch.set_num_threads(threads)
    return Env(device, dist.get_rank(), dist.get_world_size(), created)


def tune_malloc() -> bool:
    """Make glibc reuse large freed blocks instead of unmapping and re-faulting them every step.

    By default glibc serves blocks over ~128 KiB-32 MiB with fresh mmap()s and returns them on free,
    so every large temporary costs page faults on first touch. That charges layers with many
    short-lived large temporaries (MEO's merged weights) for the allocator, not their algorithm;
    GPU runs (PyTorch's caching allocator) and CPU runs with jemalloc/tcmalloc do not pay it.
    Returns whether the settings were applied (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
        ok &= libc.mallopt(m_top_pad, 64 * 2**20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _quiet_libraries() -> None:
    import logging

    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------
# all-to-all byte counter (for layers that do not report their own)


class A2ACounter:
    """Bytes this rank sends to *other* ranks through torch.distributed.all_to_all_single while active."""

    def __init__(self) -> None:
        self.active = False
        self.bytes = 0
        self._original = None

    def install(self) -> None:
        import torch.distributed as dist

        self._original = original = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if self.active:
                self.bytes += _bytes_to_others(input, input_split_sizes, group)
            return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted

    def uninstall(self) -> None:
        import torch.distributed as dist

        if self._original is not None:
            dist.all_to_all_single = self._original
            self._original = None


def _bytes_to_others(x: torch.Tensor, splits: Optional[list[int]], group) -> int:
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    if x.dim() == 0 or x.shape[0] == 0:
        return 0
    row_bytes = x[0].numel() * x.element_size()
    if splits is None:  # equal split of dim 0
        splits = [x.shape[0] // world] * world
    return row_bytes * (sum(splits) - splits[me])


# ----------------------------------------------------------------------------------------------
# benchmark cases

# step(x [B, L, d]) -> (output [B, L, d], aux loss or None, per-forward stats)
Step = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor], dict]]


@dataclass
class Case:
    name: str
    family: str  # dense | topk | xmoe | meo | deepspeed | hf
    module: nn.Module
    seq_len: int
    step: Step
    # (measured experts/token, measured expert rows/token, executed) -> forward FLOPs/token
    flops: Callable[[float, float, bool], float]
    times: list = field(default_factory=list)  # seconds per timed round
    samples: list = field(default_factory=list)  # stats per timed round


def _ours_step(layer: nn.Module) -> Step:
    def step(x):
        out = layer(x)
        s = out.stats
        return out.hidden, out.aux_loss, {
            "tokens": s.num_tokens, "experts": s.experts_per_token_mean, "a2a": s.a2a_bytes,
            "dropped": s.dropped_fraction, "rows": s.extra.get("rows"),
        }

    return step


def _plain_step(module: nn.Module, experts: Optional[float]) -> Step:
    def step(x):
        return module(x), None, {"tokens": x.shape[0] * x.shape[1], "experts": experts, "a2a": 0, "dropped": 0.0,
                                 "rows": None}

    return step


def _deepspeed_step(moe: nn.Module) -> Step:
    """DeepSpeed's MoE; its gate's routes (negative index = dropped by capacity) give experts/token."""
    kept = {}

    def hook(_module, _inputs, output):
        indices = output[3]  # [k, S] with sparse routes
        kept["routes"] = int((indices >= 0).sum())
        kept["assigned"] = indices.numel()
        kept["rows"] = int(output[1]) * int(output[2])  # sparse routes: (l_aux, C, E, ...): E*C padded rows

    moe.deepspeed_moe.gate.register_forward_hook(hook)

    def step(x):
        out, l_aux, _counts = moe(x)
        tokens = x.shape[0] * x.shape[1]
        return out, l_aux, {
            "tokens": tokens, "experts": kept["routes"] / tokens, "a2a": None,
            "dropped": 1.0 - kept["routes"] / kept["assigned"], "rows": kept["rows"],
        }

    return step


def build_cases(args: argparse.Namespace, env: Env) -> list[Case]:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from meo_ds.moe import MoEConfig, build_moe_layer
    from meo_ds.moe.experts import SwiGLUExpert
    from meo_ds.parallel import parallelize

    d, f, E, L, cf, ep = args.d_model, args.d_ff, args.experts, args.seq_len, args.capacity_factor, args.ep
    dtype = DTYPES[args.dtype]
    cases: list[Case] = []

    def add(name, family, module, step, flops, seq_len=L):
        module.to(device=env.device, dtype=dtype).train()
        cases.append(Case(name, family, module, seq_len, step, flops))

    def moe_flops(num_experts: int, width: int) -> Callable[[float, float, bool], float]:
        """Layers that do not count themselves (DeepSpeed's, Mixtral's): SwiGLU experts of `width`."""
        return lambda m, rows, executed: 2 * d * num_experts + (rows if executed else m) * 6 * d * width

    def own_flops(layer: nn.Module, seq: int) -> Callable[[float, float, bool], float]:
        return lambda m, rows, executed: layer.flops_per_token(seq, executed=executed, experts_per_token=m,
                                                               rows_per_token=rows)

    # Weights are built from one seed in one order, so every rank builds the same router weights.
    torch.manual_seed(args.seed)
    dense = SwiGLUExpert(d, f)
    add(f"dense SwiGLU d_ff={f}", "dense", dense, _plain_step(dense, None), lambda m, rows, executed: 6 * d * f)

    for k in (1, 2):
        for mode in ("capacity", "dropless"):
            cfg = MoEConfig(kind="topk", num_experts=E, top_k=k, dispatch=mode, capacity_factor=cf)
            layer = parallelize(build_moe_layer(cfg, d, f), ep)
            label = f"cf {cf:g}" if mode == "capacity" else "dropless"
            add(f"top-{k} of {E} {label}", "topk", layer, _ours_step(layer), own_flops(layer, L))

    width = args.xmoe_width or max(1, f // 8)
    for t in _floats(args.xmoe_thresholds):
        cfg = MoEConfig(
            kind="xmoe", num_experts=args.xmoe_experts, expert_hidden=width, threshold=t, dispatch="dropless"
        )
        layer = parallelize(build_moe_layer(cfg, d, f), ep)
        with torch.no_grad():
            layer.router.weight.mul_(args.xmoe_router_scale)
        name = f"xmoe t={t:g} {args.xmoe_experts}x{width} dropless"
        add(name, "xmoe", layer, _ours_step(layer), own_flops(layer, L))

    for seq in _ints(args.meo_seq_lens):
        for n_exp in _ints(args.meo_experts):
            for k in _ints(args.meo_k):
                if k > n_exp:
                    continue
                layer = build_moe_layer(MoEConfig(kind="meo", num_experts=n_exp, top_k=k), d, f)
                # MEO gates start at zero (every sequence then takes the same experts); random gates
                # route sequences differently, as a trained gate would. Timing does not depend on it.
                with torch.no_grad():
                    for lin in layer.linears.values():
                        lin.gate_weight.normal_(std=lin.d_in**-0.5)
                add(f"meo k={k} of {n_exp} L={seq}", "meo", layer, _ours_step(layer), own_flops(layer, seq), seq)

    ds = DeepSpeedMoE(
        hidden_size=d, expert=SwiGLUExpert(d, f), num_experts=E, ep_size=ep, k=2, capacity_factor=cf,
        eval_capacity_factor=cf, min_capacity=4, drop_tokens=True,
    )
    ds.set_deepspeed_parallelism()
    add(f"deepspeed MoE top-2 of {E} cf {cf:g}", "deepspeed", ds, _deepspeed_step(ds), moe_flops(E, f))

    for impl in [s for s in args.hf_impls.split(",") if s]:
        hf_cfg = MixtralConfig(
            hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=2, router_jitter_noise=0.0
        )
        hf_cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(hf_cfg)
        with torch.no_grad():  # the block leaves its expert weights uninitialised
            block.gate.weight.normal_(std=d**-0.5)
            block.experts.gate_up_proj.uniform_(-(d**-0.5), d**-0.5)
            block.experts.down_proj.uniform_(-(f**-0.5), f**-0.5)
        add(f"hf Mixtral top-2 of {E} {impl}", "hf", block, _plain_step(block, 2.0), moe_flops(E, f))
    return cases


# ----------------------------------------------------------------------------------------------
# timing


def run_once(case: Case, x: torch.Tensor, probe: torch.Tensor, env: Env, counter: A2ACounter) -> tuple[float, dict]:
    """One forward + backward of `case` on x [T, d]; returns (seconds, stats)."""
    import torch.distributed as dist

    case.module.zero_grad(set_to_none=True)
    x.grad = None
    if env.world > 1:
        dist.barrier()
    env.sync()
    start = time.perf_counter()
    counter.bytes, counter.active = 0, True
    out, aux, stats = case.step(x.view(-1, case.seq_len, x.shape[-1]))
    counter.active = False
    loss = (out.reshape(probe.shape) * probe).sum()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    env.sync()
    elapsed = time.perf_counter() - start
    stats["a2a_counted"] = counter.bytes
    return elapsed, stats


def run_rounds(cases: list[Case], x: torch.Tensor, probe: torch.Tensor, args, env: Env, counter: A2ACounter) -> None:
    """Round-robin over all cases; round r starts at case r, so no case always follows the same one."""
    n = len(cases)
    for r in range(args.warmup + args.reps):
        for i in range(n):
            case = cases[(i + r) % n]
            seconds, stats = run_once(case, x, probe, env, counter)
            if r >= args.warmup:
                case.times.append(seconds)
                case.samples.append(stats)


def summarize(cases: list[Case], env: Env) -> list[dict]:
    """Medians (of the slowest rank per round) and statistics summed over ranks -> table rows."""
    from meo_ds.distributed import all_reduce

    # Samples may hold device tensors (RoutingStats stay on the device); read back after timing.
    times = all_reduce([c.times for c in cases], op="max")
    # per case: tokens, experts*tokens, a2a bytes (reported), a2a bytes (counted), dropped*tokens, expert rows
    sums = torch.zeros(len(cases), 6, dtype=torch.float64)
    for i, c in enumerate(cases):
        for s in c.samples:
            tokens, experts, dropped = (float(s[k]) if s[k] is not None else 0.0 for k in ("tokens", "experts", "dropped"))
            a2a = s["a2a"] if s["a2a"] is not None else s["a2a_counted"]
            rows = float(s["rows"]) if s["rows"] is not None else experts * tokens  # no padded rows: the kept ones
            sums[i] += torch.tensor([tokens, experts * tokens, a2a, s["a2a_counted"], dropped * tokens, rows],
                                    dtype=torch.float64)
    sums = all_reduce(sums)
    rows = []
    for i, c in enumerate(cases):
        tokens = sums[i, 0].item()
        ms = 1000 * statistics.median(times[i].tolist())
        experts = sums[i, 1].item() / tokens if c.samples[0]["experts"] is not None else None
        expert_rows = sums[i, 5].item() / tokens if experts is not None else None
        rows.append({
            "name": c.name,
            "family": c.family,
            "seq_len": c.seq_len,
            "ms": ms,
            "ms_min": 1000 * min(times[i].tolist()),
            "ms_max": 1000 * max(times[i].tolist()),
            "tokens_per_s": (tokens / len(c.samples)) / (ms / 1000),
            "flops_per_token": c.flops(experts, expert_rows, False),
            "executed_flops_per_token": c.flops(experts, expert_rows, True),
            "rows_per_token": expert_rows,
            "experts_per_token": experts,
            "a2a_bytes_per_token": sums[i, 2].item() / tokens,
            "a2a_counted_per_token": sums[i, 3].item() / tokens,
            "dropped_fraction": sums[i, 4].item() / tokens,
        })
    base = next(r["ms"] for r in rows if r["family"] == "dense")
    for r in rows:
        r["ratio_to_dense"] = r["ms"] / base
    return rows


# ----------------------------------------------------------------------------------------------
# output


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(args: argparse.Namespace, env: Env) -> dict:
    import deepspeed
    import transformers

    machine = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else _cpu_name()
    return {
        "machine": machine,
        "device": str(env.device),
        "threads_per_rank": torch.get_num_threads(),
        "world": env.world,
        "ep": args.ep,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "tokens_per_rank": args.tokens,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "capacity_factor": args.capacity_factor,
        "xmoe_router_scale": args.xmoe_router_scale,
        "malloc": "glibc tuned (no mmap/trim churn)" if args.malloc_tuned else "default",
    }


def format_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"bench_moe: forward+backward, median of {meta['reps']} interleaved rounds after {meta['warmup']} warm-up",
        f"machine: {meta['machine']} | {meta['device']} | {meta['threads_per_rank']} threads/rank | "
        f"world {meta['world']}, ep {meta['ep']} | torch {meta['torch']} | deepspeed {meta['deepspeed']} | "
        f"transformers {meta['transformers']}",
        f"sizes: d_model {meta['d_model']}, d_ff {meta['d_ff']}, {meta['tokens_per_rank']} tokens/rank "
        f"(seq {meta['seq_len']}), {meta['dtype']}, capacity factor {meta['capacity_factor']:g}, "
        f"xmoe router scale {meta['xmoe_router_scale']:g}, malloc {meta['malloc']}",
        "",
        f"{'layer':<38} {'ms':>9} {'tokens/s':>11} {'x dense':>8} {'MFLOP/tok':>10} {'exec MF/tok':>11} {'exp/tok':>8} "
        f"{'a2a B/tok':>10}",
    ]
    for r in rows:
        experts = f"{r['experts_per_token']:.2f}" if r["experts_per_token"] is not None else "-"
        lines.append(
            f"{r['name']:<38} {r['ms']:>9.2f} {r['tokens_per_s']:>11,.0f} {r['ratio_to_dense']:>8.2f} "
            f"{r['flops_per_token'] / 1e6:>10.3f} {r['executed_flops_per_token'] / 1e6:>11.3f} {experts:>8} "
            f"{r['a2a_bytes_per_token']:>10.1f}"
        )
    mismatched = [
        r["name"] for r in rows
        if r["family"] in ("topk", "xmoe") and abs(r["a2a_bytes_per_token"] - r["a2a_counted_per_token"]) > 1e-6
    ]
    if mismatched:
        lines.append(f"note: RoutingStats.a2a_bytes differs from the bytes counted at all_to_all_single for {mismatched}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    env = setup(args)
    args.malloc_tuned = env.device.type == "cpu" and args.malloc == "tuned" and tune_malloc()
    _quiet_libraries()
    counter = A2ACounter()
    counter.install()
    finished = False
    try:
        if env.world % args.ep:
            raise SystemExit(
                f"bench_moe: --ep {args.ep} needs a multiple of {args.ep} ranks, got {env.world}; launch with "
                f"`DS_ACCELERATOR=cpu deepspeed --num_gpus {args.ep} bench/bench_moe.py --ep {args.ep}`"
            )
        cases = build_cases(args, env)
        if args.rows:
            cases = [c for c in cases if c.family == "dense" or re.search(args.rows, c.name)]
        dtype = DTYPES[args.dtype]
        g = torch.Generator().manual_seed(args.seed + 1000 + env.rank)  # each rank its own tokens
        x = torch.randn(args.tokens, args.d_model, generator=g).to(env.device, dtype).requires_grad_(True)
        probe = torch.randn(args.tokens, args.d_model, generator=g).to(env.device, dtype)
        run_rounds(cases, x, probe, args, env, counter)
        rows = summarize(cases, env)
        meta = describe(args, env)
        if env.rank == 0:
            print(format_table(meta, rows), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        finished = True
        return rows
    finally:
        counter.uninstall()
        import torch.distributed as dist

        if dist.is_initialized() and (env.created_group or env.world > 1):
            if finished:  # after an error the other ranks may never reach a barrier
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
