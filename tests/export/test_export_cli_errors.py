"""`meo-export` refuses bad input with exit status 2, a clear message, and no output directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from meo_ds.export.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_not_a_checkpoint_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("x")
    rc, err = _run(capsys, tmp_path / "ckpt", tmp_path / "out")
    assert rc == 2 and "not a DeepSpeed checkpoint directory" in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_missing_directory(tmp_path: Path, capsys) -> None:
    rc, err = _run(capsys, tmp_path / "nothing", tmp_path / "out")
    assert rc == 2 and "is not a directory" in err and not (tmp_path / "out").exists()


def test_non_empty_output_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run(capsys, tmp_path / "ckpt", out)
    assert rc == 2 and "not empty" in err and (out / "keep.txt").read_text() == "mine"


def test_unknown_target_is_an_argparse_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), str(tmp_path / "out"), "--target", "gpt2"])
    assert info.value.code == 2
