"""The MoE kinds: what each `MoEConfig.kind` builds, which config fields it reads, what it tells others.

A kind is registered once, next to its code: layer.py registers the router kinds ("topk",
"xmoe") with `register_router(RouterClass)`, meo.py registers "meo" with `register(KindSpec(...))`.
Everything outside meo_ds/moe/ asks the registry or the layer instead of comparing kind names:

    spec = get(cfg.kind)          # KindSpec; MoEConfigError naming the known kinds
    layer = spec.build(cfg, d_model, d_ff, causal=..., cross=...)
    kinds()                       # registered names (CLI choices)
    describe(cfg)                 # the card's settings of one MoE configuration
    field_problems(cfg)           # fields of another kind set in cfg (MoEConfig.validate raises them)

and every layer answers `flops_per_token(seq_len, executed, experts_per_token, rows_per_token)`,
`inactive_params(experts_per_token)` and `describe()`.

Per-kind config fields (the design). MoEConfig stays one flat dataclass: its field names are in
every checkpoint's saved run config and in every export's config.json, and a flat dict saved
by an earlier version must load unchanged. Each kind lists the fields it reads (`KindSpec.fields`,
beyond COMMON_FIELDS, which every kind reads). A field that no spec of cfg.kind lists and whose
value differs from MoEConfig's default is an error naming the kind(s) it belongs to, instead of
being silently ignored. Consequences, chosen deliberately:
- Switching the kind of a preset (`--set model.moe.kind=xmoe`) works whenever the preset sets
  only its own kind's fields away from their defaults (every top-k preset, the demo's included:
  top_k belongs to top-k and MEO, the dispatch fields to top-k and XMoE). A preset that sets
  fields only its kind reads (xmoe_gpt's max_k, its capacity dispatch for MEO) needs them reset
  with the switch (`--set model.moe.max_k=null`); the error says which and how.
- A saved flat config loads: its other-kind fields hold the defaults they were saved with (no
  per-kind default has ever changed).
- The check compares values, not where a value came from: setting a field explicitly to its
  default is indistinguishable from not setting it, and harmless.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

# What this module reads of a config: a MoEConfig (config.py imports this module, so it names
# the type instead of importing it): a dataclass instance with a `kind` and the fields below.
MoEConfig = Any


class MoEConfigError(ValueError):
    """A MoE configuration value that cannot work; the message names the field and the fix."""


# Fields every kind reads (kind itself included).
COMMON_FIELDS = ("kind", "num_experts", "expert_hidden", "activation", "aux_loss_coef", "noisy_gating")
# Settings the model card lists for every kind, before the kind's own `card_fields`.
CARD_FIELDS = ("kind", "num_experts", "expert_hidden", "activation", "dispatch", "aux_loss_coef")


@dataclass(frozen=True)
class KindSpec:
    """One MoE kind.

    layer: the nn.Module class; `layer.from_config(cfg, d_model, d_ff, causal=, cross=)` builds it.
    fields: MoEConfig fields this kind reads beyond COMMON_FIELDS.
    card_fields: of those, the ones the model card lists (after CARD_FIELDS).
    router: the Router class a MoELayer kind runs (None: the layer routes itself, as MEO does).
    native: the transformers architecture these layers equal ("mixtral"), None if none.
    native_problems: cfg -> why a layer of this kind and cfg is not its `native` architecture.
    noisy_default: what noisy_gating=None means for this kind.
    expert_parallel: True when the experts are sharded over ep ranks and tokens move (all-to-all);
        False when they are ordinary data-parallel parameters (MEO merges weights): ep_size 1.
    """

    name: str
    layer: type
    fields: tuple[str, ...]
    card_fields: tuple[str, ...] = ()
    router: Optional[type] = None
    native: Optional[str] = None
    native_problems: Callable[[MoEConfig], list[str]] = field(default=lambda cfg: [])
    noisy_default: bool = False
    expert_parallel: bool = True

    def build(self, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False, cross: bool = False) -> nn.Module:
        """The layer for cfg; expert width cfg.expert_hidden or d_ff; cross: a decoder layer with a source."""
        return self.layer.from_config(cfg, d_model, d_ff, causal=causal, cross=cross)


_KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    """Add a kind under a new name (its fields are checked against MoEConfig at validation)."""
    if spec.name in _KINDS:
        raise MoEConfigError(f"MoE kind {spec.name!r} is already registered (by {_KINDS[spec.name].layer.__name__})")
    if not set(spec.card_fields) <= set(spec.fields):
        raise MoEConfigError(f"MoE kind {spec.name!r}: card_fields must be among its fields")
    _KINDS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a kind (tests that register one for themselves)."""
    _KINDS.pop(name, None)


def kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def get(kind: str) -> KindSpec:
    spec = _KINDS.get(kind)
    if spec is None:
        raise MoEConfigError(f"MoEConfig: kind={kind!r} is unknown; use one of {', '.join(map(repr, _KINDS))}")
    return spec


def owners(name: str) -> tuple[str, ...]:
    """The kinds that read MoEConfig field `name` (every kind for COMMON_FIELDS)."""
    if name in COMMON_FIELDS:
        return kinds()
    return tuple(k for k, spec in _KINDS.items() if name in spec.fields)


def field_problems(cfg: MoEConfig) -> list[str]:
    """Fields cfg.kind does not read whose value differs from the default (see the module docstring)."""
    spec = get(cfg.kind)
    unknown = sorted(set(spec.fields) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        return [f"MoE kind {cfg.kind!r} is registered with fields MoEConfig does not have: {unknown}"]
    problems = []
    for f in dataclasses.fields(cfg):
        if f.name in COMMON_FIELDS or f.name in spec.fields:
            continue
        value, default = getattr(cfg, f.name), _default(f)
        if value == default:
            continue
        belongs = " or ".join(repr(k) for k in owners(f.name)) or "no registered kind"
        problems.append(
            f"MoEConfig: {f.name}={value!r} is a setting of kind {belongs}, not of kind {cfg.kind!r} "
            f"(it would be ignored); remove it or set it back to its default ({f.name}={default!r}), "
            f"or use a kind that reads it"
        )
    return problems


def describe(cfg: MoEConfig) -> dict[str, Any]:
    """The settings of one MoE configuration the model card lists (CARD_FIELDS + the kind's)."""
    spec = get(cfg.kind)
    return {name: getattr(cfg, name) for name in CARD_FIELDS + tuple(spec.card_fields)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING
