"""Fault injection, bad inputs: meo-train's pre-start checks, the run-directory lock, save errors,
leftovers of killed start-ups.

Every pre-start fault must end with exit status 2 and one `[meo-train] configuration error:` line
naming the problem and the fix, before any rank starts and before anything is written (config.json
and the checkpoints untouched). Those run in-process through `meo_ds.train.main` with training
itself replaced by a tripwire. The lock, kill -9 and full-disk cases run real single-process
`meo-train` jobs (one rank on this machine) on a tiny model.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import REPO_ROOT, launch_env, run_ranks
from train_helpers import CPU_DS_ZERO0, metrics, small_lm_run, wait_for_step

from meo_ds import train as meo_train
from meo_ds.checkpoint import describe_save_error
from meo_ds.distributed import remove_orphaned_allreduce_buffers

STEPS = 6


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("lm", tmp_path_factory.mktemp("faults_lm"), max_chars=150_000, vocab_size=1000)


def run_config(out: Path, data: Path, **sections) -> Path:
    model = {"preset": "tiny", "vocab_size": 1000, "moe": {"num_experts": 4, "top_k": 2}}
    return small_lm_run(out, data, model, {"train": {"steps": STEPS, "warmup_steps": 2, "seed": 7},
                                           "checkpoint": {"interval": 3, "keep_last": 2}, "logging": {"interval": 2},
                                           "eval": {"max_batches": 1, "at_end": False}}, sections,
                        path=out.parent / f"{out.name}.yaml")


def meo_train_cmd(config: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "meo_ds.train", "--config", str(config), "--deepspeed_config", CPU_DS_ZERO0]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def start(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(meo_train_cmd(config, *overrides), env=launch_env(), cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def in_process_main(monkeypatch, config: Path, *overrides: str, ds_config: str = CPU_DS_ZERO0) -> int:
    """meo_ds.train.main as one rank of this process; reaching training is a test failure."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def tripwire(cfg, ds):
        raise AssertionError("the pre-start checks let this run start training")

    monkeypatch.setattr(meo_train, "run", tripwire)
    argv = ["--config", str(config), "--deepspeed_config", ds_config]
    for item in overrides:
        argv += ["--set", item]
    return meo_train.main(argv)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run directory but the lock (a start that takes it records itself there)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != ".meo-train.lock"}


# --------------------------------------------------------------------------- one run per directory
@pytest.fixture(scope="module")
def concurrent(lm_data, tmp_path_factory) -> dict:
    """Job A trains slowly; job B is started on the same out_dir while A runs. A's directory is
    then the trained run of the pre-start checks (checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("lock") / "A"
    config = run_config(out, lm_data, debug={"step_sleep_s": 0.5})
    a = start(config)
    try:
        wait_for_step(a, out, 1)
        mp, err = pytest.MonkeyPatch(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                b_rc = in_process_main(mp, config)
        finally:
            mp.undo()
        b_err = err.getvalue()
        a_out, a_err = a.communicate(timeout=180)
    finally:
        if a.poll() is None:
            a.kill()
    return {"out": out, "config": config, "a_rc": a.returncode, "a_out": a_out, "a_err": a_err,
            "b_rc": b_rc, "b_err": b_err, "a_pid": a.pid}


def test_second_job_on_the_same_dir_is_refused_and_the_first_finishes_intact(concurrent):
    c = concurrent
    assert c["b_rc"] == 2
    lines = [line for line in c["b_err"].splitlines() if line.startswith("[meo-train]")]
    assert len(lines) == 1 and f"is in use by another meo-train job (pid {c['a_pid']} on host" in lines[0], lines
    assert "choose another logging.out_dir" in lines[0]
    assert c["a_rc"] == 0, c["a_err"][-3000:]
    assert [m["step"] for m in metrics(c["out"])] == list(range(1, STEPS + 1))  # once each: nothing interleaved
    assert (c["out"] / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert json.loads((c["out"] / "config.json").read_text())["debug"]["step_sleep_s"] == 0.5  # A's, not B's


def test_kill_9_releases_the_lock_and_the_next_run_proceeds(lm_data, tmp_path):
    out = tmp_path / "K"
    config = run_config(out, lm_data, debug={"step_sleep_s": 0.5})
    proc = start(config)
    try:
        wait_for_step(proc, out, 4)  # past the checkpoint of step 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((out / ".meo-train.lock").read_text())["pid"] == proc.pid  # the dead job's record stays
    result = subprocess.run(meo_train_cmd(config, "debug.step_sleep_s=0"), env=launch_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed exactly from" in result.stdout and "step_00000003" in result.stdout
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


# --------------------------------------------------------------------------- pre-start checks
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


PRESTART = {
    # name: (overrides, what the single line must say)
    "negative data.seed": (["data.seed=-1"], "data.seed=-1 must be >= 0"),
    "out_dir under a file": (["logging.out_dir={tmp}/afile/run"], "lies under '{tmp}/afile', which is a file"),
    "batch larger than the corpus": (["train.micro_batch_size=100000"],
                                     "cannot fill one global batch of 100000; lower train.micro_batch_size"),
    "no such validation split": (["data.val_split=dev"], "has no split 'dev'"),
    "missing checkpoint.resume": (["checkpoint.resume={tmp}/nowhere"],
                                  "is neither a complete checkpoint nor a directory with a `latest` file"),
    "latest names a deleted tag": (["checkpoint.dir={tmp}/ckpts"],
                                   "names 'step_00000099', which is not a complete checkpoint"),
    "model changed on resume": (["model.d_model=128"],
                                "holds another model architecture: model.d_model=128 (checkpoint: 64)"),
    "seq_len changed on resume": (["data.seq_len=16"], "continues another data stream (loader state does not "
                                  "match this loader: seq_len is 32, this loader has 16); keep data.seq_len"),
    "init_from another model": (["checkpoint.resume=none", "checkpoint.init_from={run}/checkpoints",
                                 "model.n_layers=3"], "model.n_layers=3 (checkpoint: 2)"),
    "malformed run YAML": (["@config={tmp}/bad.yaml"], "bad.yaml:3:5: not valid YAML"),
    "malformed DeepSpeed JSON": (["@ds={tmp}/bad.json"], "bad.json:1:11: not valid JSON"),
    "corrupt corpus manifest": (["data.path={tmp}/corpus"], "manifest.json: corrupt, not valid JSON"),
}


@pytest.mark.parametrize("fault", list(PRESTART))
def test_prestart_fault_exits_2_with_one_line_and_writes_nothing(fault, concurrent, lm_data, tmp_path, monkeypatch,
                                                                 capsys):
    run = concurrent["out"]
    (tmp_path / "afile").write_text("not a directory")
    shutil.copytree(run / "checkpoints", tmp_path / "ckpts")
    (tmp_path / "ckpts" / "latest").write_text("step_00000099")
    _write(tmp_path / "bad.yaml", "task: lm\ntrain: {steps: 3\nname: x\n")
    _write(tmp_path / "bad.json", '{"zero": {1: 2}}')
    shutil.copytree(lm_data, tmp_path / "corpus")
    text = (tmp_path / "corpus" / "manifest.json").read_text()
    (tmp_path / "corpus" / "manifest.json").write_text(text[:100])
    overrides, needle = PRESTART[fault]
    fill = lambda s: s.format(tmp=tmp_path, run=run)  # noqa: E731
    config, ds, sets = concurrent["config"], CPU_DS_ZERO0, []
    for item in map(fill, overrides):
        if item.startswith("@config="):
            config = Path(item.split("=", 1)[1])
        elif item.startswith("@ds="):
            ds = item.split("=", 1)[1]
        else:
            sets.append(item)
    before = snapshot(run)
    assert in_process_main(monkeypatch, config, "debug.step_sleep_s=0", *sets, ds_config=ds) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[meo-train]")]
    assert len(lines) == 1 and lines[0].startswith("[meo-train] configuration error:"), lines
    assert fill(needle) in lines[0], lines[0]
    assert snapshot(run) == before, "a refused start changed the run directory"


# --------------------------------------------------------------------------- save errors
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def _save_error(path: Path) -> BaseException:
    try:
        torch.save({"w": torch.zeros(1 << 18)}, path)  # 1 MiB
    except (OSError, RuntimeError) as err:
        return err
    raise AssertionError(f"saving to {path} succeeded")


def test_read_only_and_full_file_systems_are_named(tmp_path):
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "ro,size=1m"):
        try:
            err = _save_error(ro / "step_00000002" / "x.pt")
            message = describe_save_error(ro / "step_00000002", err)
            assert f"cannot write checkpoint {ro / 'step_00000002'}: {ro} is on a read-only file system" in message
        finally:
            _umount(ro)
    elif os.geteuid() != 0:
        ro.chmod(0o555)
        message = describe_save_error(ro / "step_00000002", _save_error(ro / "x.pt"))
        assert f"no permission to write in {ro}" in message
    full = tmp_path / "full"
    if not _mount_tmpfs(full, "size=256k"):
        pytest.skip("cannot mount a tiny tmpfs here (needs root); the full-disk message is not exercised")
    try:
        message = describe_save_error(full / "step_00000002", _save_error(full / "x.pt"))
        assert f"the disk holding {full} is full (0.0 MiB free)" in message and "set checkpoint.dir" in message
    finally:
        _umount(full)


def test_disk_full_during_save_is_one_line_and_exit_5(lm_data, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=512k"):
        pytest.skip("cannot mount a tiny tmpfs here (needs root)")
    try:
        config = run_config(tmp_path / "F", lm_data, checkpoint={"dir": str(disk), "interval": 2})
        result = subprocess.run(meo_train_cmd(config), env=launch_env(), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=180)
    finally:
        _umount(disk)
    assert result.returncode == 5, result.stderr[-3000:]
    assert (f"[meo-train] error: cannot write checkpoint {disk / 'step_00000002'}: the disk holding {disk / 'step_00000002'} is full"
            in result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "iostream error" not in result.stderr


# --------------------------------------------------------------------------- leftovers, export input
def test_shm_buffers_of_a_start_up_killed_launch_are_removed_by_the_next(tmp_path):
    proc = run_ranks(REPO_ROOT / "tests" / "workers" / "shm_worker.py", 2, ["killed_in_startup"], timeout=120,
                     check=False)
    assert proc.returncode != 0 and proc.stdout.count("buffers created") == 2, proc.stdout[-2000:]
    port = proc.stdout.split(" port ")[1].split()[0]
    leftovers = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    assert len(leftovers) == 2, leftovers  # what DeepSpeed leaves when a rank dies before the release
    live = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test_{os.getpid()}_0"
    with open(live, "w+b") as f:  # a buffer some live process maps: never touched
        f.truncate(4096)
        mapped = mmap.mmap(f.fileno(), 4096)
    try:
        old = time.time() - 10
        for path in (*leftovers, live):
            os.utime(path, (old, old))
        removed = remove_orphaned_allreduce_buffers()
        assert sorted(removed) == sorted(os.path.basename(p) for p in leftovers)
        assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*") == []
        assert os.path.exists(live)
    finally:
        mapped.close()
        os.unlink(live)


def test_export_max_shard_size_must_be_a_size(capsys):
    from meo_ds.export.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["ck", "out", "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert "argument --max-shard-size: 'lots' is not a size; use an integer and a unit" in capsys.readouterr().err
    assert parse_args(["ck", "out", "--max-shard-size", "500MB"]).max_shard_size == "500MB"


def test_describe_save_error_keeps_other_causes(tmp_path):
    err = OSError(errno.EIO, "Input/output error")
    assert describe_save_error(tmp_path / "step_00000001", err).endswith(
        "the last complete checkpoint (`latest`) is untouched and resumes the run")
    assert "OSError: [Errno 5] Input/output error" in describe_save_error(tmp_path / "step_00000001", err)
