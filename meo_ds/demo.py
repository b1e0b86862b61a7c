"""`meo-demo`: the README's main job, end to end on one machine, no network.

1. builds a demo corpus and its tokenizer with meo_ds.data: for `--task lm` (the default) the
   docstrings of the installed Python's standard library, for `--task mt` the synthetic language
   pair of meo_ds/data/demo.py (20,000 sentence pairs; a joint vocabulary of the 441 pieces
   that text supports),
2. trains a tiny MoE model on 2 ranks through the real `deepspeed` launcher, with expert
   parallelism 2 for top-k and XMoE (CPU ranks with DS_ACCELERATOR=cpu when there is no GPU):
   the `tiny` decoder-only LM, or the `mt_tiny` encoder-decoder (top-2 of 4 experts in every
   encoder layer) for translation,
3. evaluates (validation perplexity; translation adds BLEU and chrF by beam search on 200
   validation pairs), and prints the loss curve, throughput, and where the run directory,
   checkpoint and logs are and how to export the checkpoint.

    meo-demo                       # 2-5.5 min on 2 CPU cores (128-322 s measured; README)
    meo-demo --task mt             # translation: 43 s on 2 idle CPU cores; BLEU 59 -> 89, chrF 81 -> 95
    meo-demo --kind xmoe --steps 100 --out /tmp/demo

Runs live in OUT/run-KIND (lm) and OUT/run-mt-KIND (mt); the corpora in OUT/data and OUT/data-mt.
The model's vocabulary is `auto`: the demo tokenizer's size, read from the corpus at start-up.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from meo_ds import launcher
from meo_ds.moe import registry

# What differs between the two demos: preset, corpus directory, steps, and run-config sections.
# A run is named `demo-<label>` and lives in OUT/run-<label>.
TASKS = {"lm": {"task": "lm", "preset": "tiny", "data": "data", "label": "{kind}", "steps": 600},
         "mt": {"task": "translation", "preset": "mt_tiny", "data": "data-mt", "label": "mt-{kind}", "steps": 300}}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meo-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="meo_demo", help="working directory (data, run config, logs, checkpoints)")
    p.add_argument("--task", default="lm", choices=sorted(TASKS), help="language modelling or translation")
    p.add_argument("--kind", default="topk", choices=registry.kinds(), help="MoE family")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600 for lm, 300 for mt)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (processes); expert parallelism uses all of them")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config overrides")
    return p.parse_args(argv)


def steps(args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else TASKS[args.task]["steps"]


def label(args: argparse.Namespace) -> str:
    return TASKS[args.task]["label"].format(kind=args.kind)


def run_config(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> dict:
    spec = TASKS[args.task]
    ep = args.ranks if registry.get(args.kind).expert_parallel else 1  # MEO's experts are data-parallel
    common = {
        "task": spec["task"],
        "name": f"demo-{label(args)}",
        "model": {"preset": spec["preset"], "vocab_size": "auto", "moe": {"kind": args.kind}},
        "parallel": {"ep_size": ep},
        "logging": {"out_dir": str(run_dir), "interval": 50 if args.task == "lm" else 25},
    }
    return {**common, **recipe(args.task, steps(args), data_dir)}


def recipe(task: str, n: int, data_dir: Path) -> dict:
    """The demo's data, train, checkpoint and eval sections for `task` (lm or mt) and n steps
    (meo-study trains every variant with them)."""
    if task == "lm":
        return {"data": {"path": str(data_dir), "seq_len": 128},
                "train": {"steps": n, "micro_batch_size": 8, "grad_accum": 1, "lr": 2e-3, "warmup_steps": 20,
                          "weight_decay": 0.1, "grad_clip": 1.0, "seed": 1234},
                "checkpoint": {"interval": 200, "keep_last": 2},
                "eval": {"interval": 200, "max_batches": 10}}
    # Translation: the Transformer recipe (betas 0.98, inverse square root after warmup, label
    # smoothing from the preset), batches of 1024 padded tokens per rank; BLEU/chrF halfway and at the end.
    return {"data": {"path": str(data_dir), "max_tokens": 1024},
            "train": {"steps": n, "grad_accum": 1, "lr": 3e-3, "warmup_steps": max(1, n // 10),
                      "betas": [0.9, 0.98], "weight_decay": 0.0, "grad_clip": 1.0, "seed": 3},
            "checkpoint": {"interval": max(1, n // 2), "keep_last": 2},
            "eval": {"interval": max(1, n // 2), "max_batches": 4, "bleu_sentences": 200, "beam_size": 4,
                     "max_new_tokens": 48}}


def describe_eval(result: dict) -> str:
    """`ppl 190.3`, and for translation `ppl 1.5, BLEU 91.2, chrF 95.0` (meo_ds/evaluate.py's keys)."""
    text = f"ppl {result['val_ppl']:.1f}"
    if "bleu" in result:
        text += f", BLEU {result['bleu']:.1f}, chrF {result['chrf']:.1f}"
    return text


def summarize(run_dir: Path, seconds: float, name: str) -> None:
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = {m["step"]: m for m in metrics}
    losses = [(s, steps[s]["loss"]) for s in sorted(steps) if steps[s]["loss"] is not None]
    every = max(1, len(losses) // 10)
    curve = losses[::every] + ([losses[-1]] if losses[-1] not in losses[::every] else [])
    print("\n[meo-demo] loss curve (step: training loss):")
    print("  " + "  ".join(f"{s}: {l:.3f}" for s, l in curve))
    evals = [json.loads(l) for l in (run_dir / "eval.jsonl").read_text().splitlines()] if (run_dir / "eval.jsonl").is_file() else []
    if evals:
        print("[meo-demo] validation: " + ", ".join(f"step {e['step']}: {describe_eval(e)}" for e in evals))
    done = [l for l in (run_dir / "train.log").read_text().splitlines() if "done:" in l]
    if done:
        print("[meo-demo] " + done[-1].split("] ", 1)[-1])
    latest = (run_dir / "checkpoints" / "latest")
    print(f"[meo-demo] wall time {seconds:.0f} s")
    print(f"[meo-demo] run directory: {run_dir} (run config as trained: {run_dir / 'config.json'})")
    print(f"[meo-demo] checkpoint: {run_dir / 'checkpoints' / latest.read_text().strip() if latest.is_file() else 'none'}")
    print(f"[meo-demo] logs: {run_dir / 'train.log'}, per-step metrics: {run_dir / 'metrics.jsonl'}, "
          f"evaluations: {run_dir / 'eval.jsonl'}, monitor CSVs: {run_dir / 'monitor'}")
    print(f"[meo-demo] export to HuggingFace: meo-export {run_dir / 'checkpoints'} hf/{name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out).resolve()
    spec = TASKS[args.task]
    run_dir = out / f"run-{label(args)}"
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    from meo_ds.data.demo import build_demo

    print(f"[meo-demo] preparing the {args.task} demo corpus in {out / spec['data']}", flush=True)
    data_dir = build_demo(args.task, out / spec["data"])
    gpu = launcher.use_gpus(args.ranks)
    config_path, ds_path = out / f"{run_dir.name}.yaml", out / "ds_config.json"
    config_path.write_text(yaml.safe_dump(run_config(args, Path(data_dir), run_dir), sort_keys=False))
    ds_path.write_text(json.dumps(launcher.ds_config(gpu), indent=2))
    code = launcher.launch(config_path, ds_path, args.ranks, gpu, args.set)
    if code != 0:
        print(f"[meo-demo] training failed (exit {code}); see {run_dir / 'train.log'}", file=sys.stderr)
        return code
    summarize(run_dir, time.time() - start, f"demo-{label(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
