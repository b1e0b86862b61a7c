"""Atomic file writes: the one way meo_ds replaces a small file in place.

`atomic_write(path, data)` writes a temporary file next to `path`, fsyncs it and renames it over
`path` (os.replace, atomic on POSIX within one file system): a reader sees the old file or the
new one, never a part. The temporary is named ``.{name}.tmp-{pid}-{random}`` (hidden, and whose
it is can be read from the name); a crash leaves at most that file behind, never a torn `path`.
Used for checkpoint markers (`latest`, COMPLETE), truncated logs, corpus manifests and
tokenizer files.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` by `data` (text is written as UTF-8); creates missing parent directories."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
