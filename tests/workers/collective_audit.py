"""Trainer rank (meo_ds's Trainer, run by run) with every torch.distributed collective audited.

Before anything imports deepspeed or meo_ds, each collective of torch.distributed is wrapped.
A call's issuer is the first frame outside torch and deepspeed.comm. When the issuer is meo_ds
code it must be the seam (meo_ds/distributed.py), with its tensors on the seam's
communication device, or the all-to-all of model tensors in meo_ds/moe/dispatch.py
(`_all_to_all`); anything else is a violation. Collectives DeepSpeed issues on its own (engine
gradient reductions, checkpoint barriers) are not ours and pass. After each run the rank writes
{out_dir}/collective_audit.rank{r}.json: the seam's callers and the violations.
"""
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list", "all_reduce_coalesced",
               "send", "recv", "isend", "irecv")
TORCH_DIR = os.path.dirname(torch.__file__)
PACKAGE = str(Path(__file__).resolve().parents[2] / "meo_ds")
SEAM = os.path.join(PACKAGE, "distributed.py")
DISPATCH = os.path.join(PACKAGE, "moe", "dispatch.py")
seam_callers: Counter = Counter()
violations: list = []
depth = [0]


def _comm_layer(filename: str) -> bool:
    return filename.startswith(TORCH_DIR) or f"{os.sep}deepspeed{os.sep}comm{os.sep}" in filename


def _tensors(args, kwargs):
    found = []
    for a in list(args) + list(kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        found += [t for t in items if torch.is_tensor(t)]
    return found


def _audit(name, args, kwargs):
    frame = sys._getframe(2)
    while frame is not None and _comm_layer(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return  # DeepSpeed's own collectives (or the test's): not issued by meo_ds
    where = f"{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_code.co_name}"
    if frame.f_code.co_filename == SEAM:
        from meo_ds.distributed import comm_device

        caller = frame.f_back
        seam_callers[f"{caller.f_code.co_name}->{name}"] += 1
        wrong = [str(t.device) for t in _tensors(args, kwargs) if t.device != comm_device()]
        if wrong:
            violations.append(f"{name} from the seam on {wrong}, not the communication device {comm_device()}")
    elif not (frame.f_code.co_filename == DISPATCH and frame.f_code.co_name == "_all_to_all"):
        stack = "".join(traceback.format_stack(frame, limit=4))
        violations.append(f"{name} issued by {where} outside meo_ds/distributed.py:\n{stack}")


def _wrap(name):
    original = getattr(dist, name)

    def audited(*args, **kwargs):
        if depth[0] == 0:
            _audit(name, args, kwargs)
        depth[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1

    setattr(dist, name, audited)


for _name in COLLECTIVES:
    if hasattr(dist, _name):
        _wrap(_name)


def main() -> int:
    """argv: --deepspeed_config DS.json RUN1.yaml [RUN2.yaml ...] (as tests/export/train_many_worker.py):
    each run is what `meo-train --config RUNi.yaml` does; its audit lands in its out_dir."""
    from meo_ds.preflight import load_configs
    from meo_ds.train import Trainer, parse_args

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_path, configs = argv[1], argv[2:]
    for config in configs:
        cfg, ds = load_configs(parse_args(["--config", config, "--deepspeed_config", ds_path]),
                               int(os.environ.get("WORLD_SIZE", "1")))
        seam_callers.clear()
        violations.clear()
        trainer = Trainer(cfg, ds)
        trainer.setup()
        code = trainer.train()
        dist.barrier()
        (Path(cfg.logging.out_dir) / f"collective_audit.rank{trainer.rank}.json").write_text(
            json.dumps({"seam_callers": dict(seam_callers), "violations": violations}, indent=1))
        if code != 0:
            return code
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
