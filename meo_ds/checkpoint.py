"""Checkpoints: DeepSpeed engine state + per-rank trainer state, keep-last-K, a safe `latest`,
checksums, and loading that never runs code from a file.

Layout of a checkpoint directory:

    <dir>/step_00000100/            one tag per saved step
        mp_rank_00_model_states.pt, layer_*_expert_*_model_states.pt, *optim_states.pt
                                     written by engine.save_checkpoint (experts per file)
        trainer_state_rank00000.pt   this rank's trainer state: step, data position, RNG states
        COMPLETE                     JSON written by rank 0 once every rank finished writing:
                                     step, world/ep size (the layout the files were written in,
                                     which resume compares; the ep size is recorded nowhere else
                                     but in the saved run config's `parallel` section), and
                                     `files`: {name: {bytes, sha256}} for every other file of
                                     the tag (every rank's)
    <dir>/latest                    the tag of the newest COMPLETE checkpoint

`latest` moves (atomically: write + rename) only after every rank has written every file and
passed a barrier, so a rank dying in the middle of a save leaves `latest` on the previous
checkpoint; such an incomplete tag directory is removed at the next start. A crash between
COMPLETE and `latest` leaves `latest` behind a complete tag: `repair_latest` (start-up) moves it
forward. The engine's own `latest` file is never written (save_latest=False); ours uses the same
format, so `engine.load_checkpoint(dir)` also understands it.

Checksums. After the barrier every rank hashes a share of the tag's files (file i goes to rank
i mod world), rank 0 gathers the digests into COMPLETE; resume (`verify_collectively`, each rank
its share again) and export (`verify_files`, the files it reads; meo-eval's launched ranks a share
each) compare them before loading, so
flipped or zeroed bytes name the file and the tag instead of loading garbage. sha256 (hashlib,
~1.7 GB/s on one core with SHA extensions) is cheap next to writing the bytes, and sound; spread
over the ranks it costs size / (world * 1.7 GB/s) (the 20 MB demo tag: 14 ms on one core). Every
rank reads files other ranks wrote, so the directory must be on a file system all ranks see
(DeepSpeed's default; not use_node_local_storage). COMPLETE itself is not covered: the digests
detect corruption, not a deliberate edit. Tags written before checksums were recorded (COMPLETE
without `files`) load with a warning that they were not verified.

Loading. Every file goes through `safe_load`: torch.load(weights_only=True), which rebuilds only
tensors, plain containers and the types `safe_types()` lists, so a pickle payload in a checkpoint
file raises CheckpointError naming the file instead of running. Those types are exactly the
non-tensor ones our files hold, found by scanning checkpoints the trainer wrote under ZeRO 0/1/2/3
in fp32 and bf16: numpy's RNG state array (trainer_state_rank*.pt) and DeepSpeed's ZeroStageEnum,
fragment_address and LossScaler (its optimizer state files), plus DynamicLossScaler, LossScaler's
fp16 form, which CPU runs cannot produce; all are rebuilt from their fields without calling
anything else. DeepSpeed's engine reads its files through `engine.checkpoint_engine.load`;
`load_engine_checkpoint` routes that through `safe_load` as well, after `verify_collectively` has
safe-unpickled every file on some rank, so a refused file stops all ranks together (exit 2)
rather than one rank in the middle of DeepSpeed's load.

ZeRO stages. Under ZeRO 0-2 the module is one file (MAIN_FILE, plus expert files); ZeRO-3 writes
each rank's partition instead (`holds_whole_module` tells them apart), and DeepSpeed reads only
the files of its own stage. A resume is exact (`exact_resume`) only at the same world size, ep
size and ZeRO-3-ness; otherwise it loads the weights only. Where ZeRO-3 is on either side the
trainer consolidates the tag (meo_ds/export/consolidate.py reads both, through safe_load) into the
model before deepspeed.initialize: DeepSpeed's own ZeRO-3 weights-only load goes through
zero_to_fp32, which unpickles with weights_only=False.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from meo_ds.distributed import all_gather_objects
from meo_ds.fileio import atomic_write as _atomic_write

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE_PREFIX = "trainer_state_rank"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_HASH_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do.

    `all_ranks`: every rank raised the same error (a collective check), so one rank may report it."""

    def __init__(self, message: str, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


# DeepSpeed's file of the whole (non-expert) module under ZeRO 0-2; ZeRO-3 writes each rank's
# partition of the module and of the optimizer state (the latter prefixed "bf16_" in bf16) instead.
MAIN_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
ZERO3_OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"{TRAINER_STATE_PREFIX}{rank:05d}.pt"


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
    """Save on every rank; COMPLETE (with every file's checksum) and `latest` are written only when
    all ranks are done. Collective."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if mid_save_hook is not None:
            mid_save_hook()
        torch.save(rank_state, rank_state_path(ckpt_dir / tag, rank))
    except (OSError, RuntimeError) as err:  # torch/DeepSpeed word a full or read-only disk unhelpfully
        raise CheckpointSaveError(describe_save_error(ckpt_dir / tag, err)) from err
    dist.barrier()  # every rank has written every file of this tag
    names = tag_files(ckpt_dir / tag)
    digests = {name: file_digest(ckpt_dir / tag / name) for name in names[rank::world]}
    gathered = all_gather_objects(digests)
    removed: list[str] = []
    if rank == 0:
        files = {name: d for part in gathered for name, d in part.items()}
        mark_complete(ckpt_dir, tag, step, world, files, **(info or {}))
        removed = prune(ckpt_dir, keep_last)
    dist.barrier()  # nobody reads or writes the directory while rank 0 prunes it
    return SaveResult(tag=tag, path=ckpt_dir / tag, removed=removed)


def mark_complete(ckpt_dir: Path, tag: str, step: int, world_size: int, files: dict, **info: Any) -> None:
    """Write the tag's COMPLETE marker (step, layout, `info`, every file's checksum), then point
    `latest` at the tag: each atomically, in that order."""
    marker = {**info, "step": step, "world_size": world_size, "time": time.time(), "files": files}
    _atomic_write(Path(ckpt_dir) / tag / COMPLETE, json.dumps(marker))
    _atomic_write(Path(ckpt_dir) / LATEST, tag)


# --------------------------------------------------------------------------- checksums
def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag (relative names, sorted) but the COMPLETE marker and its temporaries."""
    tag_dir = Path(tag_dir)
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(COMPLETE))


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def read_marker(tag_dir: Path) -> dict:
    """The COMPLETE marker of a tag as a dict (CheckpointError if missing or unreadable)."""
    path = Path(tag_dir) / COMPLETE
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir} has no {COMPLETE} marker: the save of this tag did not finish; "
                              f"use another tag") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); the marker is damaged: use another tag") from err
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the marker is damaged: use another tag")
    return marker


def recorded_files(tag_dir: Path) -> Optional[dict]:
    """{name: {bytes, sha256}} recorded in COMPLETE, or None for a tag saved before checksums."""
    files = read_marker(tag_dir).get("files")
    return files if isinstance(files, dict) else None


def check_files(tag_dir: Path, names: list[str], recorded: dict) -> list[str]:
    """Problems (one line per file) of `names` against their recorded size and digest."""
    problems = []
    for name in names:
        path, want = Path(tag_dir) / name, recorded.get(name)
        if want is None:
            problems.append(f"{name}: no checksum was recorded for it when the tag was completed")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        else:
            got = file_digest(path)
            if got["bytes"] != want.get("bytes"):
                problems.append(f"{name}: {got['bytes']} bytes, {want.get('bytes')} were written")
            elif got["sha256"] != want.get("sha256"):
                problems.append(f"{name}: contents changed since the tag was completed (sha256 mismatch)")
    return problems


def damaged(tag_dir: Path, problems: list[str], all_ranks: bool = False) -> CheckpointError:
    """The error for a tag whose files failed their checks, suggesting the previous complete tag
    (`all_ranks`: every rank raises it, see CheckpointError)."""
    tag_dir = Path(tag_dir)
    step = step_of(tag_dir.name)
    older = [t for t in complete_tags(tag_dir.parent) if step is not None and step_of(t) < step]
    hint = (f"use the previous complete tag {older[-1]} (resume: --set checkpoint.resume={tag_dir.parent / older[-1]}; "
            f"export: --tag {older[-1]})" if older else "no earlier complete tag exists in this directory")
    return CheckpointError(f"checkpoint tag {tag_dir.name} in {tag_dir.parent} fails its checks: "
                           + "; ".join(problems) + f". Do not load it; {hint}", all_ranks=all_ranks)


def _every_ranks_problems(problems: list[str]) -> list[str]:
    """The problems all ranks found in their shares of a tag's files (sorted, each once). Collective."""
    return sorted({p for part in all_gather_objects(problems) for p in part})


def verify_files(tag_dir: Path, names: list[str], collective: bool = False) -> Optional[str]:
    """Check `names` of a tag against COMPLETE (export, meo-eval). Returns a warning when the tag
    records no checksums (saved before they were recorded); raises CheckpointError on a mismatch.
    `collective` (launched ranks that all read the same files): each rank hashes its share of
    `names` (file i: rank i mod world) and they share what they find, so every rank raises the
    same error. Collective then."""
    recorded = recorded_files(tag_dir)
    if recorded is None:
        return unverified_note(tag_dir)
    if not collective:
        problems = check_files(tag_dir, names, recorded)
    else:
        share = sorted(names)[dist.get_rank()::dist.get_world_size()]
        problems = _every_ranks_problems(check_files(tag_dir, share, recorded))
    if problems:
        raise damaged(tag_dir, problems, all_ranks=collective)
    return None


def unverified_note(tag_dir: Path) -> str:
    return (f"checkpoint {tag_dir} records no checksums (saved by an older meo_ds, or not by meo-train): "
            f"its files were not verified")


def verify_collectively(tag_dir: Path) -> Optional[str]:
    """Every rank checks its share of the tag's files (checksums, and that each .pt file unpickles
    with safe_load) and all ranks raise the same CheckpointError if any file fails, before anything
    is loaded. Returns a warning when the tag records no checksums. Collective."""
    tag_dir = Path(tag_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    problems: list[str] = []
    try:
        recorded = recorded_files(tag_dir)
        names = sorted(set(recorded or {}) | set(tag_files(tag_dir)))
        share = names[rank::world]
        if recorded is not None:
            problems += check_files(tag_dir, share, recorded)
        for name in share:
            if name.endswith(".pt") and (tag_dir / name).is_file() and not any(p.startswith(f"{name}:") for p in problems):
                try:
                    safe_load(tag_dir / name, mmap=True)
                except CheckpointError as err:
                    problems.append(f"{name}: {err}")
    except CheckpointError as err:
        problems.append(str(err))
        recorded = None
    found = _every_ranks_problems(problems)
    if found:
        raise damaged(tag_dir, found, all_ranks=True)
    return unverified_note(tag_dir) if recorded is None else None


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


def repair_latest(ckpt_dir: Path, log: Callable[[str], None] = print) -> Optional[str]:
    """Point `latest` at the newest complete tag when a newer one than it names exists (a crash
    between writing COMPLETE and `latest`). Rank 0, before training starts. Returns the new tag."""
    newest = newest_complete(ckpt_dir)
    if newest is None:
        return None
    current = read_latest(ckpt_dir)
    current_step = step_of(current) if current else None
    if current is not None and (current_step is None or current_step >= step_of(newest)):
        return None
    _atomic_write(Path(ckpt_dir) / LATEST, newest)
    log(f"{Path(ckpt_dir) / LATEST} named {current!r} but {newest} is complete (a save was interrupted "
        f"after it finished): `latest` now names {newest}")
    return newest


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
    return safe_load(path)


def newest_complete(ckpt_dir: Path) -> Optional[str]:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


# --------------------------------------------------------------------------- safe loading
def safe_types() -> list:
    """The non-tensor types our checkpoint files hold (module docstring: how they were found)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler,
            _reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with weights_only=True and SAFE types only; anything else -> CheckpointError."""
    import zipfile

    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_types()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any unloadable file gets one clear message
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"refusing to load {path}: its pickle calls `{found.group(1)}`, which is neither a tensor nor a "
                f"type meo_ds writes, so unpickling it could run code. Only load checkpoints from sources you trust"
            ) from err
        text = str(err).split("WeightsUnpickler error:")[-1]  # not torch's advice to load unsafely
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {first[:300]}); the file is damaged or "
                              f"not a checkpoint file") from err


class _SafeLoads:
    """Stands in for a DeepSpeed checkpoint engine: `load` goes through safe_load, the rest is its own."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(Path(path), map_location="cpu" if map_location is None else map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def safe_engine_loads(engine: Any) -> Iterator[None]:
    """While active, every file `engine.load_checkpoint` reads goes through safe_load."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def load_engine_checkpoint(engine: Any, point: ResumePoint, **kwargs: Any) -> Optional[str]:
    """Verify the tag on every rank (verify_collectively), then engine.load_checkpoint through
    safe_load. Returns a warning when the tag records no checksums. Collective."""
    note = verify_collectively(point.path)
    with safe_engine_loads(engine):
        engine.load_checkpoint(str(point.load_dir), tag=point.tag, **kwargs)
    return note


def holds_whole_module(point: ResumePoint) -> bool:
    """Whether the tag holds the whole module in MAIN_FILE: saved under ZeRO 0-2 or by meo-upcycle
    (not under ZeRO-3, which writes each rank's partition)."""
    return (point.path / MAIN_FILE).is_file()


def exact_resume(point: ResumePoint, world_size: int, ep_size: int, zero3: bool) -> bool:
    """Whether resuming from `point` restores everything (weights, optimizer, data position, RNG
    streams): it was saved at this world size and ep size, and under ZeRO-3 iff this run is. Else
    a resume loads the weights only."""
    info = read_marker(point.path)
    return (info.get("world_size") == world_size and info.get("ep_size") == ep_size
            and holds_whole_module(point) != zero3)


def truncate_log(path: Path, step: int) -> int:
    """Keep only the records of a JSON-lines log with "step" <= `step` (resume at `step`: the steps
    after it are trained again). Unparseable lines (a torn last write) go too. Returns lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        _atomic_write(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
