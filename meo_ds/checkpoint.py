"""Checkpoints: DeepSpeed engine state + per-rank trainer state, keep-last-K, a safe `latest`.

Layout of a checkpoint directory:

    <dir>/step_00000100/            one tag per saved step
        mp_rank_00_model_states.pt, layer_*_expert_*_model_states.pt, *optim_states.pt
                                     written by engine.save_checkpoint (experts per file)
        trainer_state_rank00000.pt   this rank's trainer state: step, data position, RNG states
        COMPLETE                     written by rank 0 once every rank finished writing
    <dir>/latest                    the tag of the newest COMPLETE checkpoint

`latest` moves (atomically: write + rename) only after every rank has written every file and
passed a barrier, so a rank dying in the middle of a save leaves `latest` on the previous
checkpoint; such an incomplete tag directory is removed at the next start. The engine's own
`latest` file is never written (save_latest=False); ours uses the same format, so
`engine.load_checkpoint(dir)` also understands it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_state_rank{rank:05d}.pt"


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


# --------------------------------------------------------------------------- save
@dataclass
class SaveResult:
    tag: str
    path: Path
    removed: list[str]


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    keep_last: int,
    mid_save_hook: Optional[Callable[[], None]] = None,
    info: Optional[dict] = None,
) -> SaveResult:
    """Save on every rank; `latest` moves only when all ranks are done. Collective."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = dist.get_rank()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if mid_save_hook is not None:
            mid_save_hook()
        torch.save(rank_state, rank_state_path(ckpt_dir / tag, rank))
    except (OSError, RuntimeError) as err:  # torch/DeepSpeed word a full or read-only disk unhelpfully
        raise CheckpointSaveError(describe_save_error(ckpt_dir / tag, err)) from err
    dist.barrier()  # every rank has written every file of this tag
    removed: list[str] = []
    if rank == 0:
        marker = {**(info or {}), "step": step, "world_size": dist.get_world_size(), "time": time.time()}
        _atomic_write(ckpt_dir / tag / COMPLETE, json.dumps(marker))
        _atomic_write(ckpt_dir / LATEST, tag)
        removed = prune(ckpt_dir, keep_last)
    dist.barrier()  # nobody reads or writes the directory while rank 0 prunes it
    return SaveResult(tag=tag, path=ckpt_dir / tag, removed=removed)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the path, the cause and the fix."""


def describe_save_error(path: Path, err: BaseException) -> str:
    """Why writing under `path` failed, in words: a read-only file system, a full disk, missing
    permission, or else the error itself (torch reports all of them as `basic_ios::clear:
    iostream error` or a wrong "Parent directory does not exist")."""
    import errno

    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    code = getattr(err, "errno", None)
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    if code == errno.EROFS or stats.f_flag & os.ST_RDONLY:
        reason = f"{existing} is on a read-only file system"
    elif code in (errno.ENOSPC, errno.EDQUOT) or free < (1 << 20):
        reason = f"the disk holding {existing} is full ({free / 2**20:.1f} MiB free)"
    elif code == errno.EACCES or not os.access(existing, os.W_OK):
        reason = f"no permission to write in {existing}"
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return (f"cannot write checkpoint {path}: {reason}. Free space or make it writable, or set checkpoint.dir "
            f"elsewhere; the last complete checkpoint (`latest`) is untouched and resumes the run")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if step_of(p.name) is not None and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def incomplete_tags(ckpt_dir: Path) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if step_of(p.name) is not None and not (p / COMPLETE).is_file())


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    latest = read_latest(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    doomed = [t for t in tags[: max(0, len(tags) - keep_last)] if t != latest]
    for tag in doomed:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
    return doomed


def remove_incomplete(ckpt_dir: Path) -> list[str]:
    """Remove tag directories a crashed save left behind (rank 0, before training starts)."""
    tags = incomplete_tags(ckpt_dir)
    for tag in tags:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
    return tags


# --------------------------------------------------------------------------- load
def read_latest(ckpt_dir: Path) -> Optional[str]:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


@dataclass
class ResumePoint:
    load_dir: Path  # the directory holding the tag directory
    tag: str

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag


def resolve(spec: str, default_dir: Path) -> Optional[ResumePoint]:
    """`checkpoint.resume` / `checkpoint.init_from` -> where to load from (None: start fresh).

    "auto": <default_dir>/latest if it exists. "none"/"": nothing. A directory with a `latest`
    file: its latest. A tag directory (with COMPLETE): that checkpoint.
    """
    if spec in ("", "none"):
        return None
    base = Path(default_dir) if spec == "auto" else Path(spec)
    if (base / COMPLETE).is_file():
        return ResumePoint(base.parent, base.name)
    tag = read_latest(base)
    if tag is None:
        if spec == "auto":
            return None
        raise FileNotFoundError(f"{spec!r} is neither a complete checkpoint nor a directory with a `latest` file")
    if not (base / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"{base / LATEST} names {tag!r}, which is not a complete checkpoint; remove the pointer or resume from another tag")
    return ResumePoint(base, tag)


def load_rank_state(point: ResumePoint, rank: int) -> Optional[dict]:
    path = rank_state_path(point.path, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
