"""`meo-study`: one short study (xmoe and dense-1x, 4 steps each on 2 CPU ranks, through the real
launcher) shared by the tests, then run again to check that a finished variant is not trained
again and an interrupted one resumes; the report's figures are checked against the runs' own
files. The plain reading and the variants are checked without launching anything.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO_ROOT, launch_env
from meo_ds.config.loading import preset_dict
from meo_ds.study import main, report
from meo_ds.study.variants import variant_model

VARIANTS = ["xmoe", "dense-1x"]


def study_cmd(out: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "meo_ds.study", "--out", str(out), "--data", str(data), "--variants", ",".join(VARIANTS),
            "--steps", "4", "--eval-interval", "2", "--set", "data.seq_len=32", "--set", "train.micro_batch_size=4"]


def run_study(out: Path, data: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(study_cmd(out, data), env=launch_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    from meo_ds.data.demo import build_demo

    root = tmp_path_factory.mktemp("study")
    data = build_demo("lm", root / "data", max_chars=300_000, vocab_size=1000)
    out = root / "out"
    first = run_study(out, data)
    results = json.loads((out / "results.json").read_text())
    # Again: xmoe finished (untouched); dense-1x looks interrupted after its last checkpoint.
    xmoe_mtime = (out / "runs" / "xmoe" / "metrics.jsonl").stat().st_mtime_ns
    (out / "runs" / "dense-1x" / "summary.json").unlink()
    second = run_study(out, data)
    return {"out": out, "data": data, "first": first.stdout, "second": second.stdout, "results": results,
            "xmoe_mtime": xmoe_mtime}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_results_and_report_agree_with_the_runs(study):
    out, results = study["out"], json.loads((study["out"] / "results.json").read_text())
    assert list(results["variants"]) == VARIANTS and results["settings"]["steps"] == 4
    table = (out / "report.md").read_text()
    for name, v in results["variants"].items():
        evals = read_jsonl(out / "runs" / name / "eval.jsonl")  # dense-1x, resumed at its end, evaluated step 4 twice
        assert [p["step"] for p in v["curve"]] == [2, 4] and [e["step"] for e in evals][:2] == [2, 4]
        assert v["curve"][0]["val_loss"] == evals[0]["val_loss"] and v["tokens_per_s"] > 0
        assert v["val_ppl"] == evals[-1]["val_ppl"] and v["val_loss"] == evals[-1]["val_loss"]
        row = next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {v['val_ppl']:.2f} |" in row and f"{v['params']['total']:,}" in row
        assert v["peak_memory_bytes"] > 0 and v["wall_s"] > 0 and v["executed_flops_per_token"] > 0
        flops = [p["flops"] for p in v["curve"]]
        assert 0 < flops[0] < flops[1]
    xmoe, dense = results["variants"]["xmoe"], results["variants"]["dense-1x"]
    dense_row = next(l for l in table.splitlines() if l.startswith("| dense-1x |"))
    assert dense["routing"] is None and dense_row.endswith("| – | – | – | – |")
    assert xmoe["routing"]["a2a_bytes_per_token"] > 0 and xmoe["routing"]["experts_per_token"] >= 1
    assert xmoe["params"]["total"] > dense["params"]["total"]  # 16 experts of W/4 vs one of W
    assert all(line in table for line in results["reading"])


def test_xmoe_histogram_counts_every_token_of_every_rank(study):
    run = study["out"] / "runs" / "xmoe"
    tokens = sum(m["tokens"] for m in read_jsonl(run / "metrics.jsonl"))
    hist = study["results"]["variants"]["xmoe"]["experts_hist"]
    assert len(hist) == 2 and all(sum(layer) == tokens for layer in hist)
    assert hist[0][0] == 0  # XMoE gives every token at least one expert
    loads = [r["routing"][0]["load"] for r in read_jsonl(run / "intervals.jsonl")]
    assert len(loads) == 4 and all(len(load) == 16 for load in loads)


def test_plots_are_png_files(study):
    out = study["out"]
    expected = ["loss_vs_step.png", "loss_vs_time.png", "loss_vs_flops.png", "expert_load_xmoe.png",
                "xmoe_experts_per_token.png"]
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in (out / "report.md").read_text()
    assert not (out / "expert_load_dense-1x.png").exists()


def test_finished_variant_is_skipped_and_interrupted_one_resumes(study):
    out, second = study["out"], study["second"]
    assert "xmoe: finished earlier" in second and "xmoe: training" not in second
    assert (out / "runs" / "xmoe" / "metrics.jsonl").stat().st_mtime_ns == study["xmoe_mtime"]
    assert "dense-1x: training 4 steps" in second
    log = (out / "runs" / "dense-1x" / "train.log").read_text()
    assert "resumed exactly from" in log and "step_00000004" in log
    assert [m["step"] for m in read_jsonl(out / "runs" / "dense-1x" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((out / "runs" / "dense-1x" / "summary.json").read_text())["steps"] == 4


def test_other_settings_in_the_same_directory_are_refused(study, capsys):
    cmd = study_cmd(study["out"], study["data"])[3:]
    cmd[cmd.index("--steps") + 1] = "8"
    assert main(cmd) == 2
    assert "steps: 4 -> 8" in capsys.readouterr().err


def test_report_only_rebuilds_from_the_runs_with_the_recorded_settings(study):
    out = study["out"]
    before = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    (out / "loss_vs_flops.png").unlink()
    assert main(["--report-only", "--out", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["settings"] == before["settings"] and sorted(after["variants"]) == sorted(VARIANTS)
    assert after["variants"]["xmoe"]["val_ppl"] == before["variants"]["xmoe"]["val_ppl"]
    assert (out / "loss_vs_flops.png").is_file()


def test_unknown_variant_is_refused_before_any_work(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--variants", "topk,moe9"]) == 2
    assert "unknown moe9" in capsys.readouterr().err and not (tmp_path / "s").exists()


def curve(points: list[tuple[int, float, float, float]]) -> list[dict]:
    return [{"step": s, "time_s": t, "flops": f, "val_loss": l} for s, t, f, l in points]


def test_reading_names_the_winner_at_equal_steps_time_and_flops():
    """A is best after its steps but slow and costly; B is fast; C is cheap in FLOPs."""
    variants = {
        "A": {"steps": 100, "val_ppl": math.exp(2.0), "curve": curve([(50, 50, 50, 3.0), (100, 100, 100, 2.0)])},
        "B": {"steps": 100, "val_ppl": math.exp(2.5), "curve": curve([(50, 10, 8, 2.7), (100, 20, 16, 2.5)])},
        "C": {"steps": 100, "val_ppl": math.exp(2.6), "curve": curve([(50, 15, 5, 2.65), (100, 30, 10, 2.6)])},
    }
    comp = report.comparisons(variants)
    assert comp["steps"]["ppl"]["A"] == pytest.approx(math.exp(2.0))
    assert comp["time"]["at"] == 20 and set(comp["time"]["ppl"]) == {"B", "C"}  # A's first evaluation is at 50 s
    assert comp["time"]["ppl"]["C"] == pytest.approx(math.exp(2.65 - 0.05 / 3))
    assert comp["flops"]["at"] == 10 and comp["flops"]["ppl"]["B"] == pytest.approx(math.exp(2.65))
    lines = report.reading({"variants": variants, "comparisons": comp})
    assert lines[0].startswith("At equal steps (100), **A**") and "ahead of B" in lines[0]
    assert "**B**" in lines[1] and "A not evaluated by then" in lines[1]
    assert "**C**" in lines[2]


def test_interpolation_between_evaluations():
    c = curve([(1, 10, 100, 4.0), (2, 20, 200, 2.0)])
    assert report.interpolate(c, "time_s", 15) == pytest.approx(3.0)
    assert report.interpolate(c, "flops", 200) == pytest.approx(2.0)
    assert report.interpolate(c, "time_s", 5) is None and report.interpolate(c, "time_s", 25) is None


def test_variants_split_and_keep_the_base_settings():
    base = {**preset_dict("tiny"), "moe": {"kind": "topk", "num_experts": 4, "top_k": 2, "dispatch": "capacity",
                                           "aux_loss_coef": 0.02}}
    xmoe, ep = variant_model("xmoe", base, 2)
    assert xmoe["moe"] == {"kind": "xmoe", "num_experts": 16, "expert_hidden": 32, "dispatch": "capacity",
                           "aux_loss_coef": 0.02} and ep == 2
    meo, ep = variant_model("meo-token", base, 2)
    assert meo["moe"] == {"kind": "meo", "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.02, "meo_level": "token"}
    assert ep == 1
    dense, ep = variant_model("dense-2x", base, 2)
    assert dense["moe"]["num_experts"] == 1 and dense["moe"]["expert_hidden"] == 256 and ep == 1


def test_token_budget_becomes_steps_of_the_recipe(tmp_path):
    from meo_ds.study import runner

    study = runner.Study(out=tmp_path, task="lm", preset="tiny", variants=["topk"], tokens=1_000_000,
                         overrides=["train.micro_batch_size=4"], ranks=2)
    assert runner.resolve_steps(study, tmp_path) == math.ceil(1_000_000 / (2 * 4 * 128))  # ranks x batch x seq_len
    unset = runner.Study(out=tmp_path, task="lm", preset="tiny", variants=["topk"], tokens=1_000_000,
                         overrides=["train.micro_batch_size=null", "train.grad_accum=2"], ranks=2)
    assert runner.resolve_steps(unset, tmp_path) == math.ceil(1_000_000 / (2 * 8 * 2 * 128))  # the trainer's default 8
