"""Expert MLPs and the local expert bank.

Each expert is its own module so that DeepSpeed checkpoints it per expert: a layer keeps its
local experts at `deepspeed_moe.experts.deepspeed_experts[i]` (see layer.py).

`LocalExperts.forward` takes the tokens of all local experts sorted by expert, with the
number of rows of each, and computes them in one grouped GEMM where that works (bf16 SwiGLU on
an accelerator whose torch._grouped_mm runs forward and backward, probed once per device: CUDA
capability 9+) or else by a loop over the contiguous per-expert segments.
`LocalExperts.reference_forward` is the plain masked per-expert loop the tests compare with.

Initialisation is independent of the expert-parallel layout: expert g (global id) of a layer is
initialised from its own generator, seeded by (layer seed, g), with nn.Linear's default rule
(weights kaiming-uniform with a = sqrt(5), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))). The
layer seed is one draw from the global RNG per layer, and building the experts consumes nothing
else from it, so expert g and every other parameter start the same at ep 1, 2 or 4, and no two
experts start equal. (The experts are built with the global CPU RNG state restored afterwards;
build models on the CPU, as meo_ds does, for the dense weights' stream to be layout-free too.)

Built under `deferred_experts()` (the trainer does), the experts are made on the meta device, with
no memory, and `LocalExperts.keep` (MoELayer.shard_experts, called by meo_ds.parallel.parallelize)
materialises and initialises only the ones this rank keeps, with the same values as an eager
build: a rank holds at most its 1/ep share of the expert weights, even while the model is built.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLUExpert(nn.Module):
    """E(x) = W2 (silu(W1 x) * W3 x), no biases (Mixtral / Qwen3-MoE layout)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluExpert(nn.Module):
    """E(x) = W2 gelu(W1 x + b1) + b2."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden)
        self.w2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def make_expert(activation: str, d_model: int, d_hidden: int) -> nn.Module:
    if activation == "swiglu":
        return SwiGLUExpert(d_model, d_hidden)
    if activation == "gelu":
        return GeluExpert(d_model, d_hidden)
    raise ValueError(f"unknown expert activation {activation!r}; use 'swiglu' or 'gelu'")


_GROUPED_MM_WORKS: dict = {}  # torch.device -> whether torch._grouped_mm runs forward and backward there


def _grouped_mm_works(device: torch.device) -> bool:
    """Probe once per device: a tiny bf16 torch._grouped_mm forward + backward (CUDA needs
    compute capability 9+, other accelerators whatever their build supports)."""
    if device not in _GROUPED_MM_WORKS:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
            b = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
            offs = torch.arange(8, 17, 8, dtype=torch.int32, device=device)
            torch._grouped_mm(a, b, offs=offs).sum().backward()
            _GROUPED_MM_WORKS[device] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_WORKS[device] = False
    return _GROUPED_MM_WORKS[device]


def expert_seed(layer_seed: int, global_id: int) -> int:
    """The generator seed of global expert `global_id` of the layer seeded `layer_seed`."""
    return (layer_seed * 1_000_003 + global_id * 0x9E3779B97F4A7C15) % 2**63


def init_expert(expert: nn.Module, seed: int) -> None:
    """nn.Linear's default initialisation of every linear of `expert`, from a generator seeded `seed`."""
    for lin in expert.modules():
        if not isinstance(lin, nn.Linear) or lin.weight.is_meta:  # meta: shapes only (export), no values
            continue
        g = torch.Generator(device=lin.weight.device).manual_seed(seed)
        seed += 1
        with torch.no_grad():
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
            if lin.bias is not None:
                bound = 1.0 / math.sqrt(lin.in_features)
                lin.bias.uniform_(-bound, bound, generator=g)


_DEFERRED = False  # set by deferred_experts(): LocalExperts build their experts on the meta device


@contextlib.contextmanager
def deferred_experts() -> Iterator[None]:
    """Build the MoE layers' experts on the meta device, for MoELayer.shard_experts to materialise
    only the ones a rank keeps (see the module docstring). Nothing else changes."""
    global _DEFERRED
    before, _DEFERRED = _DEFERRED, True
    try:
        yield
    finally:
        _DEFERRED = before


def _grouped_mm_usable(x: torch.Tensor, experts: Sequence[nn.Module]) -> bool:
    # The CPU always takes the loop: its torch._grouped_mm has a forward but no backward.
    from deepspeed.accelerator import get_accelerator

    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and isinstance(experts[0], SwiGLUExpert)
        and x.shape[-1] % 8 == 0
        and experts[0].w1.out_features % 8 == 0
        and x.device.type == get_accelerator().device_name() != "cpu"
        and _grouped_mm_works(x.device)
    )


class LocalExperts(nn.Module):
    """The experts held by this rank; `deepspeed_experts[i]` is local expert i."""

    def __init__(self, num_local: int, activation: str, d_model: int, d_hidden: int, grouped: bool = True,
                 layer_seed: int = 0):
        """Expert g is initialised from (layer_seed, g); a layer is built with all its experts (on
        the meta device under deferred_experts()) and meo_ds.parallel.parallelize later keeps one
        ep rank's (MoELayer.shard_experts -> keep)."""
        super().__init__()
        self.layer_seed = layer_seed
        self.build_device = torch.empty(0).device  # where an eager build puts the experts (keep materialises there)
        # Building draws nothing from the global stream.
        with torch.random.fork_rng(devices=[]), torch.device("meta") if _DEFERRED else contextlib.nullcontext():
            self.deepspeed_experts = nn.ModuleList(make_expert(activation, d_model, d_hidden) for _ in range(num_local))
        for i, expert in enumerate(self.deepspeed_experts):
            init_expert(expert, expert_seed(layer_seed, i))
        self.grouped = grouped

    def keep(self, first: int, count: int) -> None:
        """Keep global experts first .. first+count-1 as local experts 0 .. count-1 and drop the
        others; the kept ones built deferred are materialised on the build's device and initialised now."""
        kept = list(self.deepspeed_experts[first:first + count])
        for global_id, expert in enumerate(kept, start=first):
            if next(expert.parameters()).is_meta:
                expert.to_empty(device=self.build_device)
                init_expert(expert, expert_seed(self.layer_seed, global_id))
        self.deepspeed_experts = nn.ModuleList(kept)

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """x: [N, d] rows sorted by local expert, counts[i] rows for expert i (sum = N)."""
        if next(self.deepspeed_experts[0].parameters()).is_meta and not x.is_meta:
            raise RuntimeError("LocalExperts: the experts were built under deferred_experts() and never "
                               "materialised; call meo_ds.parallel.parallelize(model, ep_size) first")
        if len(counts) != len(self.deepspeed_experts) or sum(counts) != x.shape[0]:
            raise ValueError(f"LocalExperts: counts {list(counts)} do not match {len(self.deepspeed_experts)} experts / {x.shape[0]} rows")
        if self.grouped and _grouped_mm_usable(x, self.deepspeed_experts):
            return self._grouped_swiglu(x, counts)
        # Every expert runs, even on zero rows, so each gets a (zero) gradient on every rank.
        return torch.cat([e(seg) for e, seg in zip(self.deepspeed_experts, torch.split(x, list(counts)))], dim=0)

    def _grouped_swiglu(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        # Counts are host ints: copy them from pinned memory without waiting for the device.
        from deepspeed.accelerator import get_accelerator

        host = get_accelerator().pin_memory(torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32))
        offs = host.to(x.device, non_blocking=True)
        w1 = torch.stack([e.w1.weight for e in self.deepspeed_experts]).transpose(1, 2)  # [E, d, f]
        w3 = torch.stack([e.w3.weight for e in self.deepspeed_experts]).transpose(1, 2)
        w2 = torch.stack([e.w2.weight for e in self.deepspeed_experts]).transpose(1, 2)  # [E, f, d]
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)

    def reference_forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Masked per-expert loop: row n goes through expert local_ids[n]; any row order."""
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.deepspeed_experts):
            mask = local_ids == i
            if mask.any():
                out[mask] = expert(x[mask])
        return out
