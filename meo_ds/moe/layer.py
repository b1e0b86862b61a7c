"""MoELayer: router + dispatcher + experts, recognised by the DeepSpeed engine as an MoE layer.

The engine (deepspeed 0.19.8 runtime/engine.py) treats a module as MoE only if it is an
instance of `deepspeed.moe.layer.MoE`. MoELayer therefore subclasses it *without* running its
__init__ (it is an nn.Module with our own parts) and provides what the engine reads:
`num_experts`, `num_local_experts`, `ep_size`, `expert_group_name` and
`set_deepspeed_parallelism`; they always describe the layer's current layout.

A layer is built parallelism-free: all E experts, ep_size 1, no process group. Expert
parallelism is applied afterwards by meo_ds/parallel.py (`parallelize`), through two steps here:
`shard_experts(ep_size, ep_rank)` keeps the experts of one ep rank and re-tags them, and
`set_expert_group(group)` hands over DeepSpeed's expert-parallel group. Nothing is created
lazily: a sharded layer without its group fails in forward, and the engine's call of
`set_deepspeed_parallelism` fails on a layer that was not parallelized, each naming the fix.
The engine checkpoints every state_dict key containing "expert" as
an expert weight, expecting `.deepspeed_moe.experts.deepspeed_experts.{local_id}.` in it; so the
local experts live at `self.deepspeed_moe.experts.deepspeed_experts[i]` and no other parameter
or buffer of the layer has "expert" in its name (the router's are `router.weight`,
`router.noise_weight`).

Statistics (RoutingStats, per forward, this rank): expert_load counts assignments before
capacity drops; a2a_bytes counts the bytes this rank sent to *other* ranks (tokens out, results
back, and the dropless per-expert counts), 0 at ep_size=1. Padding tokens are never routed:
they get zero output and count in no statistic or loss. `state` and `causal` are accepted for
the common interface; top-k/XMoE routing is per token, so both change nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE as _DeepSpeedMoE

from .config import MoEConfig, MoEConfigError
from .dispatch import TokenDispatcher, counts_of
from .experts import LocalExperts
from .routing import RouterOutput, ThresholdRouter, TopKRouter
from .types import MoEOutput, RoutingStats


class ExpertHolder(nn.Module):
    """Container that gives the experts the key prefix DeepSpeed expects (deepspeed_moe.experts)."""

    def __init__(self, experts: LocalExperts):
        super().__init__()
        self.experts = experts


def build_router(cfg: MoEConfig, d_model: int) -> nn.Module:
    if cfg.kind == "topk":
        return TopKRouter(d_model, cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.noisy_gating, cfg.jitter)
    if cfg.kind == "xmoe":
        return ThresholdRouter(d_model, cfg.num_experts, cfg.threshold, cfg.max_k, cfg.noisy_gating, cfg.jitter)
    raise MoEConfigError(f"MoELayer handles kind 'topk' and 'xmoe', not {cfg.kind!r} (use build_moe_layer)")


class MoELayer(_DeepSpeedMoE):
    """Top-k or XMoE layer: layer(x [B, L, d], padding_mask [B, L] (True = real)) -> MoEOutput."""

    def __init__(self, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False):
        nn.Module.__init__(self)  # deliberately not MoE.__init__: we only borrow its type
        cfg.validate()
        self.cfg, self.d_model, self.causal = cfg, d_model, causal
        self.num_experts = cfg.num_experts
        self.enable_expert_tensor_parallelism = False  # read by deepspeed's flops profiler
        self.use_residual = False
        self.router = build_router(cfg, d_model)
        # One draw from the global RNG per layer (none when built on the meta device, shapes only).
        layer_seed = 0 if torch.empty(0).is_meta else int(torch.randint(0, 2**62, ()))
        experts = LocalExperts(cfg.num_experts, cfg.activation, d_model, cfg.expert_hidden or d_ff, layer_seed=layer_seed)
        self.deepspeed_moe = ExpertHolder(experts)
        self._set_layout(ep_size=1)
        self.ep_group = None  # DeepSpeed's expert-parallel group, set by meo_ds.parallel.parallelize
        self.use_data_before_expert_parallel = False
        self.dispatcher = TokenDispatcher(
            cfg.num_experts, 1, cfg.dispatch, cfg.top_k if cfg.kind == "topk" else 1,
            cfg.capacity_factor, cfg.eval_capacity_factor, cfg.min_capacity,
        )

    @property
    def experts(self) -> LocalExperts:
        return self.deepspeed_moe.experts

    # --- expert parallelism (applied by meo_ds.parallel.parallelize) ---------------------------
    def _set_layout(self, ep_size: int) -> None:
        """The engine's view of the layout, and the experts' tags: allreduce=False makes DeepSpeed
        reduce their gradients over the expert-data-parallel group `group_name`, not the world."""
        self.ep_size = ep_size
        self.num_local_experts = self.num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        for p in self.experts.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    def shard_experts(self, ep_size: int, ep_rank: int) -> None:
        """Keep only global experts ep_rank*El .. ep_rank*El+El-1 (El = num_experts / ep_size), as
        local experts 0 .. El-1; the others are dropped. Call once, on the full (ep_size 1) layer."""
        if self.ep_size != 1:
            raise RuntimeError(f"MoELayer: already sharded (ep_size={self.ep_size}); shard a freshly built layer")
        if ep_size < 1 or self.num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"MoELayer: cannot give ep rank {ep_rank} of {ep_size} its share of {self.num_experts} "
                             f"experts; ep_size must divide num_experts and 0 <= ep_rank < ep_size")
        local = self.num_experts // ep_size
        kept = self.experts.deepspeed_experts[ep_rank * local:(ep_rank + 1) * local]
        self.experts.deepspeed_experts = nn.ModuleList(list(kept))
        self._set_layout(ep_size)
        self.dispatcher.ep_size = ep_size

    def set_expert_group(self, group, use_data_before_expert_parallel: bool = False) -> None:
        """Hand over DeepSpeed's expert-parallel group of `ep_size` ranks (and the layout flag it was made with)."""
        self.ep_group = group
        self.use_data_before_expert_parallel = use_data_before_expert_parallel

    # --- DeepSpeed hooks -----------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize on every MoE layer: checks that parallelize gave this layer
        its group, with the DeepSpeed config's layout flag. Creates nothing."""
        if self.ep_group is None:
            raise RuntimeError(
                "MoELayer: this layer was not parallelized; call meo_ds.parallel.parallelize(model, ep_size) "
                "after deepspeed.init_distributed() and before deepspeed.initialize() (ep_size 1 included)"
            )
        if bool(use_data_before_expert_parallel_) != self.use_data_before_expert_parallel:
            raise RuntimeError(
                f"MoELayer: the DeepSpeed config has use_data_before_expert_parallel_={use_data_before_expert_parallel_} "
                f"but parallelize was called with use_data_before_expert_parallel={self.use_data_before_expert_parallel}; "
                f"pass the same value to both"
            )

    def _group(self):
        if self.ep_size == 1:
            return None
        if self.ep_group is None:
            raise RuntimeError(
                f"MoELayer: sharded for ep_size={self.ep_size} but has no expert-parallel group; apply "
                f"meo_ds.parallel.parallelize(model, ep_size) (after deepspeed.init_distributed()) instead of "
                f"shard_experts alone"
            )
        return self.ep_group

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, state: Optional[dict] = None
    ) -> MoEOutput:
        self._check_input(x, padding_mask)
        flat = x.reshape(-1, x.shape[-1])
        real = None if padding_mask is None else padding_mask.reshape(-1).nonzero().squeeze(1)
        tokens = flat if real is None else flat.index_select(0, real)
        route = self.router(tokens)
        y, info = self.dispatcher(tokens, route, self.experts, self.training, self._group())
        out = y if real is None else flat.new_zeros(flat.shape).index_copy(0, real, y)
        aux = self.cfg.aux_loss_coef * route.balance_loss + self.cfg.z_loss_coef * route.z_loss
        return MoEOutput(out.view(x.shape), aux, self._stats(route, info))

    def _check_input(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer: input must be [batch, seq, d_model={self.d_model}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MoELayer: input must be a floating-point tensor, got {x.dtype}")
        if padding_mask is not None and (padding_mask.shape != x.shape[:2] or padding_mask.dtype != torch.bool):
            raise ValueError(
                f"MoELayer: padding_mask must be a bool tensor of shape {tuple(x.shape[:2])} (True = real token), "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )

    def _stats(self, route: RouterOutput, info) -> RoutingStats:
        """Device-side statistics (no host sync; see types.py)."""
        with torch.no_grad():
            E = self.num_experts
            ids = torch.where(route.valid, route.expert_ids, E).flatten()  # invalid slots -> bin E, dropped
            load = counts_of(ids, E + 1)[:E]
            assigned = route.valid.sum()
            kept_per_token = info.keep.sum(dim=1)
            num_tokens = kept_per_token.new_full((), kept_per_token.shape[0])
            return RoutingStats(
                expert_load=load,
                num_tokens=num_tokens,
                dropped_fraction=(assigned - kept_per_token.sum()) / assigned.clamp_min(1),
                experts_per_token_mean=kept_per_token.sum() / num_tokens.clamp_min(1),
                experts_per_token_hist=counts_of(kept_per_token, E + 1),
                balance_loss=route.balance_loss.detach(),
                z_loss=route.z_loss.detach(),
                a2a_bytes=info.a2a_bytes,
                extra={"capacity": info.capacity},
            )

