"""`meo-demo --task mt` end to end, shortened: the synthetic translation corpus is built, mt_tiny
trains 4 steps on 2 CPU ranks with ep 2 through the deepspeed launcher, is evaluated with
BLEU/chrF at steps 2 and 4, and the summary names the run directory, checkpoint, logs and the
export command, each of which exists. (The full default run learns the task: BLEU ~90, see the
closing note of issue 17; tests/test_train_mt.py pins learning with the same recipe.)
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

from distributed import REPO_ROOT, launch_env


def test_meo_demo_mt_trains_evaluates_and_says_where_everything_is(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "meo_ds.demo", "--task", "mt", "--steps", "4", "--out", str(out),
           "--set", "eval.bleu_sentences=16", "--set", "eval.max_new_tokens=24", "--set", "logging.interval=2"]
    proc = subprocess.run(cmd, env=launch_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    text, run = proc.stdout, out / "run-mt-topk"
    score = r"ppl [\d.]+, BLEU [\d.]+, chrF [\d.]+"
    assert re.search(rf"\[meo-demo\] validation: step 2: {score}, step 4: {score}\n", text), text[-3000:]
    assert f"[meo-demo] run directory: {run} (run config as trained: {run / 'config.json'})" in text
    assert f"[meo-demo] checkpoint: {run / 'checkpoints' / 'step_00000004'}\n" in text
    assert f"[meo-demo] export to HuggingFace: meo-export {run / 'checkpoints'} hf/demo-mt-topk" in text
    for path in ("train.log", "metrics.jsonl", "eval.jsonl", "monitor", "checkpoints/step_00000004"):
        assert (run / path).exists(), path
    config = json.loads((run / "config.json").read_text())
    vocab = json.loads((out / "data-mt" / "shards" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert config["task"] == "translation" and config["parallel"]["ep_size"] == 2
    assert config["model"]["vocab_size"] == vocab  # `auto`, resolved from the demo tokenizer
    final = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 4 and final["bleu_sentences"] == 16 and 0 <= final["bleu"] <= 100
