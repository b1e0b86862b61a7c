"""Consolidate a DeepSpeed checkpoint into one full state dict on CPU, without launching ranks.

Layout written by `DeepSpeedEngine.save_checkpoint` (deepspeed 0.19.8, no tensor/pipeline
parallelism), all under `<dir>/<tag>/`. ZeRO stage 0-2:

- `mp_rank_00_model_states.pt`: written by data-parallel rank 0. `['module']` is the model's
  state dict *without* the experts of `deepspeed.moe.layer.MoE` layers (router weights stay),
  in the dtype the engine trained with (bf16/fp16 engines hold half-precision module weights;
  ZeRO 1/2 keep fp32 masters only in the optimizer shards, which we do not need). With MoE
  layers the file also holds `num_experts`: one entry per MoE layer, in `named_modules()` order.
  Every other top-level key (global_steps, ds_config, the trainer's client_state, ...) is kept
  as metadata.
- `layer_{L}_expert_{E}_mp_rank_00_model_states.pt`: one file per (MoE layer L, global expert
  E), a flat dict of that expert's tensors under their full names with the *global* expert id
  (`...deepspeed_moe.experts.deepspeed_experts.{E}.w1.weight`). Because ids are global, the
  files are the same whatever the expert-parallel size was, and so is the consolidation.
- `zero_pp_rank_*_mp_rank_00_optim_states.pt` / `expp_rank_*_..._optim_states.pt`: optimizer
  state, ignored.

ZeRO-3 (MEO and dense models only: no expert files) writes no mp_rank_00 file but, per rank r,
`zero_pp_rank_{r}_mp_rank_00_model_states.pt` (the module's keys with empty placeholders, plus
`param_shapes` per parameter group, buffers, tied names and the metadata) and
`zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (prefixed `bf16_` in bf16), whose
`fp32_flat_groups` hold rank r's share of every parameter's fp32 master. `_zero3_state_dict`
reassembles the parameters from those shares (the same layout DeepSpeed's zero_to_fp32.py reads,
but through safe_load) and casts them to the precision the engine trained in.

Common to both:
- `<dir>/latest`: the tag of the newest complete checkpoint (written last by rank 0).
- meo-train adds `trainer_state_rank*.pt` and, once every rank is done, `COMPLETE` with every
  file's checksum; a tag with trainer state but no `COMPLETE` is an interrupted save and is refused.

Trust (meo_ds/checkpoint.py): the default tag is the newest complete one (`latest` can lag behind
it after a crash), the files read are checked against the checksums in COMPLETE before they are
loaded, and every file is unpickled by `safe_load` (weights_only=True), never by plain pickle.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from meo_ds import checkpoint as ckpt
from meo_ds.checkpoint import MAIN_FILE, ZERO3_MODEL_FILE, ZERO3_OPTIM_FILE, CheckpointError
from meo_ds.config import ds_precision

EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
_EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_\d+_mp_rank_00_model_states\.pt$")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # ds_precision -> the engine's module dtype
_DROPPED_KEYS = ("module", "optimizer")
@dataclass
class Consolidated:
    """A full model state dict plus what the checkpoint says about itself."""

    state_dict: dict[str, torch.Tensor]
    tag: str
    path: Path  # the tag directory that was read
    num_experts: list[int] = field(default_factory=list)  # per DeepSpeed MoE layer
    metadata: dict[str, Any] = field(default_factory=dict)  # every top-level key but module/optimizer
    notes: list[str] = field(default_factory=list)  # e.g. "not verified" for a tag without checksums

    @property
    def global_steps(self) -> Optional[int]:
        return self.metadata.get("global_steps")


def resolve_tag(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[Path, str]:
    """(tag directory, tag) for `checkpoint_dir`: the given tag, else the newest complete one
    (meo-train), else the one in `latest` (a plain DeepSpeed checkpoint)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; pass a DeepSpeed checkpoint directory")
    if tag is None:
        tag = ckpt.newest_complete(root)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(_no_latest_message(root))
        tag = latest.read_text().strip()
        if not tag:
            raise CheckpointError(f"{latest} is empty; the checkpoint is incomplete (pass --tag to choose one)")
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint tag {tag!r} has no directory {tag_dir}; tags present: {_tags(root)}")
    return tag_dir, tag


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))


def _no_latest_message(root: Path) -> str:
    tags = _tags(root)
    if not tags:
        if any(root.glob("*model_states.pt")):
            return (
                f"{root} is a checkpoint tag directory, not a checkpoint directory; pass its parent "
                f"{root.parent} with --tag {root.name}"
            )
        return f"{root} is not a DeepSpeed checkpoint directory (no 'latest' file and no tag directories)"
    return (
        f"{root} has no 'latest' file, so its checkpoint may be incomplete (DeepSpeed writes 'latest' "
        f"last); pass --tag to export one of the tags present: {tags}"
    )


def _load(path: Path) -> Any:
    # mmap keeps large expert files out of memory until their tensors are touched.
    return ckpt.safe_load(path, mmap=True)


def _check_layout(tag_dir: Path) -> None:
    names = {p.name for p in tag_dir.iterdir()}
    if any(n.startswith(ckpt.TRAINER_STATE_PREFIX) for n in names) and ckpt.COMPLETE not in names:
        raise CheckpointError(
            f"{tag_dir} has no {ckpt.COMPLETE} marker: meo-train did not finish writing this checkpoint; "
            f"export another tag"
        )
    if MAIN_FILE in names:
        if any(n.startswith("mp_rank_") and n != MAIN_FILE and n.endswith("_model_states.pt") for n in names):
            raise CheckpointError(f"{tag_dir} holds tensor-parallel shards (mp_rank_01...); only mp size 1 is supported")
        return
    if any(_ZERO3_MODEL_RE.match(n) for n in names):
        return
    raise CheckpointError(f"{tag_dir} has no {MAIN_FILE}; it is not a (complete) DeepSpeed checkpoint")


def _expert_files(tag_dir: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for p in tag_dir.iterdir():
        m = _EXPERT_RE.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    return found


def _merge_experts(state_dict: dict, tag_dir: Path, num_experts: list[int]) -> None:
    files = _expert_files(tag_dir)
    expected = {(layer, e) for layer, n in enumerate(num_experts) for e in range(n)}
    stray = sorted(set(files) - expected)
    if stray:
        raise CheckpointError(
            f"{tag_dir} has expert files {[files[k].name for k in stray]} that the checkpoint's "
            f"num_experts={num_experts} does not account for; the directory mixes checkpoints"
        )
    for layer, e in sorted(expected):
        if (layer, e) not in files:
            name = EXPERT_FILE.format(layer=layer, expert=e)
            raise CheckpointError(
                f"missing expert file {tag_dir / name} (MoE layer {layer} has {num_experts[layer]} experts); "
                f"the checkpoint is incomplete"
            )
        shard = _load(files[(layer, e)])
        if not isinstance(shard, dict) or not shard:
            raise CheckpointError(f"{files[(layer, e)]} holds no expert tensors")
        clash = set(shard) & set(state_dict)
        if clash:
            raise CheckpointError(f"{files[(layer, e)]} repeats keys already loaded: {sorted(clash)[:3]}")
        state_dict.update(shard)


def _zero3_files(tag_dir: Path) -> tuple[list[str], list[str]]:
    """(model-state files, optimizer-state files) of a ZeRO-3 tag, by rank; CheckpointError if a rank's is missing."""
    ranks = sum(1 for p in tag_dir.iterdir() if _ZERO3_MODEL_RE.match(p.name))
    model = [ZERO3_MODEL_FILE.format(rank=r) for r in range(ranks)]
    # DeepSpeed prefixes the optimizer files with "bf16_" when it trains in bf16.
    optim = [next((p + name for p in ("", "bf16_") if (tag_dir / (p + name)).is_file()), name)
             for name in (ZERO3_OPTIM_FILE.format(rank=r) for r in range(ranks))]
    missing = [n for n in model + optim if not (tag_dir / n).is_file()]
    if missing:
        raise CheckpointError(f"{tag_dir} is a ZeRO-3 checkpoint of {ranks} rank(s) missing {missing[:3]}; "
                              f"the checkpoint is incomplete")
    return model, optim


def _zero3_state_dict(tag_dir: Path, main: dict, optim_files: list[str]) -> dict[str, torch.Tensor]:
    """The full weights of a ZeRO-3 tag, from the fp32 masters in the ranks' optimizer files.

    Each rank's file holds one flat fp32 tensor per parameter group. A parameter of n elements
    owns ceil(n / world) of them on every rank (the last rank's tail is padding), at the same
    offset on every rank, in `param_shapes` order: concatenated over the ranks and cut to n, it
    is the parameter. Cast to the precision the engine trained in (what its bf16/fp16 module
    computed with, as a ZeRO 0-2 checkpoint holds it); tied parameters (`shared_params`) and
    buffers come from rank 0's model-state file."""
    world = len(optim_files)
    flats = []
    for name in optim_files:
        state = _load(tag_dir / name).get("optimizer_state_dict", {})
        if state.get("partition_count") != world or not isinstance(state.get("fp32_flat_groups"), list):
            raise CheckpointError(f"{tag_dir / name} is not a ZeRO-3 optimizer partition of {world} ranks "
                                  f"(partition_count {state.get('partition_count')})")
        flats.append(state["fp32_flat_groups"])
    if main.get("frozen_param_shapes"):
        raise CheckpointError(f"{tag_dir} holds frozen parameters, which export of ZeRO-3 checkpoints does not read")
    dtype = _DTYPES.get(ds_precision(main.get("ds_config") or {}) or "", torch.float32)
    full: dict[str, torch.Tensor] = {}
    for group, shapes in enumerate(main["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = -(-numel // world)
            pieces = [flat[group].narrow(0, offset, part) for flat in flats]
            full[name] = torch.cat(pieces)[:numel].view(shape).to(dtype)
            offset += part
        if offset != flats[0][group].numel():
            raise CheckpointError(f"{tag_dir}: parameter group {group} holds {flats[0][group].numel()} elements per "
                                  f"rank, its parameters account for {offset}; the files do not belong together")
    for name in main.get("buffer_names") or []:
        full[name] = main["module"][name]
    for name, source in (main.get("shared_params") or {}).items():
        full[name] = full[source]
    missing = [k for k in main["module"] if k not in full]
    if missing:
        raise CheckpointError(f"{tag_dir}: the ZeRO-3 files hold no values for {missing[:4]}")
    return {k: full[k] for k in main["module"]}


def consolidate(checkpoint_dir: str | Path, tag: Optional[str] = None, collective: bool = False) -> Consolidated:
    """Read a DeepSpeed checkpoint (ZeRO 0-2 at any expert-parallel size, or ZeRO-3) into one CPU state dict.
    `collective`: launched ranks that all consolidate it share the checksum work (checkpoint.verify_files)."""
    tag_dir, tag = resolve_tag(checkpoint_dir, tag)
    _check_layout(tag_dir)
    zero3 = None if (tag_dir / MAIN_FILE).is_file() else _zero3_files(tag_dir)
    main_file = zero3[0][0] if zero3 else MAIN_FILE
    note = _verify(tag_dir, zero3[0] + zero3[1] if zero3 else None, collective)
    main = _load(tag_dir / main_file)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise CheckpointError(f"{tag_dir / main_file} has no 'module' state dict; not a DeepSpeed model checkpoint")
    state_dict = _zero3_state_dict(tag_dir, main, zero3[1]) if zero3 else dict(main["module"])
    num_experts = [int(n) for n in (main.get("num_experts") or [])]
    if num_experts:
        _merge_experts(state_dict, tag_dir, num_experts)
    elif _expert_files(tag_dir):
        raise CheckpointError(f"{tag_dir} has expert files but {main_file} records no MoE layers")
    metadata = {k: v for k, v in main.items() if k not in _DROPPED_KEYS}
    return Consolidated(state_dict=state_dict, tag=tag, path=tag_dir, num_experts=num_experts, metadata=metadata,
                        notes=[note] if note else [])


def _verify(tag_dir: Path, zero3_files: Optional[list[str]] = None, collective: bool = False) -> Optional[str]:
    """The files read (main + experts; ZeRO-3: every rank's model and optimizer state) against
    COMPLETE's checksums."""
    if not (tag_dir / ckpt.COMPLETE).is_file():
        return ckpt.unverified_note(tag_dir)
    names = zero3_files or [MAIN_FILE] + sorted(p.name for p in _expert_files(tag_dir).values())
    return ckpt.verify_files(tag_dir, names, collective)


def local_to_global(key: str, local_offset: int) -> str:
    """Rename `...deepspeed_experts.{i}.` to `...deepspeed_experts.{i + local_offset}.` (test helper)."""
    return re.sub(
        r"(\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.",
        lambda m: f"{m.group(1)}{int(m.group(2)) + local_offset}.",
        key,
    )
