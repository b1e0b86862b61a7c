"""Full verification of a prepared corpus: every file against the checksums of its manifest.

`meo-prepare verify DIR`, or `data.verify: true` in a run config (the trainer then runs it once
per machine before any rank starts). It reads every byte once: the sha256 of each token file
(and of each index, for corpora that record it) must match the manifest, every token id must lie
below the vocabulary size, and the tokenizer must be the one the corpus was encoded with. The
cheap checks done on every open (sizes, index shape) are in `meo_ds.data.io`; together they name
the file at fault for any flipped, truncated or replaced byte.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from meo_ds.data.hf_tokenizer import files_checksum
from meo_ds.data.io import corpus_dtype, manifest_field, open_tokens, read_manifest, sha256_file
from meo_ds.data.readers import CorpusError

CHUNK_TOKENS = 1 << 22


def token_entries(splits: dict) -> Iterator[dict]:
    """Every token-file entry of a manifest's splits (LM: one per split; MT: source and target)."""
    for entry in splits.values():
        if isinstance(entry, dict) and "file" in entry:
            yield entry
        elif isinstance(entry, dict):
            yield from (side for side in entry.values() if isinstance(side, dict) and "file" in side)


def verify_corpus(directory: str | Path) -> dict:
    """Check every file of the corpus in `directory`; returns {"files", "tokens", "bytes"}.

    Raises CorpusError listing each problem with its file and the fix."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = corpus_dtype(manifest, directory)
    vocab = int(manifest_field(manifest, directory, "tokenizer", "vocab_size"))
    problems = list(_tokenizer_problems(manifest, directory))
    files = tokens = size = 0
    for entry in token_entries(manifest_field(manifest, directory, "splits")):
        try:
            data, _ = open_tokens(directory, entry, dtype)
        except CorpusError as err:
            problems.append(str(err))
            continue
        problems += _file_problems(directory / entry["file"], data, entry, vocab)
        index_sha = entry.get("index_sha256")
        if index_sha and sha256_file(directory / entry["index"]) != index_sha:
            problems.append(f"{directory / entry['index']}: sha256 differs from the manifest's (the index is corrupt)")
        files, tokens, size = files + 1, tokens + len(data), size + data.nbytes
    if problems:
        raise CorpusError(f"{directory}: {len(problems)} problem(s); prepare the corpus again with --overwrite:\n  - "
                          + "\n  - ".join(problems))
    return {"files": files, "tokens": tokens, "bytes": size}


def _file_problems(path: Path, data: np.ndarray, entry: dict, vocab: int) -> list[str]:
    digest, problems = hashlib.sha256(), []
    for start in range(0, len(data), CHUNK_TOKENS):
        chunk = np.asarray(data[start:start + CHUNK_TOKENS])
        digest.update(chunk.tobytes())
        if chunk.size and int(chunk.max()) >= vocab and len(problems) == 0:
            bad = start + int(np.argmax(chunk >= vocab))
            problems.append(f"{path}: token id {int(data[bad])} at token {bad} is outside the vocabulary ({vocab} ids)")
    if "sha256" in entry and digest.hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest's (the file is corrupt)")
    return problems


def _tokenizer_problems(manifest: dict, directory: Path) -> Iterator[str]:
    info = manifest_field(manifest, directory, "tokenizer")
    path = directory / info.get("file", "tokenizer.model")
    files = info.get("files") or [path.name]
    missing = [directory / name for name in files if not (directory / name).is_file()]
    if missing:
        yield f"{', '.join(map(str, missing))}: missing (the corpus was encoded with it)"
        return
    digest = files_checksum(directory, files) if info.get("kind") == "hf" else sha256_file(path)
    if info.get("sha256") and digest != info["sha256"]:
        yield f"{path}: sha256 differs from the manifest's (not the tokenizer this corpus was encoded with)"
