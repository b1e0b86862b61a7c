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
capacity drops; a2a_bytes counts the forward bytes this rank's tokens put on the wire to *other*
ranks (tokens out, results back, dropless routing metadata and split sizes: dispatch.py's wire
format), 0 at ep_size=1. Padding tokens are never routed:
they get zero output and count in no statistic or loss. `state` and `causal` are accepted for
the common interface; top-k/XMoE routing is per token, so both change nothing.

Kinds: a MoELayer runs any registered Router (routing.py); `register_router(RouterClass)` makes
its `kind` a registry kind built by MoELayer.from_config. The dispatch fields (LAYER_FIELDS) belong
to every router kind.

Accounting (asked by the models, the trainer, the benchmark and the exporter; registry.py):
`flops_per_token` counts forward FLOPs per token, router 2 d E plus m expert MLPs (2 d h per
matmul, 3 matmuls for SwiGLU, 2 for GELU). The model count (executed=False) takes m = the
measured experts per token after capacity drops (`experts_per_token`, RoutingStats), the work the
routing asks for; the executed count takes m = the expert rows actually computed per token
(`rows_per_token`): the kept assignments when dropless, E*C padded rows / T with capacity
(stats.extra["rows"]). Unmeasured: the router's nominal count (top-k k, XMoE 1), and for
executed capacity dispatch capacity_k * capacity_factor rows (C without min_capacity and rounding).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE as _DeepSpeedMoE

from . import registry
from .config import MoEConfig, MoEConfigError
from .dispatch import TokenDispatcher, counts_of
from .experts import LocalExperts
from .routing import Router, RouterOutput, ThresholdRouter, TopKRouter
from .types import MoEOutput, RoutingStats

# MoEConfig fields every router kind reads through the MoELayer (dispatch, router input and z-loss).
LAYER_FIELDS = ("dispatch", "capacity_factor", "eval_capacity_factor", "min_capacity", "z_loss_coef", "jitter")
LAYER_CARD_FIELDS = ("capacity_factor",)


class ExpertHolder(nn.Module):
    """Container that gives the experts the key prefix DeepSpeed expects (deepspeed_moe.experts)."""

    def __init__(self, experts: LocalExperts):
        super().__init__()
        self.experts = experts


def router_class(cfg: MoEConfig) -> type[Router]:
    """The registered Router class of cfg.kind (MoEConfigError for a kind with its own layer)."""
    spec = registry.get(cfg.kind)
    if spec.router is None:
        raise MoEConfigError(f"MoELayer runs routers; kind {cfg.kind!r} builds its own layer (use build_moe_layer)")
    return spec.router


class MoELayer(_DeepSpeedMoE):
    """Top-k or XMoE layer: layer(x [B, L, d], padding_mask [B, L] (True = real)) -> MoEOutput."""

    def __init__(self, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False):
        nn.Module.__init__(self)  # deliberately not MoE.__init__: we only borrow its type
        cfg.validate()
        self.cfg, self.d_model, self.d_ff, self.causal = cfg, d_model, d_ff, causal
        self.num_experts = cfg.num_experts
        self.enable_expert_tensor_parallelism = False  # read by deepspeed's flops profiler
        self.use_residual = False
        self.router = router_class(cfg).from_config(cfg, d_model)
        # One draw from the global RNG per layer (none when built on the meta device, shapes only).
        layer_seed = 0 if torch.empty(0).is_meta else int(torch.randint(0, 2**62, ()))
        experts = LocalExperts(cfg.num_experts, cfg.activation, d_model, cfg.expert_hidden or d_ff, layer_seed=layer_seed)
        self.deepspeed_moe = ExpertHolder(experts)
        self._set_layout(ep_size=1)
        self.ep_group = None  # DeepSpeed's expert-parallel group, set by meo_ds.parallel.parallelize
        self.use_data_before_expert_parallel = False
        self.dispatcher = TokenDispatcher(
            cfg.num_experts, 1, cfg.dispatch, type(self.router).capacity_k(cfg),
            cfg.capacity_factor, cfg.eval_capacity_factor, cfg.min_capacity,
        )

    @classmethod
    def from_config(cls, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False, cross: bool = False) -> "MoELayer":
        """Registry constructor; cross (a decoder layer with a source) changes nothing: routing is per token."""
        return cls(cfg, d_model, d_ff, causal=causal)

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
        local experts 0 .. El-1; the others are dropped (experts built under deferred_experts() are
        materialised here, the kept ones only). Call once, on the full (ep_size 1) layer."""
        if self.ep_size != 1:
            raise RuntimeError(f"MoELayer: already sharded (ep_size={self.ep_size}); shard a freshly built layer")
        if ep_size < 1 or self.num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"MoELayer: cannot give ep rank {ep_rank} of {ep_size} its share of {self.num_experts} "
                             f"experts; ep_size must divide num_experts and 0 <= ep_rank < ep_size")
        local = self.num_experts // ep_size
        self.experts.keep(ep_rank * local, local)
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
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, state: Optional[dict] = None,
        **context: Any,
    ) -> MoEOutput:
        """context (doc_ids, memory, memory_mask: what a sequence-level layer may read) is accepted
        for the common interface and unused: routing is per token."""
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
                extra={"capacity": info.capacity, "rows": self._rows(kept_per_token, info.capacity)},
            )

    def _rows(self, kept_per_token: torch.Tensor, capacity: int) -> torch.Tensor:
        """Expert rows computed for this forward's tokens: E*C padded slots with capacity, else the kept assignments."""
        if self.cfg.dispatch == "capacity":
            return kept_per_token.new_full((), self.num_experts * capacity)
        return kept_per_token.sum()

    # --- accounting (the module docstring) ---------------------------------------------------
    def _per_expert_flops(self) -> float:
        width = self.cfg.expert_hidden or self.d_ff
        return 2 * (3 if self.cfg.activation == "swiglu" else 2) * self.d_model * width

    def flops_per_token(self, seq_len: int = 1, executed: bool = False, experts_per_token: Optional[float] = None,
                        rows_per_token: Optional[float] = None) -> float:
        """Forward FLOPs per token (seq_len changes nothing: routing is per token)."""
        cfg, router = self.cfg, type(self.router)
        m = experts_per_token if experts_per_token is not None else router.nominal_experts_per_token(cfg)
        if executed:
            if rows_per_token is not None:
                m = rows_per_token
            elif cfg.dispatch == "capacity":
                m = router.capacity_k(cfg) * cfg.capacity_factor
        return 2 * self.d_model * self.num_experts + m * self._per_expert_flops()

    def inactive_params(self, experts_per_token: Optional[float] = None) -> float:
        """Parameters of this layer one token does not use: its unused experts (measured or nominal count)."""
        active = experts_per_token if experts_per_token is not None else type(self.router).nominal_experts_per_token(self.cfg)
        per_expert = sum(p.numel() for p in self.experts.deepspeed_experts[0].parameters())
        return (self.num_experts - active) * per_expert

    def describe(self) -> dict[str, Any]:
        """The settings the model card lists."""
        return registry.describe(self.cfg)


def register_router(router: type[Router]) -> type[Router]:
    """Make router.kind a MoE kind whose layer is a MoELayer running `router` (usable as a decorator)."""
    registry.register(registry.KindSpec(
        name=router.kind, layer=MoELayer, fields=LAYER_FIELDS + tuple(router.config_fields),
        card_fields=tuple(router.card_fields) + LAYER_CARD_FIELDS, router=router, native=router.native,
        native_problems=router.native_problems,
    ))
    return router


register_router(TopKRouter)
register_router(ThresholdRouter)

