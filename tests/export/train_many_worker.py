"""Rank worker: run meo_ds's Trainer for several run configs, one after another, in one launch.

argv: --deepspeed_config DS.json [--outcomes OUT.json] RUN1.yaml [RUN2.yaml ...]. Each run is
exactly what `meo-train --config RUNi.yaml` does (setup, training loop, evaluation, checkpoint
with the run config in its client state); sharing one launch saves the launcher/import time per
run. Without --outcomes the first run that fails ends the launch with its exit status. With it, a
run that ends in SystemExit (a refused checkpoint exits 2 on every rank) is recorded and the next
one starts, and rank 0 writes {config: exit status} to OUT.json: one launch checks several
damaged checkpoints.
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from meo_ds.preflight import load_configs
from meo_ds.train import Trainer, parse_args


def run(config: str, ds_path: str) -> int:
    args = parse_args(["--config", config, "--deepspeed_config", ds_path])
    cfg, ds = load_configs(args, int(os.environ.get("WORLD_SIZE", "1")))
    trainer = Trainer(cfg, ds)
    try:
        trainer.setup()
        return trainer.train()
    except SystemExit as exc:
        return int(exc.code)


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_path, configs = argv[1], argv[2:]
    outcomes = None
    if configs[0] == "--outcomes":
        outcomes, configs = configs[1], configs[2:]
    codes = {}
    for config in configs:
        codes[config] = run(config, ds_path)
        if codes[config] != 0 and outcomes is None:
            return codes[config]
        dist.barrier()
    if outcomes is not None and dist.get_rank() == 0:
        with open(outcomes, "w") as f:
            json.dump(codes, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
