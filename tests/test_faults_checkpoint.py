"""Checkpoint faults on resume (2 CPU ranks): a damaged or unsafe tag is refused before anything
is loaded, `latest` left behind by a crash is repaired, and the metrics log restarts at the
resumed step.

Each test damages a copy of one checkpoint trained per session (tests/checkpoint_faults.py: tags
at steps 3, 6, 8). One launch of tests/export/train_many_worker.py starts the trainer on several
damaged copies in turn; one launch of the real entry point pins the exit status and message.
"""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from checkpoint_faults import (EXPERT, MAIN, STEPS, TAGS, copy_run, flip_tensor_bytes, plant_payload, trained_run,
                               zero_tensor_block)
from distributed import REPO_ROOT, run_ranks
from meo_ds import checkpoint as ckpt
from train_helpers import CPU_DS, losses, metrics, train

TRAIN_MANY = REPO_ROOT / "tests" / "export" / "train_many_worker.py"
STATE = "trainer_state_rank00001.pt"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def _refusal(copy: Path, name: str) -> str:
    return f"checkpoint tag {TAGS[-1]} in {copy / 'checkpoints'} fails its checks: {name}"


def test_payload_in_trainer_state_never_runs_and_resume_exits_2(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run", steps=STEPS + 2)
    marker = tmp_path / "pwned"
    plant_payload(copy / "checkpoints" / TAGS[-1] / STATE, marker)
    proc = train(copy / "run.yaml", expect_rc=2, timeout=120)
    text = proc.stdout + proc.stderr
    assert not marker.exists()
    assert text.count("[meo-train] checkpoint error:") == 1, text[-4000:]
    assert _refusal(copy, STATE) + ": refusing to load" in text, text[-4000:]
    assert f"checkpoint.resume={copy / 'checkpoints' / TAGS[-2]}" in text
    assert max(r["step"] for r in metrics(copy)) == STEPS  # nothing trained
    assert (copy / "checkpoints" / "latest").read_text() == TAGS[-1]


def test_damaged_tags_are_refused_old_tags_load_and_a_stale_latest_is_repaired(run: Path, tmp_path: Path) -> None:
    cases = {
        "payload_expert": lambda tag: plant_payload(tag / EXPERT, tmp_path / "pwned"),
        "flip_expert": lambda tag: flip_tensor_bytes(tag / EXPERT),
        "zero_main": lambda tag: zero_tensor_block(tag / MAIN),
    }
    copies = {}
    for name, damage in cases.items():
        copies[name] = copy_run(run, tmp_path / name, steps=STEPS + 2)
        damage(copies[name] / "checkpoints" / TAGS[-1])
    # the crash between COMPLETE and `latest` at step 6, after steps 7-8 were logged
    stale = copies["stale"] = copy_run(run, tmp_path / "stale")
    shutil.rmtree(stale / "checkpoints" / TAGS[-1])
    (stale / "checkpoints" / "latest").write_text(TAGS[0])

    # a tag saved before checksums were recorded: loads, with a warning
    old = copies["unverified"] = copy_run(run, tmp_path / "unverified")
    complete = old / "checkpoints" / TAGS[-1] / ckpt.COMPLETE
    complete.write_text(json.dumps({k: v for k, v in json.loads(complete.read_text()).items() if k != "files"}))

    outcomes = tmp_path / "outcomes.json"
    proc = run_ranks(TRAIN_MANY, 2, ["--deepspeed_config", CPU_DS, "--outcomes", str(outcomes),
                                     *(str(c / "run.yaml") for c in copies.values())], timeout=300)
    text = proc.stdout + proc.stderr
    codes = {Path(k).parent.name: v for k, v in json.loads(outcomes.read_text()).items()}
    assert codes == {"payload_expert": 2, "flip_expert": 2, "zero_main": 2, "stale": 0, "unverified": 0}, text[-4000:]

    assert not (tmp_path / "pwned").exists()
    assert _refusal(copies["payload_expert"], EXPERT) + ": refusing to load" in text, text[-4000:]
    assert _refusal(copies["flip_expert"], EXPERT) + ": contents changed" in text
    assert _refusal(copies["zero_main"], MAIN) + ": contents changed" in text
    for name in cases:
        assert max(r["step"] for r in metrics(copies[name])) == STEPS, name

    assert f"warning: checkpoint {old / 'checkpoints' / TAGS[-1]} records no checksums" in text
    assert f"resumed exactly from {old / 'checkpoints' / TAGS[-1]} at step {STEPS}" in text

    assert f"`latest` now names {TAGS[1]}" in text
    assert f"resumed exactly from {stale / 'checkpoints' / TAGS[1]} at step 6" in text
    steps = [r["step"] for r in metrics(stale)]
    assert steps == list(range(1, STEPS + 1)), steps  # 7 and 8 logged once, by the resumed run
    assert losses(stale) == losses(run)  # and trained exactly as before
    evals = [json.loads(line)["step"] for line in (stale / "eval.jsonl").read_text().splitlines()]
    assert evals == [3, 6, 8]
    assert (stale / "checkpoints" / "latest").read_text() == TAGS[-1]
    info = json.loads((stale / "checkpoints" / TAGS[-1] / ckpt.COMPLETE).read_text())
    assert sorted(info["files"]) == ckpt.tag_files(stale / "checkpoints" / TAGS[-1])
    assert {n for n in info["files"] if n.startswith("trainer_state")} == {"trainer_state_rank00000.pt", STATE}


def test_deepspeed_engine_reads_through_safe_load(run: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    tag = tmp_path / TAGS[-1]
    shutil.copytree(run / "checkpoints" / TAGS[-1], tag)
    marker = tmp_path / "pwned"
    plant_payload(tag / EXPERT, marker)
    inner = TorchCheckpointEngine()
    engine = types.SimpleNamespace(checkpoint_engine=inner)
    with ckpt.safe_engine_loads(engine):
        with pytest.raises(ckpt.CheckpointError, match=f"refusing to load {tag / EXPERT}"):
            engine.checkpoint_engine.load(str(tag / EXPERT), map_location="cpu")
        for name in ckpt.tag_files(tag):  # everything DeepSpeed and the trainer wrote loads safely
            if name != EXPERT:
                engine.checkpoint_engine.load(str(tag / name), map_location=lambda storage, loc: storage)
        assert engine.checkpoint_engine.is_decoupled() is False  # the rest is DeepSpeed's own
    assert engine.checkpoint_engine is inner and not marker.exists()


def test_repair_latest(tmp_path: Path) -> None:
    for step in (2, 4):
        (tmp_path / ckpt.tag_for(step)).mkdir()
        (tmp_path / ckpt.tag_for(step) / ckpt.COMPLETE).write_text("{}")
    (tmp_path / ckpt.tag_for(6)).mkdir()  # incomplete: never a target
    said = []
    assert ckpt.repair_latest(tmp_path, log=said.append) == ckpt.tag_for(4)  # died before the first `latest`
    assert ckpt.read_latest(tmp_path) == ckpt.tag_for(4) and "now names step_00000004" in said[0]
    assert ckpt.repair_latest(tmp_path, log=said.append) is None and len(said) == 1
    (tmp_path / "latest").write_text(ckpt.tag_for(2))
    assert ckpt.repair_latest(tmp_path, log=said.append) == ckpt.tag_for(4)


def test_truncate_log(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 3, 4)) + '{"step": 5, "lo')
    assert ckpt.truncate_log(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 3]
    assert ckpt.truncate_log(tmp_path / "absent.jsonl", 3) == 0


def test_collective_verification_hashes_one_share_per_rank_and_raises_what_any_rank_found(
        tmp_path: Path, monkeypatch) -> None:
    """verify_files(collective=True), as rank 1 of 2 (meo-eval's launched ranks, the trainer's
    ZeRO-3 weights-only start): it hashes files 1, 3, ... of the sorted names only, and raises on
    every rank a problem that rank 0 found in a file rank 1 never read."""
    tag_dir = tmp_path / "checkpoints" / "step_00000004"
    tag_dir.mkdir(parents=True)
    names = [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(3)] + [ckpt.MAIN_FILE]
    for i, name in enumerate(names):
        (tag_dir / name).write_bytes(bytes([i]) * 1000)
    ckpt.mark_complete(tmp_path / "checkpoints", tag_dir.name, 4, 2, {n: ckpt.file_digest(tag_dir / n) for n in names})
    hashed, digest = [], ckpt.file_digest
    monkeypatch.setattr(ckpt, "file_digest", lambda path: hashed.append(Path(path).name) or digest(path))
    monkeypatch.setattr(ckpt.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(ckpt.dist, "get_world_size", lambda group=None: 2)
    from_rank0: list = []
    monkeypatch.setattr(ckpt, "all_gather_objects", lambda mine: [from_rank0, mine])
    assert ckpt.verify_files(tag_dir, names, collective=True) is None
    assert hashed == sorted(names)[1::2]
    from_rank0.append(f"{sorted(names)[0]}: contents changed since the tag was completed (sha256 mismatch)")
    with pytest.raises(ckpt.CheckpointError, match=f"fails its checks: {sorted(names)[0]}") as err:
        ckpt.verify_files(tag_dir, names, collective=True)
    assert err.value.all_ranks
