"""meo_ds.fileio.atomic_write: the file is replaced whole, text is UTF-8, and a failed write leaves
neither a torn file nor its temporary behind."""
from __future__ import annotations

import pytest

from meo_ds.fileio import atomic_write


def test_replaces_the_file_and_writes_text_as_utf8(tmp_path):
    path = tmp_path / "sub" / "latest"
    atomic_write(path, b"step_00000001")
    atomic_write(path, "étape 2\n")
    assert path.read_bytes() == "étape 2\n".encode("utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest"]


def test_a_failed_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty directory: the final rename must fail
    with pytest.raises(OSError):
        atomic_write(target, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (target / "inside").is_dir()
