"""Atomic file/directory writes, checksums, manifests and the streaming token-file writer."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Checksum of a file, or of every file under a directory (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_dtype(vocab_size: int, requested: str | None = None) -> np.dtype:
    """uint16 when every id fits, else uint32; a requested dtype too small is an error."""
    if requested not in (None, "auto"):
        dtype = np.dtype(requested)
        if dtype not in (np.uint16, np.uint32):
            raise ValueError(f"token dtype must be uint16 or uint32, not {requested}")
        if vocab_size - 1 > np.iinfo(dtype).max:
            raise ValueError(
                f"tokenizer vocabulary of {vocab_size} ids does not fit dtype {dtype.name} "
                f"(max id {np.iinfo(dtype).max}); use --dtype uint32 or auto")
        return dtype
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a prepared corpus (or an interrupted run)")
    return json.loads(path.read_text())


def check_output_dir(out: Path, corpus_key: str, overwrite: bool) -> bool:
    """Return True if `out` already holds this exact corpus (same key: nothing to do).

    A directory holding a different corpus, or other files, is an error unless `overwrite`
    (then the caller rebuilds and replaces it).
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return False
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("corpus_key") == corpus_key:
            return True
    if overwrite:
        return False
    what = "a different corpus" if manifest_path.is_file() else "files that are not a prepared corpus"
    raise FileExistsError(f"{out}: output directory holds {what}; choose another --out or pass --overwrite")


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on error it vanishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


class TokenFileWriter:
    """Append token sequences to `<name>.bin` (raw dtype array) and record offsets in `<name>.idx.npy`.

    Offsets have one entry per sequence plus a final one: sequence i is tokens[off[i]:off[i+1]].
    """

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self.file = open(directory / f"{name}.bin", "wb")
        self.hash = hashlib.sha256()
        self.offsets = array("q", [0])
        self.tokens = 0

    def add(self, ids: np.ndarray | list[int]) -> None:
        """Append one sequence."""
        ids = np.asarray(ids)
        self.add_many(ids, np.array([len(ids)]))

    def add_many(self, flat: np.ndarray, lengths: np.ndarray, suffix: int | None = None) -> None:
        """Append sequences given back to back in `flat`, each followed by `suffix` when given."""
        if suffix is not None:
            flat = np.insert(flat, np.cumsum(lengths), suffix)
            lengths = lengths + 1
        data = np.asarray(flat, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.offsets.frombytes((self.tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
        self.tokens += len(flat)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        offsets = np.frombuffer(self.offsets, dtype=np.int64)
        np.save(self.directory / f"{self.name}.idx.npy", offsets)
        return {"file": f"{self.name}.bin", "index": f"{self.name}.idx.npy", "sequences": len(offsets) - 1,
                "tokens": self.tokens, "sha256": self.hash.hexdigest()}


def open_tokens(directory: Path, entry: dict, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a token file written by TokenFileWriter and load its offsets; sizes are checked."""
    path = directory / entry["file"]
    expected = entry["tokens"] * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise ValueError(f"{path}: missing or wrong size (expected {expected} bytes per the manifest)")
    tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
    offsets = np.load(directory / entry["index"])
    if len(offsets) != entry["sequences"] + 1 or offsets[-1] != entry["tokens"]:
        raise ValueError(f"{directory / entry['index']}: index does not match the manifest")
    return tokens, offsets
