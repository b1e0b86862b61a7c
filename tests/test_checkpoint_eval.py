"""meo-eval (meo_ds/checkpoint_eval.py) on checkpoints of two short meo-train runs (a top-k MoE LM
and the mt_tiny translation preset, both ep=2 on two ranks, trained in one launch): its figures
equal the trainer's own eval.jsonl (whose two ranks scored batches 0..3 of meo-eval's sequence), raw files are tokenized as meo-prepare does, two launched ranks give the
one-process figures, with the experts sharded over them too (--ep 2), launched ranks share the
checksum work, a stuck peer stops every rank with one line after --timeout-s, and bad input is one
line before any work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from meo_ds.checkpoint import tag_for
from meo_ds.checkpoint_eval import main
from tests.distributed import REPO_ROOT, run_ranks

DS = str(REPO_ROOT / "ds_configs" / "cpu_fp32.json")
TRAIN_WORKER = REPO_ROOT / "tests" / "export" / "train_many_worker.py"
EVAL_WORKER = REPO_ROOT / "tests" / "workers" / "eval_worker.py"
LM_MODEL = {"vocab_size": 1000, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
            "max_seq_len": 64, "moe_every": 1, "moe_offset": 0, "moe": {"kind": "topk", "num_experts": 4, "top_k": 2}}


def _run_config(out: Path, tree: dict) -> str:
    out.mkdir(parents=True)
    tree = {**tree, "name": out.name, "checkpoint": {"interval": 0, "keep_last": 1},
            "logging": {"out_dir": str(out), "interval": 3}}
    (out / "run.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(out / "run.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from meo_ds.data.demo import build_demo

    root = tmp_path_factory.mktemp("meo_eval")
    lm_data = build_demo("lm", root / "lm_demo", max_chars=300_000, vocab_size=1000)
    mt_data = build_demo("mt", root / "mt_demo", pairs=2000)
    lm = _run_config(root / "lm", {
        "task": "lm", "model": LM_MODEL, "parallel": {"ep_size": 2}, "data": {"path": str(lm_data), "seq_len": 32},
        "train": {"steps": 6, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "seed": 3},
        "eval": {"max_batches": 2}})
    mt = _run_config(root / "mt", {
        "task": "translation", "model": {"preset": "mt_tiny"}, "parallel": {"ep_size": 2}, "data": {"path": str(mt_data), "max_tokens": 256},
        "train": {"steps": 6, "micro_batch_size": 1, "lr": 3e-3, "warmup_steps": 1, "seed": 3},
        "eval": {"max_batches": 2, "bleu_sentences": 4, "beam_size": 2, "max_new_tokens": 8}})
    run_ranks(TRAIN_WORKER, 2, ["--deepspeed_config", DS, lm, mt], timeout=300)
    return {"root": root, "lm_data": lm_data, "mt_data": mt_data, "lm": root / "lm", "mt": root / "mt"}


def _eval(capsys, tmp_path: Path, *argv: str) -> tuple[dict, str]:
    out = tmp_path / f"result{len(list(tmp_path.glob('result*')))}.json"
    assert main([*map(str, argv), "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text()), capsys.readouterr().out


def _trainer_eval(run: Path) -> dict:
    return json.loads((run / "eval.jsonl").read_text().splitlines()[-1])


def test_lm_perplexity_equals_the_trainers_eval(runs, tmp_path, capsys) -> None:
    trainer = _trainer_eval(runs["lm"])
    got, line = _eval(capsys, tmp_path, runs["lm"] / "checkpoints", "--data", runs["lm_data"], "--max-batches", 4)
    assert got["loss"] == pytest.approx(trainer["val_loss"], abs=1e-6)
    assert got["ppl"] == pytest.approx(trainer["val_ppl"], rel=1e-6)
    assert got["tokens"] == trainer["val_tokens"] == 2 * 2 * 4 * 32  # 2 ranks x eval.max_batches x batch x seq_len
    assert got["step"] == trainer["step"] == 6 and got["split"] == "validation" and got["batch_size"] == 4
    assert line.startswith("meo-eval | ") and f"loss {trainer['val_loss']:.4f}" in line and "| validation |" in line
    tag = Path(got["checkpoint"])
    assert tag.name == tag_for(6)
    whole, _ = _eval(capsys, tmp_path, tag, "--data", runs["lm_data"], "--batch-size", 8)  # a tag dir; every batch
    from meo_ds.data.lm import LMDataset

    samples = (LMDataset(runs["lm_data"], "validation").num_tokens - 1) // 32
    assert whole["tokens"] == samples // 8 * 8 * 32 and whole["batches"] == samples // 8


def test_lm_raw_files_are_tokenized_as_meo_prepare_does(runs, tmp_path, capsys) -> None:
    from meo_ds.data.lm import prepare_lm

    docs = [f"def f{i}(x):\n    return the {i}th value of x, unchanged when x is empty" for i in range(24)]
    raw = tmp_path / "held_out.txt"
    raw.write_text("\n".join(docs) + "\n")
    train = tmp_path / "train.txt"
    train.write_text("some other training text\n")
    prepared = tmp_path / "prepared"
    prepare_lm([train], runs["lm_data"], prepared, valid=[raw], progress=False)
    from_raw, line = _eval(capsys, tmp_path, runs["lm"] / "checkpoints", "--data", raw, "--batch-size", 3)
    from_dir, _ = _eval(capsys, tmp_path, runs["lm"] / "checkpoints", "--data", prepared, "--batch-size", 3)
    assert from_raw["tokens"] == from_dir["tokens"] > 0
    assert from_raw["loss"] == from_dir["loss"]
    assert from_raw["split"] is None and from_raw["data"] == [str(raw)] and str(raw) in line


def test_translation_bleu_and_loss_equal_the_trainers_eval(runs, tmp_path, capsys) -> None:
    trainer = _trainer_eval(runs["mt"])
    hyp = tmp_path / "hyp.txt"
    got, line = _eval(capsys, tmp_path, runs["mt"] / "checkpoints", "--data", runs["mt_data"], "--max-batches", 4,
                      "--max-sentences", 4, "--beam", 2, "--out-translations", hyp)
    assert got["loss"] == pytest.approx(trainer["val_loss"], abs=1e-6)
    assert got["tokens"] == trainer["val_tokens"]
    assert (got["bleu"], got["chrf"]) == pytest.approx((trainer["bleu"], trainer["chrf"]), abs=1e-9)
    assert got["sentences"] == 4 and got["beam"] == 2
    assert hyp.read_text().splitlines()[:1] == [trainer["samples"][0]["hyp"]] and len(hyp.read_text().splitlines()) == 4
    assert f"bleu {trainer['bleu']:.2f}" in line and "chrf" in line


def test_translation_raw_parallel_files(runs, tmp_path, capsys) -> None:
    from meo_ds.data.tokenizer import Tokenizer

    corpus = runs["mt_data"].parent / "corpus"
    pairs = list(zip((corpus / "source.txt").read_text().splitlines()[:7],
                     (corpus / "target.txt").read_text().splitlines()[:7]))
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s, _ in pairs))
    (tmp_path / "tgt.txt").write_text("".join(t + "\n" for _, t in pairs))
    got, _ = _eval(capsys, tmp_path, runs["mt"] / "checkpoints", "--data", tmp_path / "src.txt",
                   tmp_path / "tgt.txt", "--beam", 1)
    tok = Tokenizer(runs["mt_data"] / "tokenizer.model")
    assert got["tokens"] == sum(len(tok.encode(t)) + 1 for _, t in pairs)  # targets + eos
    assert got["sentences"] == 7 and 0 <= got["bleu"] <= 100


def test_two_launched_ranks_give_the_one_process_figures(runs, tmp_path, capsys) -> None:
    """Batches over two ranks, then (--ep 2) experts sharded over them too: the one-process figures."""
    lm = [runs["lm"] / "checkpoints", "--data", runs["lm_data"], "--batch-size", 3]
    mt = [runs["mt"] / "checkpoints", "--data", runs["mt_data"], "--split", "test", "--max-sentences", 70,
          "--beam", 2]
    one_lm, _ = _eval(capsys, tmp_path, *lm)
    one_mt, _ = _eval(capsys, tmp_path, *mt, "--out-translations", tmp_path / "one.txt")
    odd = one_lm["batches"] - 1 + one_lm["batches"] % 2  # rank 1 runs one uncounted forward under --ep
    one_odd, _ = _eval(capsys, tmp_path, *lm, "--max-batches", odd)
    args = [*lm, "--json", tmp_path / "lm2.json", "--next", *mt, "--json", tmp_path / "mt2.json",
            "--out-translations", tmp_path / "two.txt", "--next",
            *lm, "--max-batches", odd, "--ep", 2, "--json", tmp_path / "lm_ep.json", "--next",
            *mt, "--ep", 2, "--json", tmp_path / "mt_ep.json", "--out-translations", tmp_path / "ep.txt"]
    proc = run_ranks(EVAL_WORKER, 2, [str(a) for a in args], timeout=240)
    assert proc.stdout.count("meo-eval | ") == 4  # rank 0 only
    two_lm, two_mt, ep_lm, ep_mt = (json.loads((tmp_path / f"{n}.json").read_text())
                                    for n in ("lm2", "mt2", "lm_ep", "mt_ep"))
    assert two_lm["world_size"] == two_mt["world_size"] == 2 and two_lm["ep"] == 1
    assert two_lm["batches"] == one_lm["batches"] > 2 and two_lm["tokens"] == one_lm["tokens"]
    assert two_lm["loss"] == pytest.approx(one_lm["loss"], abs=1e-9)
    assert two_mt["batches"] == one_mt["batches"] > 2 and two_mt["tokens"] == one_mt["tokens"]
    assert two_mt["loss"] == pytest.approx(one_mt["loss"], abs=1e-9)
    assert (tmp_path / "two.txt").read_text() == (tmp_path / "one.txt").read_text()
    assert two_mt["bleu"] == one_mt["bleu"] and two_mt["sentences"] == 70  # rank 1 translated pairs 64..69
    # --ep 2: each rank holds 2 of the 4 experts of every layer, and tokens travel by all-to-all.
    assert ep_lm["ep"] == ep_mt["ep"] == 2
    dropped = LM_MODEL["n_layers"] * 2 * 3 * LM_MODEL["d_model"] * LM_MODEL["d_ff"]  # 2 SwiGLU experts per layer
    assert two_lm["rank_parameters"] - ep_lm["rank_parameters"] == dropped
    assert ep_lm["batches"] == one_odd["batches"] == odd and odd % 2 and ep_lm["tokens"] == one_odd["tokens"]
    assert ep_lm["loss"] == pytest.approx(one_odd["loss"], abs=1e-9)
    assert ep_mt["tokens"] == one_mt["tokens"] and ep_mt["loss"] == pytest.approx(one_mt["loss"], abs=1e-9)
    assert (tmp_path / "ep.txt").read_text() == (tmp_path / "one.txt").read_text()
    assert ep_mt["bleu"] == one_mt["bleu"] and ep_mt["sentences"] == 70


def test_launched_ranks_share_the_checksums_and_all_stop_on_a_damaged_file(runs, tmp_path) -> None:
    """Launched ranks hash a share of the files each (file i: rank i mod 2): a byte flipped in a
    file that only rank 1 hashes stops both ranks (exit 2) with rank 0's one line naming it."""
    tag = tmp_path / "ck" / tag_for(6)
    shutil.copytree(runs["lm"] / "checkpoints" / tag_for(6), tag)
    names = sorted(p.name for p in tag.glob("*model_states.pt") if "optim" not in p.name)
    damaged = tag / names[1]  # the main file and the expert files, sorted: rank 1's first
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = run_ranks(EVAL_WORKER, 2, [str(tag), "--data", str(runs["lm_data"])], timeout=120, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if "meo-eval: error: " in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"{damaged.name}: contents changed since the tag was completed" in lines[0], lines[0]


def test_a_stuck_peer_stops_every_rank_with_one_line_naming_the_collective(runs, tmp_path) -> None:
    """Two ranks started by hand with different --max-batches under --ep 2: after their common
    first forward, rank 0's second forward waits in an all-to-all that rank 1 never joins, and rank
    1 waits in the loss all-reduce. Each stops after --timeout-s with one line and exit status 4."""
    import sys
    import time

    from tests.distributed import run_ranks_without_launcher

    argv = [sys.executable, "-m", "meo_ds.checkpoint_eval", str(runs["lm"] / "checkpoints"), "--data",
            str(runs["lm_data"]), "--batch-size", "3", "--ep", "2", "--timeout-s", "4"]
    start = time.time()
    ranks = run_ranks_without_launcher(argv, 2, timeout=90, rank_args=[["--max-batches", "3"], ["--max-batches", "1"]])
    for r, (rank, collective) in enumerate(zip(ranks, ("all_to_all", "all_reduce"))):
        err = rank.stderr
        line = next((ln for ln in err.splitlines() if ln.startswith("meo-eval: error: ")), err[-3000:])
        assert rank.returncode == 4 and "Traceback" not in err, err[-3000:]
        assert f"rank {r}: collective {collective}" in line and "raise --timeout-s" in line, line
    assert time.time() - start < 75


def _error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meo-eval: error: ") and "Traceback" not in err
    return err


def test_bad_input_is_one_line_before_any_work(runs, tmp_path, capsys) -> None:
    lm_ck, mt_ck = runs["lm"] / "checkpoints", runs["mt"] / "checkpoints"
    assert "does not exist" in _error(capsys, tmp_path / "nowhere", "--data", runs["lm_data"])
    broken = tmp_path / "ck" / tag_for(6)
    shutil.copytree(lm_ck / tag_for(6), broken)
    (broken / "COMPLETE").unlink()
    assert "COMPLETE" in _error(capsys, broken, "--data", runs["lm_data"])
    assert "'mt' corpus but the checkpoint is a lm model" in _error(capsys, lm_ck, "--data", runs["mt_data"])
    assert "no split 'test'; --split one of: train, validation" in _error(
        capsys, lm_ck, "--data", runs["lm_data"], "--split", "test")
    (tmp_path / "empty.txt").write_text("\n")
    assert "no documents" in _error(capsys, lm_ck, "--data", tmp_path / "empty.txt")
    (tmp_path / "e.src").write_text("")
    (tmp_path / "e.tgt").write_text("")
    assert "file is empty" in _error(capsys, mt_ck, "--data", tmp_path / "e.src", tmp_path / "e.tgt")
    assert "--beam do(es) not apply to a lm checkpoint" in _error(capsys, lm_ck, "--data", runs["lm_data"], "--beam", 2)
    assert "run under the launcher: deepspeed --num_gpus 2" in _error(capsys, lm_ck, "--data", runs["lm_data"],
                                                                      "--ep", 2)
    from meo_ds.data.lm import prepare_lm

    (tmp_path / "t.txt").write_text("a few words\n" * 20)
    other_tok = tmp_path / "other_tok"
    prepare_lm([tmp_path / "t.txt"], runs["mt_data"] / "tokenizer.model", other_tok, progress=False)
    assert "another tokenizer" in _error(capsys, lm_ck, "--data", other_tok)


def test_moved_corpus_needs_tokenizer(runs, tmp_path, capsys) -> None:
    data = runs["lm_data"]
    moved = tmp_path / "moved"
    data.rename(moved)
    try:
        assert "pass --tokenizer" in _error(capsys, runs["lm"] / "checkpoints", "--data", moved)
        got, _ = _eval(capsys, tmp_path, runs["lm"] / "checkpoints", "--data", moved, "--tokenizer", moved,
                       "--max-batches", 4)
        assert got["loss"] == pytest.approx(_trainer_eval(runs["lm"])["val_loss"], abs=1e-6)
    finally:
        moved.rename(data)
