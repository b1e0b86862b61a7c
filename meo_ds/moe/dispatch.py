"""How tokens reach their experts and come back: capacity or dropless, local or all-to-all.

At ep_size 1 both modes reduce to the same shape: rows sorted by expert with `counts[e]` rows
for expert e. Capacity mode gives every expert exactly C rows (a zero-padded [E, C] slot
buffer); dropless mode gives each expert exactly its assigned tokens. Experts are numbered
rank-major: rank r holds r*El .. r*El+El-1. With ep_size > 1 rows travel by
`all_to_all_single` over the expert-parallel group (only through `_all_to_all` here). Every rank
runs every collective whatever it routes (zero rows included), so uneven routing cannot hang.

Wire format, dropless at ep_size > 1: one row per (token, destination rank), not per (token,
expert). A token goes once to every rank that holds at least one of its experts; that rank fans
the row out to its local experts, combines their outputs with the routing weights and sends ONE
row back, which the source adds into the token's output. Four all-to-alls in the forward:
  1. split sizes, int64 [ep, El + 1] per rank: the assignments per local expert and the pairs
     (the two host reads of dropless mode, as before: own sizes and received sizes);
  2. token rows [pairs, d] in x's dtype, rank-major, token order within a rank;
  3. metadata [assignments, 2] in promote(fp32, x.dtype): per (token, expert) assignment the
     pair's index in its source's block and the combine weight (the weight as the ep=1 combine
     uses it, cast to x's dtype, so the float holds it and the index exactly), sorted by
     (local expert, token);
  4. combined rows [pairs, d] back along the reversed splits of 2.
Backward runs the same all-to-alls reversed (AllToAll); the weights' gradients travel back with
the metadata. Forward bytes this rank's tokens put on the wire (RoutingStats.a2a_bytes):
    2 d bytes(x) * remote pairs + 2 bytes(meta) * remote assignments + (ep-1)(El+1) 8
instead of 2 d bytes(x) * remote assignments + (ep-1) El 8 before. A token whose k experts sit
on one other rank costs one row each way instead of k; XMoE at t=0.9 (about 8 of 64 experts,
ep 2) fell from 8,099 to 1,967 B/token in bench_moe.py (d 256, fp32), top-2 of 8 from 2,046 to
1,613. Local pairs travel too (the self split of all_to_all_single, a copy) and count nothing.

Capacity at ep_size > 1 keeps the per-expert slot buffer: El*C rows to each rank. Its shapes may
not depend on routing (one host sync, the group's max C). A static per-rank pair buffer needs
min(El*C, S) rows, which is El*C whenever capacity_k * cf <= ep (XMoE's capacity_k is 1), so
grouping by rank saves nothing there; where it would (top-2, cf 1.25, ep 2: a fifth), sizing
the buffer by the senders' S costs another host sync.

Gathers use index_select (backward: index_add) rather than advanced indexing, whose backward is
an accumulating index_put and measurably slower.

Capacity semantics: C is computed on each rank from that rank's real-token count S, and drops
are decided on the sending rank, per expert, so an ep>1 layer computes, per rank, exactly what a
single-process layer computes on that rank's tokens alone. Ranks may have different S (padding):
the exchanged slot buffer is sized by the largest C in the EP group (one all-reduce of an int),
extra slots stay zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meo_ds.distributed import all_reduce_max_int

from .routing import RouterOutput


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(min_capacity, ceil(k * S / E * cf)); XMoE passes k = 1."""
    return max(min_capacity, math.ceil(k * num_tokens / num_experts * capacity_factor))


def counts_of(values: torch.Tensor, size: int) -> torch.Tensor:
    """bincount(values, minlength=size) for int values in [0, size), without a host sync
    (torch.bincount reads the largest value back to size its output on CUDA)."""
    flat = values.reshape(-1)
    return torch.zeros(size, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def capacity_slots(route: RouterOutput, num_experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of every assignment in its expert's buffer and whether it fits (slot < capacity).

    Priority: all first choices before all second choices (and so on), and within one choice
    rank by descending router probability; ties keep token order. Returns keep, slot: [T, K].
    """
    num_tokens, k = route.expert_ids.shape
    n = num_tokens * k
    # Invalid slots go to a sentinel expert E, so they take no place in any real expert.
    ids = torch.where(route.valid, route.expert_ids, num_experts).t().reshape(-1)  # choice-rank-major
    order = torch.argsort(-route.scores.t().reshape(-1), stable=True)
    rank = torch.arange(k, device=ids.device).repeat_interleave(num_tokens)
    order = order[torch.argsort(rank[order], stable=True)]  # priority order
    # Position within the expert = index among the same expert's assignments in priority order.
    ids_prio = ids[order]
    by_expert = torch.argsort(ids_prio, stable=True)
    counts = counts_of(ids_prio, num_experts + 1)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(n, device=ids.device) - starts[ids_prio[by_expert]]
    slot_prio = torch.empty_like(pos).scatter_(0, by_expert, pos)
    slot = torch.empty_like(pos).scatter_(0, order, slot_prio).view(k, num_tokens).t()
    return route.valid & (slot < capacity), slot


# ----------------------------------------------------------------------------------------------
# all-to-all with autograd


def _all_to_all(x: torch.Tensor, out_splits: Optional[list[int]], in_splits: Optional[list[int]], group) -> torch.Tensor:
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


# ----------------------------------------------------------------------------------------------
# dispatcher


@dataclass
class DispatchInfo:
    keep: torch.Tensor  # [T, K] bool: assignments that reached their expert
    a2a_bytes: int  # bytes this rank sent to other ranks through all-to-all (this forward)
    capacity: int  # C (0 in dropless mode)


class TokenDispatcher:
    """Routes the rows of x to `experts` (a LocalExperts) and combines their outputs.

    capacity_k is the k of C = ceil(k S / E cf): the router's k for top-k, 1 for XMoE.
    """

    def __init__(
        self, num_experts: int, ep_size: int, mode: str, capacity_k: int,
        capacity_factor: float, eval_capacity_factor: float, min_capacity: int,
    ):
        if mode not in ("capacity", "dropless"):
            raise ValueError(f"dispatch mode {mode!r} is unknown; use 'capacity' or 'dropless'")
        self.num_experts, self.ep_size, self.mode = num_experts, ep_size, mode
        self.capacity_k, self.min_capacity = capacity_k, min_capacity
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor

    def __call__(self, x: torch.Tensor, route: RouterOutput, experts, training: bool, group=None):
        """x: [T, d] real tokens -> ([T, d] combined expert output, DispatchInfo)."""
        if self.mode == "dropless":
            return self._dropless(x, route, experts, group)
        return self._capacity(x, route, experts, training, group)

    def _capacity(self, x, route, experts, training, group):
        # Slot side: each of the E*C buffer slots learns its token and combine weight by a scatter
        # of the assignments (dropped ones land in a spare slot that is cut off), then gathers and
        # combines whole rows. The row work is E*C whatever the router's slot count K (XMoE keeps
        # max_k slots per token), and no shape depends on routing: no host sync but the EP
        # group's max C. Empty slots read an appended zero row and combine with weight 0.
        cf = self.capacity_factor if training else self.eval_capacity_factor
        cap = expert_capacity(x.shape[0], self.capacity_k, self.num_experts, cf, self.min_capacity)
        keep, slot = capacity_slots(route, self.num_experts, cap)
        buf_cap = self._group_max(cap, group)
        num_tokens, k = keep.shape
        kept = keep.reshape(-1)
        spare = self.num_experts * buf_cap
        index = torch.where(kept, route.expert_ids.reshape(-1) * buf_cap + slot.reshape(-1), spare)
        tok = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # assignment (t, j) -> t
        slot_tok = torch.full((spare + 1,), num_tokens, device=x.device).scatter(0, index, tok)[:spare]
        slot_w = route.weights.new_zeros(spare + 1).scatter(0, index, route.weights.reshape(-1) * kept)[:spare]
        padded = F.pad(x, (0, 0, 0, 1))  # row num_tokens: zeros, for the empty slots
        y, sent = self._run_experts(padded.index_select(0, slot_tok), [buf_cap] * self.num_experts, experts, group)
        out = torch.zeros_like(padded).index_add(0, slot_tok, y * slot_w.to(x.dtype).unsqueeze(1))
        return out[:num_tokens], DispatchInfo(keep, sent, cap)

    def _dropless(self, x, route, experts, group):
        # Invalid slots sort after every expert (id E); the per-expert counts are the one host
        # read (the split sizes of the expert segments).
        if self.ep_size > 1:
            return self._dropless_by_rank(x, route, experts, group)
        num_tokens, k = route.valid.shape
        ids = torch.where(route.valid, route.expert_ids, self.num_experts).reshape(-1)
        order = torch.argsort(ids, stable=True)
        counts = counts_of(ids, self.num_experts + 1)[: self.num_experts].tolist()
        order = order[: sum(counts)]
        rows = torch.arange(num_tokens, device=x.device).repeat_interleave(k).index_select(0, order)
        y = experts(x.index_select(0, rows), counts)
        w = route.weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(1)
        out = x.new_zeros(x.shape).index_add(0, rows, y * w)
        return out, DispatchInfo(route.valid, 0, 0)

    def _dropless_by_rank(self, x, route, experts, group):
        """Dropless at ep_size > 1: one token row per (token, destination rank) pair, fanned out
        to the local experts and combined there (the module docstring's wire format)."""
        ep, local, num_experts = self.ep_size, self.num_experts // self.ep_size, self.num_experts
        num_tokens, k = route.valid.shape
        device = x.device
        ids = torch.where(route.valid, route.expert_ids, num_experts)  # [T, K]; invalid -> E (rank ep)
        tok = torch.arange(num_tokens, device=device).unsqueeze(1).expand(num_tokens, k)
        # Pair (rank r, token t) has flat key r*T + t: rank-major, token order within a rank.
        # Invalid slots land in the spare bin ep*T.
        pair_key = torch.where(route.valid, (ids // local) * num_tokens + tok, ep * num_tokens)
        has = counts_of(pair_key, ep * num_tokens + 1)[: ep * num_tokens] > 0
        pair_pos = has.cumsum(0) - 1  # position of each pair in the send buffer (where has)
        pairs_per_rank = has.view(ep, num_tokens).sum(1)
        expert_counts = counts_of(ids, num_experts + 1)[:num_experts].view(ep, local)
        # One host read of this rank's split sizes, one of the received ones (the all-to-all needs both).
        send = torch.cat([expert_counts, pairs_per_rank.unsqueeze(1)], 1)  # [ep, local + 1]
        send_host = send.tolist()
        recv_host = _all_to_all(send.reshape(-1), None, None, group).view(ep, local + 1).tolist()
        send_pairs, recv_pairs = [c[local] for c in send_host], [c[local] for c in recv_host]
        send_assign, recv_assign = [sum(c[:local]) for c in send_host], [sum(c[:local]) for c in recv_host]
        recv_counts = [c[:local] for c in recv_host]  # [source][local expert]

        # Source side: the pair rows (rank-major, token order) and the assignments' metadata,
        # sorted by global expert (= destination rank, local expert) and token within an expert.
        num_pairs, num_assign = sum(send_pairs), sum(send_assign)
        meta_dtype = torch.promote_types(torch.float32, x.dtype)
        _check_pair_index_exact(max(send_pairs + recv_pairs, default=0), meta_dtype)
        flat_tok = torch.arange(ep * num_tokens, device=device) % max(num_tokens, 1)
        pair_tok = torch.zeros(num_pairs + 1, dtype=torch.int64, device=device).scatter(
            0, torch.where(has, pair_pos, num_pairs), flat_tok)[:num_pairs]
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)[:num_assign]
        a_rank = flat_ids.index_select(0, order) // local
        pair_start = pairs_per_rank.cumsum(0) - pairs_per_rank
        a_pair = pair_pos.index_select(0, a_rank * num_tokens + order // k) - pair_start.index_select(0, a_rank)
        # The weights travel as the ep=1 combine uses them (cast to x's dtype); meta_dtype holds
        # that value and the pair index exactly.
        a_weight = route.weights.reshape(-1).index_select(0, order).to(x.dtype).to(meta_dtype)
        meta = torch.stack([a_pair.to(meta_dtype), a_weight], 1)  # [assignments, 2]

        recv_rows = AllToAll.apply(x.index_select(0, pair_tok), recv_pairs, send_pairs, group)
        recv_meta = AllToAll.apply(meta, recv_assign, send_assign, group)

        # Destination side: pair index within its source's block -> row of recv_rows; regroup
        # the assignments from (source, local expert) to (local expert, source) order.
        starts = [sum(recv_pairs[:s]) for s in range(ep)]
        index = torch.cat([part.long() + start for part, start in
                           zip(torch.split(recv_meta[:, 0], recv_assign), starts)])
        index = _regroup(index, recv_counts, by_source=False)
        weight = _regroup(recv_meta[:, 1], recv_counts, by_source=False).to(x.dtype).unsqueeze(1)
        y = experts(recv_rows.index_select(0, index), [sum(c[i] for c in recv_counts) for i in range(local)])
        combined = recv_rows.new_zeros(recv_rows.shape).index_add(0, index, y * weight)
        back = AllToAll.apply(combined, send_pairs, recv_pairs, group)
        out = x.new_zeros(x.shape).index_add(0, pair_tok, back)

        me = dist.get_rank(group)
        row_bytes = x.shape[1] * x.element_size()
        sent = (2 * row_bytes * (num_pairs - send_pairs[me])  # token rows out, combined rows back
                + 2 * meta.element_size() * (num_assign - send_assign[me])  # (pair index, weight) per assignment
                + (ep - 1) * (local + 1) * send.element_size())  # split sizes
        return out, DispatchInfo(route.valid, sent, 0)

    def _group_max(self, value: int, group) -> int:
        """The EP group's largest capacity: sizes the exchanged slot buffer, so it must be known on
        the host (the one host sync of capacity mode at ep_size > 1; none at ep_size 1)."""
        if self.ep_size == 1:
            return value
        return all_reduce_max_int(value, group)

    def _run_experts(self, rows: torch.Tensor, counts: Sequence[int], experts, group):
        """Capacity: rows sorted by global expert, counts[e] (= C) rows each -> expert outputs in the same order."""
        if self.ep_size == 1:
            return experts(rows, counts), 0
        ep, local = self.ep_size, self.num_experts // self.ep_size
        recv_counts = [list(counts[:local]) for _ in range(ep)]  # every source sends C rows to every expert
        send_splits = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
        recv_splits = [sum(c) for c in recv_counts]
        row_bytes = rows.shape[1] * rows.element_size()
        me = dist.get_rank(group)
        sent = 2 * row_bytes * (sum(send_splits) - send_splits[me])  # out and back
        recv = AllToAll.apply(rows, recv_splits, send_splits, group)
        grouped = _regroup(recv, recv_counts, by_source=False)
        out = experts(grouped, [sum(recv_counts[s][i] for s in range(ep)) for i in range(local)])
        back = _regroup(out, recv_counts, by_source=True)
        return AllToAll.apply(back, send_splits, recv_splits, group), sent


def _check_pair_index_exact(largest: int, dtype: torch.dtype) -> None:
    """Pair indices travel as floats of the metadata dtype: exact below 2**(mantissa bits + 1)."""
    limit = int(2 / torch.finfo(dtype).eps)
    if largest >= limit:
        raise ValueError(f"dispatch: {largest} token rows between two ranks exceed the {limit} a {dtype} pair "
                         f"index holds exactly; use smaller micro-batches per rank")


def _regroup(rows: torch.Tensor, counts: list[list[int]], by_source: bool) -> torch.Tensor:
    """Reorder segments between (source, local expert) order and (local expert, source) order.

    counts[s][i]: rows from source s for local expert i. by_source=False: input is source-major
    (as received), output expert-major; by_source=True: the inverse.
    """
    ep, local = len(counts), len(counts[0])
    if by_source:
        sizes = [counts[s][i] for i in range(local) for s in range(ep)]
        parts = torch.split(rows, sizes)
        return torch.cat([parts[i * ep + s] for s in range(ep) for i in range(local)])
    sizes = [counts[s][i] for s in range(ep) for i in range(local)]
    parts = torch.split(rows, sizes)
    return torch.cat([parts[s * local + i] for i in range(local) for s in range(ep)])
