"""`meo-export` never destroys its input, never runs code from a checkpoint, never exports a
corrupted tag, and exports the newest complete tag with the metrics of that tag's step.

Every test damages its own copy of one checkpoint trained per session (tests/checkpoint_faults.py)
and runs `meo-export` in-process: exit status 2, one line naming the problem, no output.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint_faults import (EXPERT, MAIN, TAGS, copy_run, flip_tensor_bytes, plant_payload, trained_run, tree_digest,
                               zero_tensor_block)
from meo_ds import checkpoint as ckpt
from meo_ds.export.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    return copy_run(run, tmp_path / "run")


def _export(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize("where", ["checkpoint dir", "a tag", "parent of the checkpoint dir", "link to a tag"])
def test_output_overlapping_the_checkpoint_is_refused_before_anything_is_touched(copy: Path, capsys, where: str) -> None:
    ck = copy / "checkpoints"
    out = {"checkpoint dir": ck, "a tag": ck / TAGS[-1], "parent of the checkpoint dir": copy,
           "link to a tag": copy.parent / "link"}[where]
    if where == "link to a tag":
        out.symlink_to(ck / TAGS[-1])
    before = tree_digest(copy)
    rc, err = _export(capsys, ck, out, "--overwrite", "--no-tokenizer")
    assert rc == 2, err
    assert "the checkpoint" in err and "Choose an output directory outside" in err, err
    assert tree_digest(copy) == before
    assert not list(copy.parent.glob(".*tmp-*")) and not list(copy.rglob(".*tmp-*"))


@pytest.mark.parametrize("name", [MAIN, EXPERT])
def test_pickle_payload_in_a_model_file_never_runs(copy: Path, tmp_path: Path, capsys, name: str) -> None:
    marker = tmp_path / "pwned"
    target = copy / "checkpoints" / TAGS[-1] / name
    plant_payload(target, marker)
    probe = tmp_path / "probe.pt"  # the payload is live: an unsafe load would run it
    shutil.copy(target, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    rc, err = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer")
    assert rc == 2 and f"refusing to load {target}: its pickle calls `" in err and "open`" in err, err
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name,damage", [(EXPERT, flip_tensor_bytes), (MAIN, zero_tensor_block)])
def test_corrupted_file_is_refused_naming_file_and_tag_and_the_previous_tag(copy: Path, tmp_path: Path, capsys,
                                                                           name, damage) -> None:
    tag_dir = copy / "checkpoints" / TAGS[-1]
    damage(tag_dir / name)
    ckpt.safe_load(tag_dir / name)  # torch alone reads the damaged file without complaint
    rc, err = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer")
    assert rc == 2, err
    assert f"checkpoint tag {TAGS[-1]}" in err and f"{name}: contents changed" in err, err
    assert f"--tag {TAGS[-2]}" in err, err
    assert not (tmp_path / "hf").exists()
    rc, err = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer", "--tag", TAGS[-2])
    assert rc == 0, err


def test_tag_without_checksums_exports_with_a_note(copy: Path, tmp_path: Path, capsys) -> None:
    marker = copy / "checkpoints" / TAGS[-1] / ckpt.COMPLETE
    info = json.loads(marker.read_text())
    assert set(info["files"]) == set(ckpt.tag_files(marker.parent))  # every rank's files are covered
    del info["files"]
    marker.write_text(json.dumps(info))
    rc, out = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer")
    assert rc == 0 and "records no checksums" in out and "not verified" in out, out


def test_default_tag_is_the_newest_complete_even_when_latest_lags(copy: Path, tmp_path: Path, capsys) -> None:
    (copy / "checkpoints" / "latest").write_text(TAGS[0])  # crash between COMPLETE and latest
    rc, out = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer")
    assert rc == 0 and f"(tag {TAGS[-1]})" in out, out


def test_model_card_reports_the_metrics_of_the_exported_step(copy: Path, tmp_path: Path, capsys) -> None:
    logged = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    rc, out = _export(capsys, copy / "checkpoints", tmp_path / "hf", "--no-tokenizer", "--tag", TAGS[0])
    assert rc == 0, out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "up to step 3, the exported checkpoint" in card
    assert "| train/step | 3 |" in card and "| eval/step | 3 |" in card, card
    assert f"| train/loss | {logged[2]['loss']:.6g} |" in card
