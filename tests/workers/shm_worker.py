"""Rank worker for tests/test_distributed.py: start the process group the way meo_ds does, check
that all-reduce still works once the shm names are released, report MASTER_PORT, then exit
normally ("clean") or abruptly without any teardown ("die"); "killed_in_startup" kills rank 1
between DeepSpeed's buffer creation and meo_ds's release of the names."""
import os
import sys

import torch
import torch.distributed as dist

from meo_ds.distributed import init_distributed

if __name__ == "__main__":
    mode = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    if mode == "killed_in_startup":  # rank 1 is killed after DeepSpeed created the buffers, before release
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
        print(f"rank {dist.get_rank()} port {os.environ['MASTER_PORT']} buffers created", flush=True)
        dist.barrier()  # both have reported before the kill: the launcher then kills rank 0 at once
        if dist.get_rank() == 1:
            os.kill(os.getpid(), 9)
        dist.barrier()
    init_distributed()
    for numel in (16, 1 << 20):  # small and large messages take different shm code paths
        t = torch.full((numel,), float(dist.get_rank() + 1))
        dist.all_reduce(t)
        assert torch.all(t == sum(range(1, dist.get_world_size() + 1))), t[:4]
    print(f"rank {dist.get_rank()} port {os.environ['MASTER_PORT']} all_reduce ok", flush=True)
    if mode == "die":
        os._exit(0)
    dist.destroy_process_group()
