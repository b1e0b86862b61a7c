"""Worker: load a checkpoint saved by ds_train.py (ep=2) at ep = world size (e.g. 1 rank) and
check the eval outputs of every saved micro-batch. Usage: ds_load.py OUT_DIR"""
from __future__ import annotations

import glob
import deepspeed
import torch

from common import finish, script_args, check_close, init_dist
from ds_train import TinyMoEModel, ds_config

from meo_ds.parallel import parallelize


def main() -> None:
    out_dir = script_args()[0]
    rank, world = init_dist()
    model = parallelize(TinyMoEModel(), world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(0))
    path, _ = engine.load_checkpoint(f"{out_dir}/ckpt", tag="t", load_module_only=True)
    if path is None:
        raise AssertionError("load_checkpoint found no checkpoint")
    engine.module.eval()
    saved = sorted(glob.glob(f"{out_dir}/eval_*.pt"))
    if not saved:
        raise AssertionError("no saved eval outputs")
    for name in saved:
        record = torch.load(name)
        with torch.no_grad():
            _, y = engine.module(*record["batch"])
        check_close(f"reloaded output of {name}", y, record["y"], tol=1e-6)
    print(f"rank {rank}: {len(saved)} outputs equal after reload at ep={world}", flush=True)


if __name__ == "__main__":
    main()
    finish()
