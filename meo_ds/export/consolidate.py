"""Consolidate a DeepSpeed checkpoint into one full state dict on CPU, without launching ranks.

Layout written by `DeepSpeedEngine.save_checkpoint` (deepspeed 0.19.8, ZeRO stage 0-2, no
tensor/pipeline parallelism), all under `<dir>/<tag>/`:

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
- `<dir>/latest`: the tag of the newest complete checkpoint (written last by rank 0).
- meo-train adds `trainer_state_rank*.pt` and, once every rank is done, `COMPLETE` with every
  file's checksum; a tag with trainer state but no `COMPLETE` is an interrupted save and is refused.

Trust (meo_ds/checkpoint.py): the default tag is the newest complete one (`latest` can lag behind
it after a crash), the files read are checked against the checksums in COMPLETE before they are
loaded, and every file is unpickled by `safe_load` (weights_only=True), never by plain pickle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from meo_ds import checkpoint as ckpt
from meo_ds.checkpoint import CheckpointError

MAIN_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
_EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
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
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names):
        raise CheckpointError(
            f"{tag_dir} is a ZeRO stage 3 checkpoint (parameters partitioned); export supports ZeRO 0-2. "
            f"Convert it first with DeepSpeed's zero_to_fp32.py"
        )
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


def consolidate(checkpoint_dir: str | Path, tag: Optional[str] = None) -> Consolidated:
    """Read a ZeRO 0-2 DeepSpeed checkpoint (any expert-parallel size) into one CPU state dict."""
    tag_dir, tag = resolve_tag(checkpoint_dir, tag)
    _check_layout(tag_dir)
    note = _verify(tag_dir)
    main = _load(tag_dir / MAIN_FILE)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise CheckpointError(f"{tag_dir / MAIN_FILE} has no 'module' state dict; not a DeepSpeed model checkpoint")
    state_dict = dict(main["module"])
    num_experts = [int(n) for n in (main.get("num_experts") or [])]
    if num_experts:
        _merge_experts(state_dict, tag_dir, num_experts)
    elif _expert_files(tag_dir):
        raise CheckpointError(f"{tag_dir} has expert files but {MAIN_FILE} records no MoE layers")
    metadata = {k: v for k, v in main.items() if k not in _DROPPED_KEYS}
    return Consolidated(state_dict=state_dict, tag=tag, path=tag_dir, num_experts=num_experts, metadata=metadata,
                        notes=[note] if note else [])


def _verify(tag_dir: Path) -> Optional[str]:
    """The model files (main + experts) against COMPLETE's checksums; the optimizer state is not read."""
    if not (tag_dir / ckpt.COMPLETE).is_file():
        return ckpt.unverified_note(tag_dir)
    names = [MAIN_FILE] + sorted(p.name for p in _expert_files(tag_dir).values())
    return ckpt.verify_files(tag_dir, names)


def local_to_global(key: str, local_offset: int) -> str:
    """Rename `...deepspeed_experts.{i}.` to `...deepspeed_experts.{i + local_offset}.` (test helper)."""
    return re.sub(
        r"(\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.",
        lambda m: f"{m.group(1)}{int(m.group(2)) + local_offset}.",
        key,
    )
