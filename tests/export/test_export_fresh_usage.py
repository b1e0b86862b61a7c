"""Exports as a newcomer meets them, in a fresh process without meo_ds: the model card's snippet
runs as printed with nothing on stderr but progress bars (no "run the custom code? [y/N]" prompt,
no config-type warning), and the text-generation pipeline keeps the space between the prompt and
a continuation that starts a word. Small exports are written from randomly initialised models
(exporter.write_model + export/tokenizer.py, the steps meo-export takes after consolidating)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from meo_ds.export import remote
from meo_ds.export.exporter import write_model
from meo_ds.export.tokenizer import write_tokenizer
from meo_ds.models import LMConfig, MTConfig, build_model
from meo_ds.moe import MoEConfig

USAGE_CHECK = Path(__file__).resolve().parent / "usage_check.py"
WORDS = "the cat sat on a mat while we return an exception raised in code and dogs ran over hills".split()
PROGRESS = ("Loading weights", "Writing model shards")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    import random

    from meo_ds.data.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("usage")
    rng = random.Random(0)
    train_tokenizer((" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(500)), root / "tok.model",
                    vocab_size=300)
    sp = Tokenizer(root / "tok.model")
    vocab = sp.vocab_size
    torch.manual_seed(0)
    lm_cfg = LMConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64,
                      moe=MoEConfig(kind="meo", num_experts=4, top_k=2, segment_len=4))
    lm = build_model(lm_cfg).eval()
    state = dict(lm.state_dict())
    # Every greedy step picks a word-start piece: "▁the" or "▁cat", whichever the hidden state favours.
    head = torch.zeros_like(state["lm_head.weight"])
    head[sp.encode("the")[-1]], head[sp.encode("cat")[-1]] = 1.0, -1.0
    state["lm_head.weight"] = head
    mt_cfg = MTConfig(vocab_size=vocab, d_model=32, n_heads=4, d_ff=48, encoder_layers=1, decoder_layers=1,
                      max_seq_len=64, moe=MoEConfig(kind="xmoe", num_experts=4, top_k=2, threshold=0.6))
    mt = build_model(mt_cfg).eval()
    out = {}
    for task, cfg, weights in (("lm", lm_cfg, state), ("translation", mt_cfg, mt.state_dict())):
        out[task] = root / f"hf_{task}"
        out[task].mkdir()
        write_model(out[task], "meo", types.SimpleNamespace(task=task, model=cfg), weights)
        write_tokenizer(out[task], root / "tok.model", task)
    return out


def _run(specs: list[dict], work: Path) -> tuple[list[dict], list[str]]:
    (work / "spec.json").write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"))
    proc = subprocess.run([sys.executable, str(USAGE_CHECK), str(work / "spec.json")], cwd=work, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    stderr = [line for line in proc.stderr.replace("\r", "\n").splitlines()
              if line.strip() and not any(p in line for p in PROGRESS)]
    return results, stderr


def test_card_snippets_run_as_printed_without_prompt_or_warning(exports: dict[str, Path], tmp_path: Path) -> None:
    specs = [{"dir": str(path), "task": task, "snippet": remote.usage(task, "meo", str(path)), "prompt": "Return"}
             for task, path in exports.items()]
    results, stderr = _run(specs, tmp_path)
    assert len(results) == 2
    assert stderr == [], "\n".join(stderr)

    lm = results[0]
    assert lm["new_tokens"] and all(t in ("▁the", "▁cat") for t in lm["new_tokens"]), lm
    assert lm["generated_text"] == "Return " + " ".join(t[1:] for t in lm["new_tokens"]), lm


def test_lm_tokenizer_keeps_word_start_spaces_translation_strips(exports: dict[str, Path]) -> None:
    from transformers import PreTrainedTokenizerFast

    lm = PreTrainedTokenizerFast(tokenizer_file=str(exports["lm"] / "tokenizer.json"))
    mt = PreTrainedTokenizerFast(tokenizer_file=str(exports["translation"] / "tokenizer.json"))
    ids = lm("the cat").input_ids
    assert ids == mt("the cat").input_ids  # encoding untouched
    assert lm.decode(ids[1:]) == " cat" and lm.decode(ids) == " the cat"
    assert mt.decode(ids) == "the cat"
