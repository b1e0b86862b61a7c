"""Staging directories, checksums and input fingerprints, manifests and the streaming token-file writer.

Staging directories are named ``.{out}.tmp-{host}-{pid}-{random}`` (and the replaced output
``.{out}.old-...`` while it is swapped out), so a later run can tell whose they are: one whose
process is gone on this host (a killed `meo-prepare`), or one without that information (written
before the names carried it), is stale and removed when the next run stages the same output.

Reading is checked where it is cheap: the manifest must parse, every token file must have the
size the manifest gives, every index must load (no pickles), start at 0, never decrease and end
at the manifest's token count. Token ids are checked against the vocabulary batch by batch by
the loaders (`check_token_ids`); the full check, sha256 of every file against the manifest, is
`meo_ds.data.verify` (`meo-prepare verify DIR`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from meo_ds.data.readers import CorpusError
from meo_ds.fileio import atomic_write

MANIFEST = "manifest.json"


class StreamMismatch(ValueError):
    """A loader state saved by another data stream; `key` names the loader setting that differs."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


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


def describe_inputs(inputs: Sequence[str | os.PathLike], what: str = "input") -> list[dict]:
    """Path, size and checksum of every input (missing inputs are an error before any work;
    `what` names them in that error, e.g. "test file")."""
    described = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: {what} not found")
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        described.append({"path": str(path.resolve()), "bytes": size, "sha256": sha256_path(path)})
    return described


def corpus_key(inputs: list[dict], tokenizer_sha: str, options: dict,
               split_inputs: dict[str, list[dict]] | None = None) -> str:
    """The identity of a prepared output: its inputs' checksums and sizes (and those of the files
    given for held-out splits, `{split: described inputs}`), the tokenizer, the options."""
    payload = {"inputs": [(i["sha256"], i["bytes"]) for i in inputs], "tokenizer": tokenizer_sha, "options": options}
    if split_inputs:
        payload["split_inputs"] = {name: [(i["sha256"], i["bytes"]) for i in described]
                                   for name, described in split_inputs.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: corrupt, not valid JSON ({err}); prepare the corpus again with "
                          f"`meo-prepare ... --out {directory} --overwrite`") from None
    if not isinstance(manifest, dict):
        raise CorpusError(f"{path}: corrupt, not a JSON object; prepare the corpus again with --overwrite")
    return manifest


def manifest_field(manifest: dict, directory: str | os.PathLike, *keys: str):
    """manifest[k1][k2]...; a missing key is a CorpusError naming the manifest."""
    node = manifest
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise CorpusError(f"{Path(directory) / MANIFEST}: corrupt, no {'.'.join(keys[:i + 1])!r}; prepare the "
                              f"corpus again with --overwrite")
        node = node[key]
    return node


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


def _owned_name(out: Path, kind: str) -> Path:
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    return out.with_name(f".{out.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _stale(name: str, out: Path) -> bool:
    """A staging/old sibling of `out` whose writer is gone (see the module docstring)."""
    prefix = re.escape(f".{out.name}.")
    owned = re.fullmatch(prefix + r"(?:tmp|old)-(.+)-(\d+)-[0-9a-f]{8}", name)
    if owned is None:
        return re.fullmatch(prefix + r"(?:tmp|old)-[0-9a-f]{8}", name) is not None
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    if owned.group(1) != host:
        return False  # another machine's: we cannot tell whether its writer still runs
    import psutil

    return not psutil.pid_exists(int(owned.group(2)))


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging directories of `out` that killed runs left behind; returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    stale = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and _stale(p.name, out)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}: staging left by an interrupted run")
    return stale


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on error it vanishes.
    Stale staging directories of `out` from killed runs are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = _owned_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = _owned_name(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


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
        index = self.directory / f"{self.name}.idx.npy"
        np.save(index, offsets)
        return {"file": f"{self.name}.bin", "index": index.name, "sequences": len(offsets) - 1,
                "tokens": self.tokens, "sha256": self.hash.hexdigest(), "index_sha256": sha256_file(index)}


TOKEN_DTYPES = ("uint16", "uint32")
_REPAIR = "run `meo-prepare verify {dir}` for a full check and prepare the corpus again with --overwrite"


def corpus_dtype(manifest: dict, directory: Path) -> np.dtype:
    name = manifest_field(manifest, directory, "dtype")
    if name not in TOKEN_DTYPES:
        raise CorpusError(f"{Path(directory) / MANIFEST}: corrupt, dtype {name!r} is not one of {TOKEN_DTYPES}")
    return np.dtype(name)


def open_tokens(directory: Path, entry: dict, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a token file written by TokenFileWriter and load its offsets; the cheap checks
    of the module docstring (sizes, index) raise a CorpusError naming the file."""
    keys = ("file", "index", "tokens", "sequences")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise CorpusError(f"{Path(directory) / MANIFEST}: corrupt, a split entry lacks one of {keys}")
    path, index = Path(directory) / entry["file"], Path(directory) / entry["index"]
    expected = entry["tokens"] * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise CorpusError(f"{path}: {size} bytes, the manifest says {expected} (truncated or replaced); "
                          + _REPAIR.format(dir=directory))
    tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
    return tokens, load_index(index, entry, directory)


def load_index(index: Path, entry: dict, directory: Path) -> np.ndarray:
    try:
        offsets = np.load(index, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CorpusError(f"{index}: corrupt or missing index ({err}); " + _REPAIR.format(dir=directory)) from None
    if (offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) != entry["sequences"] + 1
            or offsets[0] != 0 or offsets[-1] != entry["tokens"] or np.any(np.diff(offsets) < 0)):
        raise CorpusError(f"{index}: index does not match the manifest ({entry['sequences']} sequences of "
                          f"{entry['tokens']} tokens, non-decreasing offsets); " + _REPAIR.format(dir=directory))
    return offsets


def check_token_ids(rows: np.ndarray, vocab_size: int, path: Path, locate: Callable[[int, int], str]) -> None:
    """Every id of a batch `rows` [B, T] is below `vocab_size`; else a CorpusError naming the file and
    `locate(row, column)` of the first bad id. One max() per batch over ids already in memory."""
    if not rows.size or int(rows.max()) < vocab_size:
        return
    row, col = (int(i[0]) for i in np.nonzero(rows >= vocab_size))
    raise CorpusError(f"{path}: token id {int(rows[row, col])} at {locate(row, col)} is outside the vocabulary "
                      f"({vocab_size} ids): the file is corrupt; " + _REPAIR.format(dir=path.parent))
