"""One training job per run directory: an exclusive lock held by rank 0 for the whole job.

`<dir>/.meo-train.lock` is locked with `fcntl.flock` (exclusive, non-blocking) by rank 0 before
the process group starts and before anything is written, and records who holds it (host, pid,
process start time, time). The kernel drops the lock however the holder exits (kill -9
included), so a crashed job never blocks the next one. A second job on the same directory is
refused with a message naming the holder.

Stale holders: a process forked by the job (a data worker) inherits the lock and can outlive
the rank that took it. When the lock is held but its record names a process on this host that
no longer exists (pid gone, or reused by a process started later), the lock file is replaced by
a fresh one (new inode) and that one is locked; the orphan keeps a lock on the deleted file. A
holder on another host is never second-guessed: the message says to delete the file only if
that job is gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".meo-train.lock"


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory; the message names it and what to do."""


def _record() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "master": f"{os.environ.get('MASTER_ADDR', '')}:"
            f"{os.environ.get('MASTER_PORT', '')}"}


def _holder_gone(record: dict) -> bool:
    """True when `record` names a process of this host that has exited."""
    import psutil

    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        started = psutil.Process(record["pid"]).create_time()
    except psutil.NoSuchProcess:
        return True
    return abs(started - float(record.get("pid_started", started))) > 1.0  # the pid now names another process


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock on one run directory; `release()` (or the process exiting) frees it."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a concurrent job may replace a stale file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                record = _read(self.path)
                if not _holder_gone(record):
                    raise RunDirBusy(self._busy_message(record)) from None
                self._replace_stale()
                continue
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # replaced meanwhile: lock the new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_record()).encode())
            self.fd = fd
            return self
        raise RunDirBusy(f"{self.path}: could not take the run-directory lock (other jobs keep replacing it)")

    def _replace_stale(self) -> None:
        fresh = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
        fresh.write_text("{}")
        os.replace(fresh, self.path)

    def _busy_message(self, record: dict) -> str:
        who = (f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('since')}"
               if record else "a process that recorded nothing")
        return (f"{self.path.parent} is in use by another meo-train job ({who}); wait for it to finish or stop it, "
                f"or choose another logging.out_dir / checkpoint.dir. If that job is gone (another host), delete "
                f"{self.path}")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dirs(*directories: Path) -> list[RunLock]:
    """Create and lock each directory (parents first; the same one once); RunDirBusy if any is held.
    On refusal, the locks already taken are released and nothing has been written."""
    locks: list[RunLock] = []
    seen: set[Path] = set()
    try:
        for directory in directories:
            directory = Path(directory).resolve()
            if directory in seen:
                continue
            seen.add(directory)
            directory.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(directory).acquire())
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
