"""Parallelism applied to a built model: expert parallelism for the top-k and XMoE layers.

    model = build_model(cfg.model)               # parallelism-free: every MoE layer holds all E experts
    init_distributed()                           # meo_ds.distributed (deepspeed.init_distributed)
    parallelize(model, cfg.parallel.ep_size)     # shard, tag, give the layers their group
    engine, *_ = deepspeed.initialize(model=model, ...)

The model never depends on the layout: it is built from its config alone, with expert g of a
layer initialised from (layer seed, g) (moe/experts.py), so the full model is the same at every
ep size. `parallelize` then, for every top-k/XMoE layer (moe/layer.py MoELayer):

- creates DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size` once
  (`deepspeed.utils.groups`, named `ep_size_{ep_size}`; by default groups of ep_size consecutive
  ranks, strided with use_data_before_expert_parallel) and hands every layer that group;
- keeps only the experts of this rank's place in its group, ep rank r: global experts
  r*El .. r*El+El-1 with El = E / ep_size, the rank-major numbering the all-to-all
  (moe/dispatch.py) and DeepSpeed's per-expert checkpoint files both use. The others are
  dropped from the module at once. A model built under moe/experts.py's `deferred_experts()`
  (the trainer builds so) holds its experts on the meta device until here, and only the kept
  ones are materialised and initialised, so a rank never holds more than its share of the
  expert weights (4 layers of 32 experts, d 512 x 2048, ep 8: peak RSS 526 MiB against 1,837
  MiB built eagerly); an eagerly built model peaks at the full model, freed when dropped;
- tags the kept experts' parameters for the engine (allreduce=False, group_name ep_size_N):
  their gradients are averaged over the expert-data-parallel group, not the world.

At ep_size 1 nothing is dropped, but the groups are still created and the layers still get
theirs: DeepSpeed's engine reduces expert gradients through the `ep_size_1` groups, and it asks
every MoE layer (`set_deepspeed_parallelism`) whether it was parallelized, so a model handed to
`deepspeed.initialize` without this step is a clear error there. MEO layers (moe/meo.py) merge
weights instead of moving tokens: their experts are data-parallel and untouched, as are the
dense weights.

`ep_size_problems` is the one check of an expert-parallel size against the MoE layers' configs
and the world size; the run config's checks (meo_ds/config), meo-eval's --ep and `parallelize` use it.

Loading full weights into a parallelized model (meo-eval --ep): `shard_state_dict` picks this
rank's entries of a parallelism-free state dict (a consolidated checkpoint: global expert ids)
under the model's local names, and `expert_replica` says which copy of the experts this rank's
expert-parallel group is, for work divided so that every rank of a group sees the same inputs.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from meo_ds.moe import registry
from meo_ds.moe.config import MoEConfig
from meo_ds.moe.layer import MoELayer


class ParallelizeError(ValueError):
    """A parallel layout that cannot work for this model or world; the message names the fix."""


def ep_size_problems(ep_size: int, moe_configs: Iterable[MoEConfig], world_size: Optional[int] = None,
                     setting: str = "parallel.ep_size") -> list[str]:
    """Why `ep_size` cannot shard layers configured by `moe_configs` on `world_size` ranks (none: fine).
    `setting`: how the user gave ep_size, as the messages name it (meo-eval: "--ep")."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        return [f"{setting}={ep_size!r} must be an integer >= 1"]
    configs = list(moe_configs)
    sharded = [c for c in configs if registry.get(c.kind).expert_parallel]  # MEO's experts are data-parallel
    problems = []
    if ep_size > 1 and not sharded:
        if configs:
            kinds = sorted({c.kind for c in configs})
            problems.append(f"the model's MoE layers ({', '.join(kinds)}) move weights, not tokens: their experts are "
                            f"data-parallel; set {setting}=1")
        else:
            problems.append(f"{setting}={ep_size} but the model has no top-k or XMoE layer whose experts could "
                            f"be sharded; set {setting}=1")
    for num_experts in sorted({c.num_experts for c in sharded}):
        if num_experts % ep_size:
            problems.append(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; choose a "
                            f"{setting} that divides the number of experts")
    if world_size is not None and world_size % ep_size:
        problems.append(f"world size {world_size} is not divisible by ep_size={ep_size}; launch a multiple of "
                        f"{ep_size} ranks or change {setting}")
    return problems


def parallelize(model: nn.Module, ep_size: int, *, use_data_before_expert_parallel: bool = False) -> nn.Module:
    """Shard the experts of every top-k/XMoE layer of `model` over expert-parallel groups of `ep_size`
    ranks, in place (module docstring); returns `model`. Collective: every rank calls it, after
    deepspeed.init_distributed() and before deepspeed.initialize(). `use_data_before_expert_parallel`
    must equal the DeepSpeed config's `use_data_before_expert_parallel_` (the engine checks it).
    Raises ParallelizeError naming the problem and the fix."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    configs = [m.cfg for m in model.modules() if isinstance(getattr(m, "cfg", None), MoEConfig)]
    problems = ep_size_problems(ep_size, configs)
    if not problems and layers:
        problems = _process_group_problems(ep_size, configs)
    done = [i for i, layer in enumerate(layers) if layer.ep_group is not None or layer.ep_size != 1]
    if done:
        problems.append(f"MoE layer(s) {done} are already parallelized; parallelize a freshly built model once")
    if problems:
        raise ParallelizeError(_listing(problems))
    if not layers:  # dense or all-MEO: nothing to shard, no expert groups needed
        return model
    group = _expert_parallel_group(ep_size, use_data_before_expert_parallel)
    ep_rank = dist.get_rank(group)
    for layer in layers:
        layer.shard_experts(ep_size, ep_rank)
        layer.set_expert_group(group, use_data_before_expert_parallel)
    return model


def shard_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's entries of `full`, a parallelism-free state dict of `model`'s architecture (every
    expert under its global id, as export.consolidate returns a checkpoint), under the names of the
    parallelized `model`: local expert i of a layer sharded at ep rank r is global expert r*El + i.
    Only those entries are read (a memory-mapped `full` stays on disk otherwise); for a model with
    no sharded layer that is all of them, under their own names. For
    model.load_state_dict(..., strict=True)."""
    names = {id(module): name for name, module in model.named_modules()}
    offsets = {}  # key prefix of a sharded layer's local experts -> its first global expert
    for layer in (m for m in model.modules() if isinstance(m, MoELayer) and m.ep_size > 1):
        prefix = names[id(layer.experts.deepspeed_experts)] + "."
        offsets[prefix] = dist.get_rank(layer.ep_group) * layer.num_local_experts
    shard = {}
    for key in model.state_dict():
        prefix = next((p for p in offsets if key.startswith(p)), None)
        source = key
        if prefix is not None:
            local, rest = key[len(prefix):].split(".", 1)
            source = f"{prefix}{int(local) + offsets[prefix]}.{rest}"
        shard[key] = full[source]
    return shard


def expert_replica(ep_size: int) -> tuple[int, int]:
    """(index, count) of this rank's expert-parallel group among the groups of `ep_size` ranks that
    `parallelize` made: its rank in the expert-data-parallel group (the ranks holding the same experts)."""
    from deepspeed.utils import groups

    group = groups._get_expert_data_parallel_group(f"ep_size_{ep_size}")
    return dist.get_rank(group), dist.get_world_size(group)


def _process_group_problems(ep_size: int, configs: list[MoEConfig]) -> list[str]:
    import deepspeed.comm

    if not (dist.is_available() and dist.is_initialized()):
        return [f"parallelize(model, ep_size={ep_size}) needs the process group: call "
                f"meo_ds.distributed.init_distributed() (deepspeed.init_distributed) on every rank first"]
    problems = ep_size_problems(ep_size, configs, dist.get_world_size())
    if not problems and not deepspeed.comm.is_initialized():
        problems.append("torch.distributed was started without DeepSpeed, whose groups hold the expert-parallel "
                        "layout: start it with meo_ds.distributed.init_distributed() (deepspeed.init_distributed)")
    return problems


def _expert_parallel_group(ep_size: int, use_data_before_expert_parallel: bool):
    """DeepSpeed's expert-parallel group of this rank for `ep_size`, created (collectively) the first time."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name)


def _listing(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"cannot parallelize: {problems[0]}"
    return "cannot parallelize:\n  - " + "\n  - ".join(problems)
