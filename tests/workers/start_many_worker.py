"""Rank worker: start meo_ds's Trainer on several run configs in one launch, recording how each ends.

argv: --deepspeed_config DS.json OUTCOMES.json RUN1.yaml [RUN2.yaml ...]. Each run is what
`meo-train --config RUNi.yaml` does; a run that ends in SystemExit (a refused checkpoint exits
with status 2 on every rank) is recorded and the next one starts, so one launch checks several
damaged checkpoints. Rank 0 writes {config: exit status} to OUTCOMES.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from meo_ds.train import Trainer, load_configs, parse_args


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
    ds_path, outcomes, configs = argv[1], argv[2], argv[3:]
    codes = {}
    for config in configs:
        codes[config] = run(config, ds_path)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(outcomes, "w") as f:
            json.dump(codes, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
