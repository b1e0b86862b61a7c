"""The trainer on 2 real CPU ranks through the deepspeed launcher (fp32, gloo).

The model is the zoo's `tiny` preset (2 layers, d 64, 4 experts) with each MoE kind, trained on
the demo LM corpus as `meo-train` trains it.

Launches (about 15-25 s each on 2 cores):
  R   top-k, ep=1, ZeRO-0, saves its initial weights       -> loss decreases
  A   top-k, ep=2, ZeRO-2, same initial weights (from R)    -> matches R step for step within tolerance
  B   A's run, SIGTERM to rank 1 mid-way; B' resumes it     -> B + B' equal A exactly, step for step
  X   XMoE ep=2 and M  MEO ep=1                             -> loss decreases
  C   rank 1 dies in the middle of a checkpoint save        -> the others exit with an error,
      `latest` stays on the previous complete checkpoint; C' resumes from it with NaN losses
      injected: a lone one is skipped, N in a row stop the run with exit status 3
  E   an inconsistent config                                -> every rank exits 2 before any work
  Z   MEO under ZeRO-2, then ZeRO-3 and ZeRO-2 runs from its weights -> the same losses and
      weights (ZeRO-3 checkpoints consolidated); the ZeRO-3 run resumed under ZeRO-2
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from meo_ds.moe.functional import sparse_merge_pays

from distributed import run_ranks_without_launcher
from train_helpers import CPU_DS, CPU_DS_ZERO0, TRAIN_SCRIPT, losses, metrics, small_lm_run, train, train_and_signal

TINY_LM = {"preset": "tiny", "vocab_size": 2000, "moe": {"num_experts": 4, "top_k": 2}}
STEPS = 24


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    return build_demo("lm", tmp_path_factory.mktemp("lm_demo"), max_chars=500_000, vocab_size=2000)


def lm_run(out: Path, data: Path, kind: str = "topk", ep: int = 2, **sections) -> Path:
    model = dict(TINY_LM, moe=dict(TINY_LM["moe"], kind=kind))
    return small_lm_run(out, data, model, {"parallel": {"ep_size": ep},
                                           "train": {"steps": STEPS, "warmup_steps": 4, "seed": 7},
                                           "checkpoint": {"keep_last": 2}}, sections)


def assert_learns(loss: dict[int, float], margin: float) -> None:
    steps = sorted(loss)
    first = sum(loss[s] for s in steps[:3]) / 3
    last = sum(loss[s] for s in steps[-3:]) / 3
    assert last < first - margin, f"loss did not decrease enough: first 3 steps {first:.3f}, last 3 {last:.3f}"


@pytest.fixture(scope="module")
def reference(lm_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    r = root / "R"
    train(lm_run(r, lm_data, ep=1, checkpoint={"save_initial": True}), ds_config=CPU_DS_ZERO0)
    init = r / "checkpoints" / "step_00000000"
    a = root / "A"
    train(lm_run(a, lm_data, ep=2, checkpoint={"init_from": str(init)}), ds_config=CPU_DS)
    return {"R": r, "A": a, "init": init, "root": root}


def test_topk_learns_and_ep2_zero2_matches_ep1(reference):
    ref, ep2 = losses(reference["R"]), losses(reference["A"])
    assert sorted(ref) == sorted(ep2) == list(range(1, STEPS + 1))
    assert_learns(ref, margin=0.5)
    for step in ref:
        assert ep2[step] == pytest.approx(ref[step], rel=2e-4, abs=2e-4), f"step {step}: ep1 {ref[step]} vs ep2 {ep2[step]}"
    log = (reference["R"] / "train.log").read_text()
    assert "eval  | step 24 | val_loss" in log and "tok/s" in log and "moe[L" in log and "mfu n/a" in log
    assert (reference["A"] / "monitor").is_dir(), "csv monitor output missing"


def test_sigterm_checkpoints_and_resume_is_exact(reference, lm_data):
    b = reference["root"] / "B"
    config = lm_run(b, lm_data, ep=2, checkpoint={"init_from": str(reference["init"])}, debug={"step_sleep_s": 0.4})
    proc = train_and_signal(config, b, at_step=6, rank=1)
    assert proc.returncode == 0, proc.stdout[-4000:]
    stopped = max(losses(b))
    assert 6 <= stopped < STEPS, f"stopped at {stopped}"
    assert (b / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert "stopping on a signal on another rank" in proc.stdout  # rank 0 learnt it from rank 1
    config = lm_run(b, lm_data, ep=2, checkpoint={"init_from": str(reference["init"])})
    proc = train(config)
    assert f"resumed exactly from {b / 'checkpoints' / f'step_{stopped:08d}'}" in proc.stdout
    got, want = losses(b), losses(reference["A"])
    assert got == want, "\n".join(f"{s}: {want[s]} vs {got.get(s)}" for s in want if want[s] != got.get(s))


def monitored(run: Path, name: str) -> dict[int, float]:
    """The csv monitor's Train/{name} values by step."""
    (path,) = run.glob(f"monitor/**/Train_{name}.csv")
    return {int(step): float(value) for step, value in (line.split(",") for line in path.read_text().splitlines()[1:])}


@pytest.mark.parametrize("kind,ep", [("xmoe", 2), ("meo", 1)])
def test_kind_learns(kind, ep, lm_data, tmp_path):
    run = tmp_path / kind
    train(lm_run(run, lm_data, kind=kind, ep=ep, eval={"at_end": False}, checkpoint={"save_at_end": False},
                 logging={"peak_flops_device": "A100"}))  # a known peak (fp32 19.5 TFLOP/s): MFU is computed
    assert_learns(losses(run), margin=0.5)
    assert "flops/tok model" in (run / "train.log").read_text()
    model, executed = monitored(run, "model_flops_per_token"), monitored(run, "executed_flops_per_token")
    mfu, tps = monitored(run, "mfu"), monitored(run, "tokens_per_s")
    assert mfu and all(mfu[s] == pytest.approx(tps[s] * executed[s] / (19.5e12 * 2), rel=1e-5) for s in mfu)
    if kind == "meo":  # executed counts the merge that ran: here the paper's k-expert merge (sparse),
        # as 4 sequences of one segment x k=2 read fewer slices than the CPU rule allows for 4 experts
        assert sparse_merge_pays(4, 4, 2, "cpu")
        assert all(executed[s] == pytest.approx(model[s], rel=1e-9) for s in model)


def test_death_during_save_keeps_latest_then_nan_steps_are_skipped(lm_data, tmp_path):
    c = tmp_path / "C"
    config = lm_run(c, lm_data, checkpoint={"interval": 2, "keep_last": 2}, debug={"die_in_save_at_step": 6},
                    train={"dist_timeout_s": 60})
    start = time.time()
    proc = train(config, expect_rc=1)
    assert time.time() - start < 90, "the surviving rank did not exit promptly"
    ckpts = c / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]

    config = lm_run(c, lm_data, checkpoint={"interval": 2, "keep_last": 2},
                    debug={"nan_at_steps": [8, 11, 12, 13]}, train={"max_nonfinite_in_a_row": 3})
    proc = train(config, expect_rc=3)
    out = proc.stdout
    assert "removed incomplete checkpoint(s) ['step_00000006']" in out
    assert "resumed exactly from" in out and "step_00000004" in out
    assert "non-finite loss at step 8: step skipped" in out
    assert "stopping: 3 consecutive steps with a non-finite loss (last at step 13)" in out
    by_step = {m["step"]: m for m in metrics(c)}
    assert by_step[8]["skipped"] and not by_step[9]["skipped"] and by_step[9]["loss"] is not None
    assert max(by_step) == 13
    kept = sorted(p.name for p in ckpts.glob("step_*"))
    assert kept == ["step_00000010", "step_00000012"], f"keep_last=2 kept {kept}"


def test_inconsistent_config_fails_on_every_rank_before_work(lm_data, tmp_path):
    config = lm_run(tmp_path / "E", lm_data, ep=4)  # 4 experts, ep 4, but only 2 ranks
    start = time.time()
    # Each rank on its own (the deepspeed launcher would kill rank 0 as soon as rank 1 exits)
    ranks = run_ranks_without_launcher([sys.executable, str(TRAIN_SCRIPT), "--config", str(config),
                                        "--deepspeed_config", CPU_DS], 2, timeout=60)
    for rank in ranks:
        text = rank.stdout + rank.stderr
        assert rank.returncode == 2 and "world size 2 is not divisible by ep_size=4" in text, text[-3000:]
        assert "step " not in text.replace("ep_size", "")
    assert time.time() - start < 45
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    proc = train(lm_run(tmp_path / "E2", lm_data), ds_config=str(ds), expect_rc=2, timeout=60)
    assert "train_batch_size=64 but the run config gives 8" in proc.stdout + proc.stderr


def test_resume_at_other_world_and_ep_size_loads_weights(reference, lm_data):
    """A's final checkpoint (world 2, ep 2, ZeRO-2) continued on 1 rank with ep 1."""
    d = reference["root"] / "W1"
    config = lm_run(d, lm_data, ep=1, train={"steps": STEPS + 4},
                    checkpoint={"resume": str(reference["A"] / "checkpoints"), "save_at_end": False})
    proc = train(config, num_ranks=1, ds_config=CPU_DS_ZERO0)
    assert "saved at world size 2 / ep 2, now 1 / ep 1" in proc.stdout
    assert "NOT carried over: optimizer state" in proc.stdout
    after = losses(d)
    assert sorted(after) == list(range(STEPS + 1, STEPS + 5))
    last_a = losses(reference["A"])[STEPS]
    assert abs(after[STEPS + 1] - last_a) < 0.3, f"weights not carried over: {after[STEPS + 1]} vs {last_a}"


def test_weights_cross_between_zero2_and_zero3_and_zero3_checkpoints_consolidate(lm_data, tmp_path):
    """DeepSpeed reads only the files of its own ZeRO regime: a weights-only start from the other
    one goes through consolidate, before deepspeed.initialize."""
    from transformers import AutoModelForCausalLM

    from meo_ds.export.cli import main as export_main
    from meo_ds.export.consolidate import consolidate
    from meo_ds.export.exporter import load_model

    zero3 = tmp_path / "zero3.json"
    # threshold 0: every parameter partitioned (no small ones kept whole), as in a large model
    zero3.write_text(json.dumps({**json.loads(Path(CPU_DS).read_text()),
                                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    trained = tmp_path / "Z"
    train(lm_run(trained, lm_data, kind="meo", ep=1, train={"steps": 4, "warmup_steps": 1, "seed": 7},
                 eval={"at_end": False}))
    init = {"init_from": str(trained / "checkpoints" / "step_00000004"), "save_initial": True}
    steps = {"steps": 3, "warmup_steps": 1, "seed": 7}
    runs = {}
    for name, ds in (("zero2", CPU_DS), ("zero3", str(zero3))):
        runs[name] = tmp_path / name
        proc = train(lm_run(runs[name], lm_data, kind="meo", ep=1, train=steps, checkpoint=init, eval={"at_end": False}),
                     ds_config=ds)
        assert f"initialised model weights from {init['init_from']}" in proc.stdout
    two, three = losses(runs["zero2"]), losses(runs["zero3"])
    assert two and two.keys() == three.keys()
    assert all(three[s] == pytest.approx(two[s], rel=1e-5) for s in two), (two, three)
    assert abs(two[1] - losses(trained)[1]) > 0.05  # started from the trained weights, not from a fresh init

    # The ZeRO-3 checkpoints (per-rank partitions) consolidate: exactly the init weights at step 0,
    # the ZeRO-2 run's weights (to reduction order) after 3 steps.
    saved3 = runs["zero3"] / "checkpoints"
    assert not (saved3 / "step_00000003" / "mp_rank_00_model_states.pt").exists()
    start = consolidate(saved3, "step_00000000").state_dict
    init_weights = consolidate(trained / "checkpoints", "step_00000004").state_dict
    assert start.keys() == init_weights.keys() and all(torch.equal(start[k], init_weights[k]) for k in start)
    end3, end2 = consolidate(saved3).state_dict, consolidate(runs["zero2"] / "checkpoints").state_dict
    assert end3.keys() == end2.keys()
    for k in end2:
        torch.testing.assert_close(end3[k], end2[k], rtol=1e-4, atol=1e-5)
    # in bf16 DeepSpeed names the optimizer files bf16_zero_pp_rank_*
    renamed = tmp_path / "bf16_named" / "step_00000003"
    shutil.copytree(saved3 / "step_00000003", renamed)
    for f in renamed.glob("zero_pp_rank_*_optim_states.pt"):
        f.rename(f.with_name("bf16_" + f.name))
    marker = json.loads((renamed / "COMPLETE").read_text())
    marker["files"] = {("bf16_" + n if "optim_states" in n else n): v for n, v in marker["files"].items()}
    (renamed / "COMPLETE").write_text(json.dumps(marker))
    again3 = consolidate(renamed.parent, "step_00000003").state_dict
    assert all(torch.equal(again3[k], end3[k]) for k in end3)
    # meo-export takes the ZeRO-3 run; the export loads in transformers and computes our logits
    assert export_main([str(saved3), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(4, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(saved3)[0](ids).logits, rtol=1e-5, atol=1e-5)

    # ...and a ZeRO-2 run resumes the ZeRO-3 checkpoint's weights
    again = lm_run(runs["zero3"], lm_data, kind="meo", ep=1, train=dict(steps, steps=5), checkpoint={"init_from": ""},
                   eval={"at_end": False})
    proc = train(again, ds_config=CPU_DS)
    assert "ZeRO-3 then, ZeRO 0-2 now. NOT carried over: optimizer state" in proc.stdout
    after = losses(runs["zero3"])
    assert sorted(after) == [1, 2, 3, 4, 5] and abs(after[4] - three[3]) < 0.3
