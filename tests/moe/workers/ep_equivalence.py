"""Worker: an ep=N layer on N ranks equals the single-process layer with the same weights.

The ep=N layer is the single-process layer (same weights) through meo_ds.parallel.parallelize.

For every (top-k | threshold) x (capacity | dropless) case each rank routes its own micro-batch
(with padding); every rank also runs the ep=1 reference on *each* rank's micro-batch alone
(capacity is computed per rank from that rank's real tokens, so per-batch is the matching
reference) and checks: its output and input gradient equal the reference on its batch; its
local experts' gradients equal the reference experts' gradients summed over all batches (the
all-to-all brings every rank's tokens to them); the router gradient summed over ranks equals the
reference's summed over batches. Then uneven routing: all tokens to expert 0 and rank 1 with
zero real tokens must neither hang nor differ. Then shared ranks: every token's experts all sit
on the last rank (one row per token carries several assignments there). Each case also counts
the host syncs of one ep=N forward (tests/moe/host_syncs.py): what the all-to-all needs and
nothing else, and checks RoutingStats.a2a_bytes against the wire format of meo_ds/moe/dispatch.py
recomputed from the routing and, summed over ranks, against the bytes handed to
all_to_all_single (what bench_moe.py counts). Raises on any mismatch.
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
    check_a2a_bytes(tag, mode, out.stats, rank, world, layer, batches[rank])
    check_wire_count(tag, layer, batches[rank], rank, world)
    with count_host_syncs() as syncs:
        layer(*batches[rank][:2])
    if dict(syncs) != EP_SYNCS[mode]:
        raise AssertionError(f"{tag}: host syncs of an ep={world} forward {dict(syncs)}, allowed {EP_SYNCS[mode]}")
    return out.stats


def remote_pairs_and_assignments(layer: MoELayer, x, mask, rank: int) -> tuple[int, int]:
    """(distinct (token, other rank) pairs, assignments to experts on other ranks) of this rank's
    tokens, from the router's own choices (deterministic: no noise, no jitter)."""
    with torch.no_grad():
        route = layer.router(x.reshape(-1, D)[mask.reshape(-1)])
    local = layer.num_local_experts
    pairs, assignments = set(), 0
    for t, (ids, valid) in enumerate(zip(route.expert_ids.tolist(), route.valid.tolist())):
        for e, v in zip(ids, valid):
            if v and e // local != rank:
                pairs.add((t, e // local))
                assignments += 1
    return len(pairs), assignments


def dropless_bytes(pairs: int, assignments: int, world: int, local: int) -> int:
    """Token rows out and combined rows back (fp64), a (pair index, weight) fp64 pair per
    assignment, and the exchanged split sizes (local expert counts + pair count, int64)."""
    return 2 * D * 8 * pairs + 2 * 8 * assignments + (world - 1) * (local + 1) * 8


def check_a2a_bytes(tag: str, mode: str, stats, rank: int, world: int, layer: MoELayer, rank_batch) -> None:
    """Bytes sent to other ranks for this rank's tokens, out and back (fp64 rows of D)."""
    local = layer.num_local_experts
    if mode == "capacity":  # every expert elsewhere gets a full slot buffer (largest C in the group)
        caps = [torch.tensor([stats.extra["capacity"]])]
        dist.all_reduce(caps[0], op=dist.ReduceOp.MAX)
        want = 2 * D * 8 * (world - 1) * local * int(caps[0])
    else:
        want = dropless_bytes(*remote_pairs_and_assignments(layer, rank_batch[0], rank_batch[1], rank), world, local)
    if stats.a2a_bytes != want:
        raise AssertionError(f"{tag}: a2a_bytes {stats.a2a_bytes} != {want}")


def check_wire_count(tag: str, layer: MoELayer, rank_batch, rank: int, world: int) -> None:
    """RoutingStats.a2a_bytes summed over ranks equals the bytes every rank handed to
    all_to_all_single for other ranks in one forward (bench_moe.py counts them the same way)."""
    original, counted = dist.all_to_all_single, [0]

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        splits = input_split_sizes or [input.shape[0] // world] * world
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        counted[0] += row * (sum(splits) - splits[rank])
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        reported = layer(*rank_batch[:2]).stats.a2a_bytes
    finally:
        dist.all_to_all_single = original
    totals = torch.tensor([reported, counted[0]], dtype=torch.int64)
    dist.all_reduce(totals)
    if totals[0] != totals[1]:
        raise AssertionError(f"{tag}: a2a_bytes summed over ranks {int(totals[0])} != {int(totals[1])} bytes "
                             f"counted at all_to_all_single")


def force_expert0(layer: MoELayer) -> None:
    """Router that sends every token (whose feature 0 is large) to expert 0 first."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
        layer.router.weight[1:, 1] = torch.linspace(0.1, 0.3, layer.num_experts - 1, dtype=torch.float64)


def force_last_rank(layer: MoELayer) -> None:
    """Router that sends every token (whose feature 0 is large) to the last two experts, both on
    the last rank, nearly evenly (so XMoE at threshold 0.6 takes both too)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[-2:, 0] = 50.0
        layer.router.weight[-2, 1], layer.router.weight[-1, 1] = 0.1, -0.1


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
    # Shared: each token's experts (two) sit on the last rank; every other rank sends each real
    # token there exactly once, with both of its assignments.
    shared = [(x.clone().index_fill_(-1, torch.tensor([0]), 5.0), mask, probe) for x, mask, probe in batches]
    for kind in ("topk", "xmoe"):
        for mode in ("capacity", "dropless"):
            stats = check_case(rank, world, kind, mode, shared, force=force_last_rank, min_capacity=0)
            if kind == "topk" and mode == "dropless":
                tokens = int(shared[rank][1].sum()) if rank != world - 1 else 0
                want = dropless_bytes(tokens, 2 * tokens, world, stats.expert_load.numel() // world)
                if stats.a2a_bytes != want:
                    raise AssertionError(f"shared topk/dropless: a2a_bytes {stats.a2a_bytes} != {want}")
            print(f"rank {rank} shared {kind}/{mode} ok, a2a bytes {stats.a2a_bytes}", flush=True)


if __name__ == "__main__":
    main()
    finish()
