"""Rank worker: run meo_ds's Trainer for several run configs, one after another, in one launch.

argv: --deepspeed_config DS.json RUN1.yaml [RUN2.yaml ...]. Each run is exactly what
`meo-train --config RUNi.yaml` does (setup, training loop, evaluation, checkpoint with the run
config in its client state); sharing one launch saves the launcher/import time per run.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from meo_ds.train import Trainer, load_configs, parse_args


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_path, configs = argv[1], argv[2:]
    for config in configs:
        args = parse_args(["--config", config, "--deepspeed_config", ds_path])
        cfg, ds = load_configs(args, int(__import__("os").environ.get("WORLD_SIZE", "1")))
        trainer = Trainer(cfg, ds)
        trainer.setup()
        code = trainer.train()
        if code != 0:
            return code
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
