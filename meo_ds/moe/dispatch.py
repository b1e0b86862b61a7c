"""How tokens reach their experts and come back: capacity or dropless, local or all-to-all.

Both modes reduce to the same shape: rows sorted by global expert with `counts[e]` rows for
expert e. Capacity mode gives every expert exactly C rows (a zero-padded [E, C] slot buffer);
dropless mode gives each expert exactly its assigned tokens. With ep_size > 1 the rows travel to
the rank holding their expert (experts are numbered rank-major: rank r holds r*El .. r*El+El-1)
by `all_to_all_single` over the expert-parallel group, are regrouped by local expert, go through
the experts and return the same way. Every rank runs every collective whatever it routes (zero
rows included), so uneven routing cannot hang.

Gathers use index_select (backward: index_add) rather than advanced indexing, whose backward is
an accumulating index_put and measurably slower.

Capacity semantics: C is computed on each rank from that rank's real-token count S, and drops
are decided on the sending rank, so an ep>1 layer computes, per rank, exactly what a
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
        y, sent = self._run_experts(padded.index_select(0, slot_tok), [buf_cap] * self.num_experts, experts,
                                    group, static=True)
        out = torch.zeros_like(padded).index_add(0, slot_tok, y * slot_w.to(x.dtype).unsqueeze(1))
        return out[:num_tokens], DispatchInfo(keep, sent, cap)

    def _dropless(self, x, route, experts, group):
        # Invalid slots sort after every expert (id E); the per-expert counts are the one host
        # read (the split sizes of the expert segments and of the all-to-all).
        num_tokens, k = route.valid.shape
        ids = torch.where(route.valid, route.expert_ids, self.num_experts).reshape(-1)
        order = torch.argsort(ids, stable=True)
        counts = counts_of(ids, self.num_experts + 1)[: self.num_experts].tolist()
        order = order[: sum(counts)]
        rows = torch.arange(num_tokens, device=x.device).repeat_interleave(k).index_select(0, order)
        y, sent = self._run_experts(x.index_select(0, rows), counts, experts, group, static=False)
        w = route.weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(1)
        out = x.new_zeros(x.shape).index_add(0, rows, y * w)
        return out, DispatchInfo(route.valid, sent, 0)

    def _group_max(self, value: int, group) -> int:
        """The EP group's largest capacity: sizes the exchanged slot buffer, so it must be known on
        the host (the one host sync of capacity mode at ep_size > 1; none at ep_size 1)."""
        if self.ep_size == 1:
            return value
        return all_reduce_max_int(value, group)

    def _run_experts(self, rows: torch.Tensor, counts: Sequence[int], experts, group, static: bool):
        """rows sorted by global expert, counts[e] rows each -> expert outputs in the same order."""
        if self.ep_size == 1:
            return experts(rows, counts), 0
        ep, local = self.ep_size, self.num_experts // self.ep_size
        recv_counts, sent = self._exchange_counts(counts, rows.device, group, static)  # [ep][local]
        send_splits = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
        recv_splits = [sum(c) for c in recv_counts]
        row_bytes = rows.shape[1] * rows.element_size()
        me = dist.get_rank(group)
        sent += 2 * row_bytes * (sum(send_splits) - send_splits[me])  # out and back
        recv = AllToAll.apply(rows, recv_splits, send_splits, group)
        grouped = _regroup(recv, recv_counts, by_source=False)
        out = experts(grouped, [sum(recv_counts[s][i] for s in range(ep)) for i in range(local)])
        back = _regroup(out, recv_counts, by_source=True)
        return AllToAll.apply(back, send_splits, recv_splits, group), sent

    def _exchange_counts(self, counts, device, group, static: bool):
        ep, local = self.ep_size, self.num_experts // self.ep_size
        if static:  # capacity: every source sends exactly C rows to every expert
            return [list(counts[:local]) for _ in range(ep)], 0
        send = torch.tensor(counts, dtype=torch.int64, device=device)
        recv = _all_to_all(send, None, None, group).view(ep, local)
        sent = (ep - 1) * local * send.element_size()
        return recv.tolist(), sent


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
