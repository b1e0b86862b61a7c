"""Helpers shared by the multi-rank MoE workers (run under the deepspeed launcher, CPU, gloo)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # tests/moe: host_syncs

from meo_ds.moe import MoEConfig, MoELayer  # noqa: E402

PREFIX = "deepspeed_moe.experts.deepspeed_experts."


def script_args() -> list[str]:
    """The worker's own arguments (the launcher appends --local_rank=N)."""
    return [a for a in sys.argv[1:] if not a.startswith("--local_rank")]


def init_dist() -> tuple[int, int]:
    import torch.distributed as dist

    from meo_ds.distributed import init_distributed

    init_distributed()
    return dist.get_rank(), dist.get_world_size()


def global_to_local(state: dict, ep_rank: int, num_local: int) -> dict:
    """Full (ep=1) layer state -> the state of the ep rank holding experts ep_rank*El ... (key renaming)."""
    out = {}
    for key, value in state.items():
        if PREFIX not in key:
            out[key] = value
            continue
        head, tail = key.split(PREFIX)
        gid, rest = tail.split(".", 1)
        local = int(gid) - ep_rank * num_local
        if 0 <= local < num_local:
            out[f"{head}{PREFIX}{local}.{rest}"] = value
    return out


def expert_grads(layer: MoELayer, ep_rank: int) -> dict:
    """Gradients of the layer's local experts, keyed by global expert id."""
    out = {}
    for i, expert in enumerate(layer.experts.deepspeed_experts):
        for name, p in expert.named_parameters():
            out[(ep_rank * layer.num_local_experts + i, name)] = p.grad.clone()
    return out


def batch(seed: int, batch_size: int, seq: int, d: int, pad_from: int | None = None):
    """Deterministic tokens, padding mask and probe (for a scalar loss) of one rank's micro-batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, seq, d, generator=g, dtype=torch.float64)
    probe = torch.randn(batch_size, seq, d, generator=g, dtype=torch.float64)
    mask = torch.ones(batch_size, seq, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    return x, mask, probe


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-9) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
        err = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        raise AssertionError(f"{name}: mismatch (max abs err {err}, shapes {tuple(got.shape)} vs {tuple(want.shape)})")


def make_cfg(kind: str, mode: str, **kw) -> MoEConfig:
    base = dict(kind=kind, dispatch=mode, num_experts=4, top_k=2,
                capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.01, z_loss_coef=1e-3)
    if kind == "xmoe":  # a field of another kind is an error
        base["threshold"] = 0.6
    base.update(kw)
    return MoEConfig(**base)


def finish() -> None:
    """Tear the process group down before exit (gloo can abort a rank at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
