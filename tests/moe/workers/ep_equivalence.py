"""Worker: an ep=N layer on N ranks equals the single-process layer with the same weights.

The ep=N layer is the single-process layer (same weights) through meo_ds.parallel.parallelize.

For every (top-k | threshold) x (capacity | dropless) case each rank routes its own micro-batch
(with padding); every rank also runs the ep=1 reference on *each* rank's micro-batch alone
(capacity is computed per rank from that rank's real tokens, so per-batch is the matching
reference) and checks: its output and input gradient equal the reference on its batch; its
local experts' gradients equal the reference experts' gradients summed over all batches (the
all-to-all brings every rank's tokens to them); the router gradient summed over ranks equals the
reference's summed over batches. Then uneven routing: all tokens to expert 0 and rank 1 with
zero real tokens must neither hang nor differ. Each case also counts the host syncs of one ep=N
forward (tests/moe/host_syncs.py): what the all-to-all needs and nothing else. Raises on any
mismatch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from common import finish, batch, check_close, expert_grads, init_dist, make_cfg
from host_syncs import count_host_syncs

from meo_ds.moe import MoELayer
from meo_ds.parallel import parallelize

D, F, B, L = 8, 12, 2, 6
# Host syncs of one ep>1 forward with a padding mask: the real-token selection (nonzero), and
# capacity: the EP group's max capacity (int) / dropless: own and received counts (tolist).
EP_SYNCS = {"capacity": {"nonzero": 1, "int": 1}, "dropless": {"nonzero": 1, "tolist": 2}}


def run(layer: MoELayer, x, mask, probe):
    x = x.clone().requires_grad_(True)
    out = layer(x, mask)
    ((out.hidden * probe).sum() + out.aux_loss).backward()
    return out, x.grad


def reference(cfg_kw: dict, kind: str, mode: str, world: int, batches, force=None):
    torch.manual_seed(0)
    ref = MoELayer(make_cfg(kind, mode, **cfg_kw), D, F).double()
    if force is not None:
        force(ref)
    results = [run(ref, *b) for b in batches]
    return ref, results


def check_case(rank: int, world: int, kind: str, mode: str, batches, force=None, **cfg_kw) -> int:
    ref, results = reference(cfg_kw, kind, mode, world, batches, force)
    layer = MoELayer(make_cfg(kind, mode, **cfg_kw), D, F).double()
    layer.load_state_dict(ref.state_dict())
    parallelize(layer, world)
    out, xgrad = run(layer, *batches[rank])
    tag = f"{kind}/{mode}"
    check_close(f"{tag} output", out.hidden, results[rank][0].hidden)
    check_close(f"{tag} aux loss", out.aux_loss.detach(), results[rank][0].aux_loss.detach())
    check_close(f"{tag} input grad", xgrad, results[rank][1])
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    check_close(f"{tag} router grad", router_grad, ref.router.weight.grad)
    ref_experts = expert_grads(ref, 0)
    for key, grad in expert_grads(layer, rank).items():
        check_close(f"{tag} expert {key} grad", grad, ref_experts[key])
    check_a2a_bytes(tag, mode, out.stats, rank, world, layer.num_local_experts)
    with count_host_syncs() as syncs:
        layer(*batches[rank][:2])
    if dict(syncs) != EP_SYNCS[mode]:
        raise AssertionError(f"{tag}: host syncs of an ep={world} forward {dict(syncs)}, allowed {EP_SYNCS[mode]}")
    return out.stats


def check_a2a_bytes(tag: str, mode: str, stats, rank: int, world: int, local: int) -> None:
    """Bytes sent to other ranks, out and back: rows x d x 8 (fp64), plus the dropless count exchange."""
    row = D * 8
    if mode == "capacity":  # every expert elsewhere gets a full slot buffer (largest C in the group)
        caps = [torch.tensor([stats.extra["capacity"]])]
        dist.all_reduce(caps[0], op=dist.ReduceOp.MAX)
        want = 2 * row * (world - 1) * local * int(caps[0])
    else:
        mine = slice(rank * local, (rank + 1) * local)
        remote_rows = int(stats.expert_load.sum() - stats.expert_load[mine].sum())
        want = 2 * row * remote_rows + (world - 1) * local * 8
    if stats.a2a_bytes != want:
        raise AssertionError(f"{tag}: a2a_bytes {stats.a2a_bytes} != {want}")


def force_expert0(layer: MoELayer) -> None:
    """Router that sends every token (whose feature 0 is large) to expert 0 first."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
        layer.router.weight[1:, 1] = torch.linspace(0.1, 0.3, layer.num_experts - 1, dtype=torch.float64)


def main() -> None:
    rank, world = init_dist()
    # Different real-token counts per rank: capacity differs per rank too.
    batches = [batch(100 + r, B, L, D, pad_from=2 + r) for r in range(world)]
    for kind in ("topk", "xmoe"):
        for mode in ("capacity", "dropless"):
            stats = check_case(rank, world, kind, mode, batches)
            if mode == "capacity" and kind == "topk" and rank == 0 and stats.dropped_fraction == 0:
                raise AssertionError("the capacity case should drop some assignments (test data too easy)")
            print(f"rank {rank} {kind}/{mode} ok, a2a bytes {stats.a2a_bytes}, dropped {stats.dropped_fraction:.2f}", flush=True)
    # Uneven: every token prefers expert 0 (on rank 0); the last rank has no real token at all.
    uneven = []
    for r, (x, mask, probe) in enumerate(batches):
        x = x.clone()
        x[..., 0] = 5.0
        mask = mask.clone()
        if r == world - 1:
            mask[:] = False
        uneven.append((x, mask, probe))
    for kind in ("topk", "xmoe"):
        for mode in ("capacity", "dropless"):
            check_case(rank, world, kind, mode, uneven, force=force_expert0, min_capacity=0)
            print(f"rank {rank} uneven {kind}/{mode} ok", flush=True)


if __name__ == "__main__":
    main()
    finish()
