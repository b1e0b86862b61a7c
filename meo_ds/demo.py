"""`meo-demo`: the README's main job, end to end on one machine, no network.

1. builds the demo language-modelling corpus (docstrings of the installed Python's standard
   library) and its tokenizer with meo_ds.data,
2. trains a tiny MoE language model on 2 ranks with expert parallelism 2 through the real
   `deepspeed` launcher (CPU ranks with DS_ACCELERATOR=cpu when there is no GPU),
3. evaluates validation perplexity, and prints the loss curve, throughput, and where the
   checkpoint and logs are.

    meo-demo                       # 267-322 s on 2 CPU cores (idle / shared with a test run; README)
    meo-demo --kind xmoe --steps 100 --out /tmp/demo
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from meo_ds.moe import registry

DEMO_PRESET = "tiny"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meo-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="meo_demo", help="working directory (data, run config, logs, checkpoints)")
    p.add_argument("--kind", default="topk", choices=registry.kinds(), help="MoE family")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--ranks", type=int, default=2, help="ranks (processes); expert parallelism uses all of them")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out instead of resuming them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config overrides")
    return p.parse_args(argv)


def use_gpus(ranks: int) -> bool:
    import torch

    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= ranks


def run_config(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> dict:
    from meo_ds.data import LMDataset

    ep = args.ranks if registry.get(args.kind).expert_parallel else 1  # MEO's experts are data-parallel
    vocab = LMDataset(data_dir, "train").tokenizer().vocab_size
    return {
        "task": "lm",
        "name": f"demo-{args.kind}",
        "model": {"preset": DEMO_PRESET, "vocab_size": vocab, "moe": {"kind": args.kind}},
        "parallel": {"ep_size": ep},
        "data": {"path": str(data_dir), "seq_len": 128},
        "train": {"steps": args.steps, "micro_batch_size": 8, "grad_accum": 1, "lr": 2e-3, "warmup_steps": 20,
                  "weight_decay": 0.1, "grad_clip": 1.0, "seed": 1234},
        "checkpoint": {"interval": 200, "keep_last": 2},
        "logging": {"out_dir": str(run_dir), "interval": 50},
        "eval": {"interval": 200, "max_batches": 10},
    }


def ds_config(gpu: bool) -> dict:
    cfg = {"zero_optimization": {"stage": 2, "overlap_comm": gpu, "contiguous_gradients": True},
           "csv_monitor": {"enabled": True, "output_path": "auto", "job_name": "auto"}}
    if gpu:
        cfg["bf16"] = {"enabled": True}
    return cfg


def launch(args: argparse.Namespace, config_path: Path, ds_path: Path, gpu: bool) -> int:
    from meo_ds.distributed import free_port

    env = dict(os.environ)
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.ranks)))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
           "--master_port", str(free_port()), "--module", "meo_ds.train",
           "--config", str(config_path), "--deepspeed_config", str(ds_path)]
    for item in args.set:
        cmd += ["--set", item]
    print("[meo-demo] $ " + ("DS_ACCELERATOR=cpu " if not gpu else "") + " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[meo-train]" in line or "Error" in line or "error" in line:
            print(line, end="", flush=True)
    return proc.wait()


def summarize(run_dir: Path, seconds: float) -> None:
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = {m["step"]: m for m in metrics}
    losses = [(s, steps[s]["loss"]) for s in sorted(steps) if steps[s]["loss"] is not None]
    every = max(1, len(losses) // 10)
    curve = losses[::every] + ([losses[-1]] if losses[-1] not in losses[::every] else [])
    print("\n[meo-demo] loss curve (step: training loss):")
    print("  " + "  ".join(f"{s}: {l:.3f}" for s, l in curve))
    evals = [json.loads(l) for l in (run_dir / "eval.jsonl").read_text().splitlines()] if (run_dir / "eval.jsonl").is_file() else []
    if evals:
        print("[meo-demo] validation: " + ", ".join(f"step {e['step']}: ppl {e['val_ppl']:.1f}" for e in evals))
    done = [l for l in (run_dir / "train.log").read_text().splitlines() if "done:" in l]
    if done:
        print("[meo-demo] " + done[-1].split("] ", 1)[-1])
    latest = (run_dir / "checkpoints" / "latest")
    print(f"[meo-demo] wall time {seconds:.0f} s")
    print(f"[meo-demo] checkpoint: {run_dir / 'checkpoints' / latest.read_text().strip() if latest.is_file() else 'none'}")
    print(f"[meo-demo] logs: {run_dir / 'train.log'}, per-step metrics: {run_dir / 'metrics.jsonl'}, "
          f"monitor CSVs: {run_dir / 'monitor'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out).resolve()
    run_dir = out / f"run-{args.kind}"
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    from meo_ds.data.demo import build_demo

    print(f"[meo-demo] preparing the demo corpus in {out / 'data'}", flush=True)
    data_dir = build_demo("lm", out / "data")
    gpu = use_gpus(args.ranks)
    config_path, ds_path = out / f"run-{args.kind}.yaml", out / "ds_config.json"
    config_path.write_text(yaml.safe_dump(run_config(args, Path(data_dir), run_dir), sort_keys=False))
    ds_path.write_text(json.dumps(ds_config(gpu), indent=2))
    code = launch(args, config_path, ds_path, gpu)
    if code != 0:
        print(f"[meo-demo] training failed (exit {code}); see {run_dir / 'train.log'}", file=sys.stderr)
        return code
    summarize(run_dir, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
