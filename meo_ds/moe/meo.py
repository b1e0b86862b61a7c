"""MEO: Merging Experts into One (He et al., EMNLP 2023).

Every linear layer of the FFN is a `MEOLinear`: E affine experts (W_i, b_i) and its own gate.
A group of tokens (a whole sequence, or a causal segment) shares one gate vector g, and instead
of running k experts per token, MEO merges first, W^ = sum_i g_i W_i, b^ = sum_i g_i b_i, and
runs one batched matmul per group. For one affine layer this equals the vanilla per-linear MoE
y = sum_i g_i (W_i x + b_i) exactly (`vanilla_moe_linear` is that reference).

The pure math (group layout, gate summaries, gate logits and top-k softmax, the merge) lives in
meo_ds/moe/functional.py, which the exported model ships as is; this file adds what training and
decoding need: the modules, noise and the balance loss, incremental-decoding state, the
recomputing autograd function, input checks and FLOP counts.

Choices (documented here once):
- Gate input: each linear's gate reads the masked mean of *that linear's own input* (fc1/w1/w3:
  the layer input x; fc2/w2: the hidden activation), as the paper computes each layer's gate from
  its input's summary. A group with no real token (an all-padding sequence) has summary 0.
- Causal mode (decoders): sequences are cut into segments of cfg.segment_len; the gate of segment
  s reads the mean of the real tokens of segments < s; when there are none (the first segment, or
  only padding before it) it reads a learned default vector. The sums over earlier segments are
  an exclusive prefix (a shifted cumsum), so segment s's gate reads no bit of a later token (not
  even at rounding level, as cumsum - sums would). With `state` (one dict per layer, kept by the
  caller) incremental decoding computes what the full forward computes.
- Packed documents (doc_ids, e.g. the LM's segment_ids under reset_at_doc_boundaries): segments
  restart at each document (a document's first token opens a new segment, its segment-th group
  holds its positions [s*T, (s+1)*T)) and a gate reads the earlier segments of its own document
  only, so a packed document is computed as it would be alone.
- Translation decoders (layers built with cross=True): every linear's gate adds a source term,
  logits = summary W_g^T + mean(memory) W_src^T, the masked mean of the encoder output (W_src
  [E, d_model], zero-initialised, one per linear). We chose a gate term over using the source mean
  as the first segment's default summary because fc2/w2's gate inputs are d_ff-wide, not
  d_model-wide, and because a target shorter than segment_len (most translations) otherwise
  routes on the learned default alone; the source term routes every segment, the first included,
  by its sentence. The memory is fixed during decoding, so the cached path computes the same.
- Experts start equal: each MEOLinear draws nn.Linear's default init and copies expert 0's to
  all E experts, as experts upcycled from a dense FFN start. W^ is then the same for
  any gate, so a MEO layer starts as one dense FFN, and the experts diverge as the noisy gates
  send different sequences to different experts. With independently drawn experts every
  sequence's W^ was a different random FFN, and at small scale MEO trailed top-k far: tiny
  preset, demo corpus, 300 steps, val ppl 497 (independent) vs 290 (equal; token level 276),
  top-k 279. Only with a noisy gate: without noise equal experts are a fixed point (every group
  takes the same experts, which get the same updates, and the gates no gradient), so then they
  are drawn independently.
- Gate (default = the paper's reference code): noisy top-k in training, logits + N(0, 1) * std
  with std = softplus(s W_noise) + cfg.meo_noise_floor (0.01), s the gate input; softmax over the
  k chosen logits. Gate and noise weights are zero-initialised (paper), so all clean logits tie
  at step 0 and the noise (std 0.70) breaks the tie per group. Options: noisy_gating=False (no
  noise: every group then takes the same k experts, torch.topk's unspecified tie order, until
  training moves a logit), meo_noise_floor=0 (Shazeer's std without the floor).
- Aux loss: per linear cv2(importance) + cv2(load) over the groups that hold a real token,
  importance = sum of gates per expert. load (meo_load="smooth", the paper's): the sum over groups
  of P(expert in the top k), Shazeer 2017's Normal-CDF estimate with the other experts' noise
  fixed (`prob_in_top_k`), differentiable so W_noise learns; without noise (eval, or k = E) it
  is the selection count. meo_load="count": always the count (no gradient, so W_noise gets only
  the gates' gradient). Summed over the layer's linears (meo_aux_reduce="sum", the paper's;
  "mean" averages), times cfg.aux_loss_coef (paper: 0.01).
- Stats (device tensors, no host sync): expert_load is token-weighted (each real token counts once
  for each of its group's k experts), averaged over the linears, so it sums to k * num_tokens like
  the top-k layers'.
- Merge, sparse or dense (`uses_sparse_merge`, chosen per call from shapes, no host sync): merging
  only each group's k selected experts (F.embedding_bag over their ids, in ascending expert
  order) reads N k expert slices for N groups, the dense [N, E] x [E, d_out*d_in] GEMM reads E.
  Where that GEMM runs at memory bandwidth (GPUs), sparse pays iff N k < E. On CPU a GEMM with
  K = E runs far below bandwidth: merge plus dW_e, E 16, 16 groups, d 256 x 1024, the sparse path
  took 0.37/0.53/0.75/2.34 of the dense time at k = 1/2/4/8 (N k = 1/2/4/8 E); so there the
  bound is N k < 5 E (functional.SPARSE_MERGE_SLICES_PER_EXPERT). k = E is always dense. The GPU
  bound is the bandwidth argument, not yet measured on a GPU. Exactness: both sum the same
  non-zero terms (a zero gate adds an exact 0); k = 1 is bit for bit on any backend, k >= 2
  differs by the rounding of a k-term sum (bit for bit only where the GEMM happens to accumulate
  in ascending expert order). The export applies the same rule to all its groups at once (it
  merges them in one piece), so an exported model decodes bit for bit as the library does. The
  sparse backward recomputes too, storing only the [N, k] ids beyond the dense path: dW_e sums
  the groups that selected e (embedding_bag over the (group, expert) pairs sorted by expert), and
  dg is the dense path's one GEMM of dots (gathering k expert slices per group measured slower).
  flops_per_token(executed=True) counts the merge the last forward ran (2 k or 2 E d_in d_out).
- k = 1: each gate is a softmax over one logit, the constant 1, whose backward passes exactly 0,
  so MEOLinear gives the merge detached gates and its backward skips the dots' GEMM; every
  gradient is unchanged (the gate still learns from the balance loss).
- Decoding (eval, no grad, a chunk inside one segment): a segment's gates read only the segments
  before it, so every step inside it merges the same W^; each linear keeps the merged weights of
  the segment being decoded in the layer's state (state["merged"]) and merges once per segment,
  not once per token (functional.decode_merged_forward, also the export's), bit for bit as
  merging again. Kept up to functional.DECODE_CACHE_BYTES per linear (128 MiB; merged weights
  that need more than one MERGED_CHUNK_BYTES chunk are merged every step); beam search reorders
  them with the rest of the state. In training mode the noise redraws the gates every step, so
  nothing is kept.
- Causal cost: merged weights exist per (sequence, segment), N = B * ceil(L / segment_len) groups
  of W^ [d_out, d_in]; the merge adds about E / segment_len of the token matmul's FLOPs and the
  matmuls are per-segment (M = segment_len), so prefer segment_len >= 64. With recompute_merged
  W^ is never stored for backward and is built at most MERGED_CHUNK_BYTES at a time.
- Dtypes: x must have the weights' dtype (or run under torch.autocast); output has x's dtype.
- ZeRO-3: a MEOLinear's forward runs its token block, gate summary, gate and merge, so every
  parameter is read inside its owner's forward, where ZeRO-3 gathers it (and again around its
  backward). When the layer gated from its own forward, the gate parameters were read outside
  theirs, and a ZeRO-3 checkpoint save before the first step left them partitioned in backward.
- Padding positions get a zero output.
- Registered as kind "meo" (registry.py; its fields, noisy gating by default, data-parallel
  experts); like every layer it answers flops_per_token (model: the paper's sparse merge;
  executed: the merge that ran), inactive_params and describe.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import registry
from .config import MoEConfig, MoEConfigError
from .functional import (
    GroupLayout, continued_gate_summary, decode_merged_forward, gate_dtype, gate_logits, gate_summary, merge_weights,
    merged_forward, source_summary, sparse_merge_pays, topk_softmax_gates,
)
from .routing import cv_squared
from .types import MoEOutput, RoutingStats

# Upper bound on one chunk of merged weights W^ materialised at a time by the recomputing path.
MERGED_CHUNK_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------------------------
# merged linear: the recomputing path around functional.merged_forward


def _chunks(num_groups: int, d_out: int, d_in: int, itemsize: int) -> list[slice]:
    per_chunk = max(1, MERGED_CHUNK_BYTES // max(1, d_out * d_in * itemsize))
    return [slice(s, min(s + per_chunk, num_groups)) for s in range(0, num_groups, per_chunk)]


class _RecomputedMergedLinear(torch.autograd.Function):
    """y_n = x_n W^_n^T + b^_n without storing W^: rebuilt chunk by chunk in backward.

    With dW^_n = dY_n^T X_n and db^_n = sum_t dY_nt:  dX_n = dY_n W^_n,
    dW_e = sum_n g_ne dW^_n,  db_e = sum_n g_ne db^_n,  dg_ne = <W_e, dW^_n> + <b_e, db^_n>.
    Dense (top_idx None): dW_e and db_e are GEMMs over all N groups. Sparse (top_idx [N, k]): they
    sum only the groups that selected e (`_sum_by_expert`, the sparse merge transposed). dg is one
    GEMM of dots in both, every entry (gathering each group's k expert slices reads more).
    """

    @staticmethod
    def forward(ctx, x, gates, weight, bias, top_idx):
        ctx.save_for_backward(x, gates, weight, bias, top_idx)
        chunks = _chunks(x.shape[0], weight.shape[1], weight.shape[2], weight.element_size())
        if len(chunks) == 1:
            return merged_forward(x, gates, weight, bias, top_idx)
        return torch.cat([merged_forward(x[c], gates[c], weight, bias, _rows(top_idx, c)) for c in chunks])

    @staticmethod
    def backward(ctx, dy):
        x, gates, weight, bias, top_idx = ctx.saved_tensors
        num_experts = weight.shape[0]
        w_flat = weight.reshape(num_experts, -1)
        need_x, need_g, need_w, need_b = ctx.needs_input_grad[:4]
        dx = torch.empty_like(x) if need_x else None
        dg = torch.zeros_like(gates) if need_g else None
        acc = gate_dtype(weight.dtype)  # accumulate expert grads over chunks in >= fp32
        dw = db = None

        def accumulate(total, part):
            return part.to(acc) if total is None else total.add_(part)

        for c in _chunks(x.shape[0], weight.shape[1], weight.shape[2], weight.element_size()):
            idx = _rows(top_idx, c)
            dy_c = dy[c]
            if need_x:
                dx[c] = torch.bmm(dy_c, merge_weights(gates[c], weight, idx))
            hats = []  # (dW^ or db^ [n, m], the experts' rows [E, m], their total grad, needed)
            if need_w or need_g:
                hats.append(("w", torch.bmm(dy_c.transpose(1, 2), x[c]).flatten(1), w_flat, need_w))
            if bias is not None and (need_b or need_g):
                hats.append(("b", dy_c.sum(dim=1), bias, need_b))
            for which, hat, rows, need in hats:
                if need:
                    if idx is None:
                        part = gates[c].to(weight.dtype).t() @ hat
                    else:
                        part = _sum_by_expert(hat, gates[c], idx, num_experts)
                    if which == "w":
                        dw = accumulate(dw, part)
                    else:
                        db = accumulate(db, part)
                if need_g:  # <row_e, hat_n> for every expert, sparse or not: one GEMM reads less than a gather
                    dg[c] += (hat @ rows.t()).to(dg.dtype)
        dw = dw.view_as(weight).to(weight.dtype) if dw is not None else None
        return dx, dg, dw, (db.to(bias.dtype) if db is not None else None), None


def _sum_by_expert(hat: torch.Tensor, gates: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """out_e = sum over the groups n that selected e of gates[n, e] * hat[n]: hat [N, m] -> [E, m].

    The sparse merge transposed: each expert's bag holds the groups that selected it (the [N, k]
    pairs sorted by expert, found with searchsorted: no host sync), summed by F.embedding_bag in
    ascending group order; an expert no group selected gets 0.
    """
    experts = top_idx.flatten()
    order = experts.argsort(stable=True)
    starts = torch.searchsorted(experts[order], torch.arange(num_experts, device=experts.device))
    weights = gates.gather(1, top_idx).flatten()[order].to(hat.dtype)
    return F.embedding_bag(order // top_idx.shape[1], hat, starts, per_sample_weights=weights, mode="sum")


def _rows(top_idx: Optional[torch.Tensor], c: slice) -> Optional[torch.Tensor]:
    return None if top_idx is None else top_idx[c]


def _check_merged_shapes(x, gates, weight, bias, top_idx) -> None:
    if weight.dim() != 3:
        raise ValueError(f"merged_linear: weight must be [experts, d_out, d_in], got {tuple(weight.shape)}")
    num_experts, d_out, d_in = weight.shape
    if x.dim() != 3 or x.shape[-1] != d_in:
        raise ValueError(f"merged_linear: x must be [groups, tokens, {d_in}], got {tuple(x.shape)}")
    if gates.shape != (x.shape[0], num_experts):
        raise ValueError(f"merged_linear: gates must be [{x.shape[0]}, {num_experts}], got {tuple(gates.shape)}")
    if bias is not None and bias.shape != (num_experts, d_out):
        raise ValueError(f"merged_linear: bias must be [{num_experts}, {d_out}], got {tuple(bias.shape)}")
    if top_idx is not None and (top_idx.dim() != 2 or top_idx.shape[0] != x.shape[0] or top_idx.dtype != torch.int64
                                or not 1 <= top_idx.shape[1] <= num_experts):
        raise ValueError(
            f"merged_linear: top_idx must be int64 [{x.shape[0]}, k] with 1 <= k <= {num_experts} (the selected "
            f"experts, e.g. topk_softmax_gates' ids), got {top_idx.dtype} {tuple(top_idx.shape)}"
        )


def merged_linear(
    x: torch.Tensor,
    gates: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    recompute: bool = True,
    top_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MEO affine layer for N groups: y_n = x_n (sum_e g_ne W_e)^T + sum_e g_ne b_e.

    x: [N, T, d_in]; gates: [N, E] (dense, zeros for unselected experts); weight: [E, d_out, d_in];
    bias: [E, d_out] or None. top_idx [N, k] (optional): each group's selected experts, which must
    hold all its non-zero gates; where `uses_sparse_merge` says so the merge and its backward read
    only those (the same sum, see the module docstring), otherwise every expert. recompute=True
    keeps W^ out of the autograd graph (rebuilt in backward, at most MERGED_CHUNK_BYTES of it at a
    time); False is plain autograd.
    """
    _check_merged_shapes(x, gates, weight, bias, top_idx)
    if top_idx is not None and not uses_sparse_merge(x.shape[0], weight, top_idx.shape[1]):
        top_idx = None
    if recompute:
        return _RecomputedMergedLinear.apply(x, gates, weight, bias, top_idx)
    return merged_forward(x, gates, weight, bias, top_idx)


def uses_sparse_merge(num_groups: int, weight: torch.Tensor, top_k: int) -> bool:
    """Whether merged_linear merges only the k selected experts of each of num_groups groups.

    The groups are merged chunk by chunk (MERGED_CHUNK_BYTES), so the rule (functional's
    sparse_merge_pays, see the Choices) counts the groups of one chunk.
    """
    per_chunk = _chunks(num_groups, weight.shape[1], weight.shape[2], weight.element_size())[0]
    return sparse_merge_pays(per_chunk.stop - per_chunk.start, weight.shape[0], top_k, weight.device.type)


def vanilla_moe_linear(
    x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Reference per-linear MoE: y_n = sum_{e: g_ne != 0} g_ne (x_n W_e^T + b_e), expert by expert."""
    y = x.new_zeros(x.shape[0], x.shape[1], weight.shape[1])
    for e in range(weight.shape[0]):
        rows = gates[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        out = x[rows] @ weight[e].t()
        if bias is not None:
            out = out + bias[e]
        y[rows] += gates[rows, e].to(x.dtype)[:, None, None] * out
    return y


# ----------------------------------------------------------------------------------------------
# FLOP counting


def meo_flops_per_sequence(d_in: int, d_out: int, seq_len: int, k: int) -> dict:
    """FLOPs of one d_in x d_out affine MoE layer on one sequence of seq_len tokens (ALGORITHMS.md).

    vanilla: every token runs k experts, 2 k L d_in d_out.
    meo:     merge k experts once (2 k d_in d_out), then one matmul, 2 L d_in d_out.
    """
    if min(d_in, d_out, seq_len, k) < 1:
        raise ValueError(f"d_in, d_out, seq_len and k must be >= 1, got {(d_in, d_out, seq_len, k)}")
    return {
        "vanilla": 2 * k * seq_len * d_in * d_out,
        "meo": 2 * seq_len * d_in * d_out + 2 * k * d_in * d_out,
    }


# ----------------------------------------------------------------------------------------------
# gate


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """P(expert e is among the k largest noisy logits) with the other experts' noise fixed [N, E].

    Shazeer et al. 2017: e is in the top k iff clean_e + std_e z beats the k-th largest noisy
    logit of the *other* experts: the (k+1)-th largest overall if e is in the top k now, else
    the k-th. So P = Phi((clean_e - that threshold) / std_e). Needs k < E.
    """
    top = noisy.topk(k + 1, dim=-1).values
    threshold = torch.where(noisy > top[:, k : k + 1], top[:, k : k + 1], top[:, k - 1 : k])
    return torch.special.ndtr((clean - threshold) / noise_std)


# ----------------------------------------------------------------------------------------------
# modules


def _equal_experts(draw: torch.Tensor) -> torch.Tensor:
    """[E, ...] -> every expert a copy of expert 0 (the whole draw is made, so the RNG stream that
    follows is the same as with independent experts)."""
    return draw[:1].expand_as(draw).clone()


class TokenBlock(nn.Module):
    """Token-level MEO's per-token residual block u + W_up relu(W_down u + b_down) + b_up.

    width = d_in // ratio (at least 1). As in the reference: W_down has nn.Linear's default
    init, b_down, W_up and b_up are zero, so the block starts as the identity and still learns.
    """

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.down = nn.Linear(d_in, width)
        self.up = nn.Linear(width, d_in)
        for p in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(p)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.up(F.relu(self.down(u)))


class MEOLinear(nn.Module):
    """E affine experts merged per group by their own noisy top-k gate (gate computed in fp32),
    optionally behind a TokenBlock (token-level MEO) whose output the gate and the experts read."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        top_k: int,
        bias: bool = True,
        noisy_gating: bool = False,
        recompute: bool = True,
        default_summary: bool = False,
        source_dim: int = 0,
        token_width: int = 0,
        noise_floor: float = 1e-2,
        smooth_load: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise MoEConfigError(f"MEOLinear: top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.d_in, self.d_out, self.num_experts, self.top_k = d_in, d_out, num_experts, top_k
        self.recompute, self.noise_floor, self.smooth_load = recompute, noise_floor, smooth_load
        # nn.Linear's default init per expert; with a noisy gate expert 0's copied to all (Choices).
        bound = 1.0 / math.sqrt(d_in)
        start = _equal_experts if noisy_gating else (lambda draw: draw)
        self.weight = nn.Parameter(start(torch.empty(num_experts, d_out, d_in).uniform_(-bound, bound)))
        self.bias = nn.Parameter(start(torch.empty(num_experts, d_out).uniform_(-bound, bound))) if bias else None
        self.gate_weight = nn.Parameter(torch.zeros(num_experts, d_in))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_in)) if noisy_gating else None
        # Learned gate input for a causal segment with no real token before it.
        self.default_summary = nn.Parameter(torch.zeros(d_in)) if default_summary else None
        # Decoder layers with cross-attention: a gate term from the source sentence's summary.
        self.source_gate = nn.Parameter(torch.zeros(num_experts, source_dim)) if source_dim else None
        self.token_block = TokenBlock(d_in, token_width) if token_width else None
        self.merged_experts: Optional[int] = None  # experts the last forward merged (k or E)

    def route(
        self, summary: torch.Tensor, source: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """summary [N, d_in] (and source [N, source_dim]) -> (dense fp32 gates [N, E], chosen ids
        [N, k], load [N, E]: each group's share of the balance loss's load, see the Choices).

        Noisy top-k (noise in training only), softmax over the k chosen logits. Computed in fp32
        (in fp64 for a fp64 layer).
        """
        clean = gate_logits(summary, self.gate_weight, source, self.source_gate)
        logits, noise_std = clean, None
        if self.noise_weight is not None and self.training:
            dtype = clean.dtype
            noise_std = F.softplus(summary.to(dtype) @ self.noise_weight.to(dtype).t()) + self.noise_floor
            logits = clean + torch.randn_like(clean) * noise_std
        gates, top_idx = topk_softmax_gates(logits, self.top_k)
        if noise_std is not None and self.smooth_load and self.top_k < self.num_experts:
            load = prob_in_top_k(clean, logits, noise_std, self.top_k)
        else:
            load = torch.zeros_like(logits).scatter(-1, top_idx, 1.0)
        return gates, top_idx, load

    def forward(
        self, x: torch.Tensor, groups: GroupLayout, source: Optional[torch.Tensor] = None,
        prior: Optional[dict] = None, incremental: bool = False, decode_cache: Optional[dict] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[dict]]:
        """Grouped input x [N, T, d_in] -> (y [N, T, d_out], gates [N, E], chosen ids [N, k], load
        [N, E], running sums): token block, gate summary, route and merge, all in this forward
        (see the Choices: ZeRO-3). `incremental` (causal decoding): the summary continues
        `prior`, the running sums this linear returned for the previous chunk (None before the
        first), and the new sums are returned (else None). `decode_cache` (decoding a chunk inside
        one segment, no grad): this linear's merged weights, kept between steps (see `merge`).
        """
        if self.token_block is not None:
            x = self.token_block(x)
        sums = None
        if incremental:
            summary, sums = continued_gate_summary(x, groups, self.default_summary, prior)
        else:
            summary = gate_summary(x, groups, self.default_summary)
        gates, top_idx, load = self.route(summary, source)
        # k = 1: each gate is a softmax over one logit, the constant 1, so the merge passes no
        # gradient to the gate; detached, its backward skips the gate's GEMM.
        merge_gates = gates.detach() if self.top_k == 1 else gates
        return self.merge(x, merge_gates, top_idx, decode_cache, groups.first_segment), gates, top_idx, load, sums

    def merge(self, x: torch.Tensor, gates: torch.Tensor, top_idx: Optional[torch.Tensor] = None,
              decode_cache: Optional[dict] = None, segment: int = 0) -> torch.Tensor:
        """x [N, T, d_in] with per-group gates [N, E] (and their selected experts top_idx [N, k]) -> [N, T, d_out].

        decode_cache: a dict kept per linear while decoding (no grad), with `segment` the absolute
        index of the one segment x lies in: W^ is merged at the segment's first step and reused
        by its later steps (functional.decode_merged_forward), bit for bit as merging again, where
        they fit one MERGED_CHUNK_BYTES chunk (else merged_linear merges every step).
        """
        sparse = top_idx is not None and uses_sparse_merge(x.shape[0], self.weight, top_idx.shape[1])
        self.merged_experts = top_idx.shape[1] if sparse else self.num_experts  # for flops_per_token
        device = x.device.type
        weight, bias = self.weight, self.bias
        autocast = torch.is_autocast_enabled(device)
        if autocast:  # run the matmuls in autocast's dtype (as nn.Linear would); grads reach fp32 params
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            if decode_cache is not None and len(_chunks(x.shape[0], *weight.shape[1:], weight.element_size())) == 1:
                _check_merged_shapes(x, gates, weight, bias, top_idx)
                return decode_merged_forward(x, gates, weight, bias, top_idx if sparse else None, decode_cache, segment)
            return merged_linear(x, gates, weight, bias, recompute=self.recompute, top_idx=top_idx)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, top_k={self.top_k}"


class MEOLayer(nn.Module):
    """MEO FFN: each of its linears is a MEOLinear with its own gate (see the module docstring).

    gelu:   y = fc2(gelu(fc1 x)), with biases (the paper's BERT FFN).
    swiglu: y = w2(silu(w1 x) * w3 x), without biases (like our top-k experts).
    meo_level="token" puts a TokenBlock (width d_in // token_bottleneck_ratio) in front of each
    linear, fc2/w2 included (their d_ff-wide input), as the reference does.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False, cross: bool = False):
        super().__init__()
        cfg.validate()
        if cross and not causal:
            raise MoEConfigError("MEOLayer: cross=True (gates read the source) is for causal decoder layers")
        if cfg.kind != "meo":
            raise MoEConfigError(f"MEOLayer needs MoEConfig.kind='meo', got kind={cfg.kind!r}")
        if d_model < 1 or d_ff < 1:
            raise MoEConfigError(f"MEOLayer: d_model={d_model} and d_ff={d_ff} must be >= 1")
        self.cfg, self.d_model, self.causal, self.cross = cfg, d_model, causal, cross
        self.hidden = cfg.expert_hidden or d_ff
        use_bias = cfg.activation == "gelu"

        def linear(d_in: int, d_out: int) -> MEOLinear:
            token_width = max(1, d_in // cfg.token_bottleneck_ratio) if cfg.meo_level == "token" else 0
            return MEOLinear(
                d_in, d_out, cfg.num_experts, cfg.top_k, bias=use_bias, noisy_gating=cfg.noisy(),
                noise_floor=cfg.meo_noise_floor, smooth_load=cfg.meo_load == "smooth",
                recompute=cfg.recompute_merged, default_summary=causal, source_dim=d_model if cross else 0,
                token_width=token_width,
            )

        if cfg.activation == "gelu":
            self.linears = nn.ModuleDict({"fc1": linear(d_model, self.hidden), "fc2": linear(self.hidden, d_model)})
        else:
            self.linears = nn.ModuleDict(
                {"w1": linear(d_model, self.hidden), "w3": linear(d_model, self.hidden), "w2": linear(self.hidden, d_model)}
            )

    # --- input checks -------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], state: Optional[dict],
               doc_ids: Optional[torch.Tensor], memory: Optional[torch.Tensor],
               memory_mask: Optional[torch.Tensor]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MEOLayer: x must be [batch, seq, {self.d_model}], got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"MEOLayer: x has an empty batch or sequence, shape {tuple(x.shape)}")
        param_dtype = self.linears[next(iter(self.linears))].weight.dtype
        if not x.is_floating_point() or (x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f"MEOLayer: x has dtype {x.dtype} but the layer's weights are {param_dtype}; "
                f"cast one to the other (e.g. layer.to(torch.bfloat16)) or run under torch.autocast"
            )
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or padding_mask.shape != x.shape[:2] or padding_mask.device != x.device:
                raise ValueError(
                    f"MEOLayer: padding_mask must be a bool tensor of shape {tuple(x.shape[:2])} "
                    f"on {x.device} (True = real token), got {padding_mask.dtype} {tuple(padding_mask.shape)} "
                    f"on {padding_mask.device}"
                )
        if state is not None and not self.causal:
            raise ValueError(
                "MEOLayer: incremental decoding (state) needs causal=True; the sequence-level gate "
                "reads the whole sequence, which a decoder does not have yet"
            )
        if doc_ids is not None:
            if not self.causal or state is not None:
                raise ValueError(
                    "MEOLayer: doc_ids (packed documents) apply to the causal full forward only; drop them "
                    "for a bidirectional layer or for incremental decoding (one document per row)"
                )
            if doc_ids.shape != x.shape[:2] or doc_ids.dtype.is_floating_point or doc_ids.device != x.device:
                raise ValueError(
                    f"MEOLayer: doc_ids must be an integer tensor of shape {tuple(x.shape[:2])} on {x.device}, "
                    f"got {doc_ids.dtype} {tuple(doc_ids.shape)} on {doc_ids.device}"
                )
        if self.cross:
            if memory is None or memory.dim() != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != self.d_model:
                raise ValueError(
                    f"MEOLayer: this decoder layer's gates read the source: pass memory (the encoder output, "
                    f"[{x.shape[0]}, source_len, {self.d_model}]), got "
                    f"{None if memory is None else tuple(memory.shape)}"
                )
            if memory_mask is not None and (memory_mask.shape != memory.shape[:2] or memory_mask.dtype != torch.bool):
                raise ValueError(
                    f"MEOLayer: memory_mask must be a bool tensor of shape {tuple(memory.shape[:2])} "
                    f"(True = real source token), got {memory_mask.dtype} {tuple(memory_mask.shape)}"
                )

    # --- gating -------------------------------------------------------------------------------

    @staticmethod
    def _prior(name: str, state: dict, batch: int) -> Optional[dict]:
        """The running sums the previous chunk left for linear `name` (None before the first chunk)."""
        prior = state.get("sums", {}).get(name)
        if prior is not None and prior["done_sum"].shape[0] != batch:
            raise ValueError(
                f"MEOLayer: state holds a batch of {prior['done_sum'].shape[0]} sequences but x has "
                f"{batch}; pass a fresh state dict for a new batch"
            )
        return prior

    # --- forward ------------------------------------------------------------------------------

    def _source_summary(self, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], groups: GroupLayout):
        """Masked mean of the encoder output per sentence, repeated for each of its groups [N, d]."""
        return source_summary(memory, memory_mask).repeat_interleave(groups.num_segments, dim=0)

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, state: Optional[dict] = None,
        doc_ids: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> MoEOutput:
        """x [B, L, d] -> MoEOutput. `state`: one dict per layer for incremental decoding (causal only).

        doc_ids [B, L] (causal, full forward): document ids of packed rows; segments and gate
        summaries restart at each document. memory [B, S, d] and memory_mask [B, S] (layers built
        with cross=True): the encoder output, whose masked mean every gate also reads.
        """
        self._check(x, padding_mask, state, doc_ids, memory, memory_mask)
        mask = padding_mask if padding_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        in_dtype = x.dtype
        start = int(state.get("pos", 0)) if state is not None else 0
        groups = GroupLayout(mask, self.causal, self.cfg.segment_len, start, doc_ids, all_real=padding_mask is None)
        source = self._source_summary(memory, memory_mask, groups) if self.cross else None
        u = groups.to_groups(x)
        gate_log = []
        # Decoding inside one segment: the merged weights are kept from the segment's first step
        # (the gates cannot change inside it; in training mode the noise would).
        decoding = state is not None and groups.num_segments == 1 and not self.training and not torch.is_grad_enabled()

        def run(name: str, inp: torch.Tensor) -> torch.Tensor:
            # Incremental decoding: each linear's gate summary continues from the state's sums.
            prior = self._prior(name, state, groups.batch) if state is not None else None
            cache = state.setdefault("merged", {}).setdefault(name, {}) if decoding else None
            out, gates, top_idx, load, sums = self.linears[name](inp, groups, source, prior, state is not None, cache)
            if state is not None:
                state.setdefault("sums", {})[name] = sums
            gate_log.append((gates, top_idx, load))
            return out

        if self.cfg.activation == "gelu":
            h = F.gelu(run("fc1", u))
            y = run("fc2", h)
        else:
            h = F.silu(run("w1", u)) * run("w3", u)
            y = run("w2", h)
        y = groups.zero_padding(y)
        if state is not None:
            state["pos"] = start + x.shape[1]
        aux, stats = self._aux_and_stats(gate_log, groups)
        return MoEOutput(groups.from_groups(y).to(in_dtype), aux, stats)

    def _aux_and_stats(self, gate_log: list, groups: GroupLayout) -> tuple[torch.Tensor, RoutingStats]:
        real = (groups.tokens > 0).unsqueeze(-1)  # [N, 1] groups holding a real token
        tokens = groups.tokens.unsqueeze(-1)
        losses, loads, group_loads = [], [], []
        for gates, top_idx, load_estimate in gate_log:
            selected = torch.zeros_like(gates).scatter(-1, top_idx, 1.0)
            load = (selected * real).sum(dim=0)
            losses.append(cv_squared((gates * real).sum(dim=0)) + cv_squared((load_estimate * real).sum(dim=0)))
            loads.append((selected * tokens).sum(dim=0))
            group_loads.append(load)
        balance = torch.stack(losses).sum() if self.cfg.meo_aux_reduce == "sum" else torch.stack(losses).mean()
        with torch.no_grad():
            num_tokens = groups.tokens.sum()
            k = self.cfg.top_k
            hist = torch.zeros(self.cfg.num_experts + 1, dtype=torch.int64, device=num_tokens.device)
            hist[k] = num_tokens
            stats = RoutingStats(
                expert_load=torch.stack(loads).mean(dim=0),
                num_tokens=num_tokens,
                dropped_fraction=balance.new_zeros(()),
                experts_per_token_mean=balance.new_full((), float(k)),
                experts_per_token_hist=hist,
                balance_loss=balance.detach(),
                z_loss=balance.new_zeros(()),
                a2a_bytes=0,
                extra={"group_load_per_linear": torch.stack(group_loads), "num_groups": real.sum()},
            )
        return self.cfg.aux_loss_coef * balance, stats

    # --- accounting ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: MoEConfig, d_model: int, d_ff: int, causal: bool = False, cross: bool = False) -> "MEOLayer":
        """Registry constructor (registry.KindSpec.build)."""
        return cls(cfg, d_model, d_ff, causal=causal, cross=cross)

    def flops_per_token(self, seq_len: int, executed: bool = False, experts_per_token: Optional[float] = None,
                        rows_per_token: Optional[float] = None) -> float:
        """Forward FLOPs per token of this layer on sequences of seq_len tokens (matmuls and gates).

        Each group (the sequence, or a causal segment) merges every linear once. executed=False
        counts the paper's sparse merge (2 k d_in d_out); executed=True counts the merge this code
        ran in the last forward (sparse, 2 k d_in d_out, or dense over all E, 2 E d_in d_out; see
        `uses_sparse_merge`; before any forward, the choice for a batch of one sequence). The
        measured experts_per_token and rows_per_token (the routed layers' arguments) change
        nothing: every token runs one merged matmul per linear whatever the gates chose.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        groups = -(-seq_len // self.cfg.segment_len) if self.causal else 1
        total = 0.0
        for lin in self.linears.values():
            merged = self.cfg.top_k
            if executed:  # what the last forward ran; before any, one sequence's groups
                merged = lin.merged_experts
                if merged is None:
                    sparse = uses_sparse_merge(groups, lin.weight, self.cfg.top_k)
                    merged = self.cfg.top_k if sparse else self.cfg.num_experts
            total += 2 * seq_len * lin.d_in * lin.d_out  # one merged matmul per token
            total += groups * (2 * merged * lin.d_in * lin.d_out + 2 * lin.d_in * lin.num_experts)  # merge + gate
            if lin.token_block is not None:
                total += seq_len * 4 * lin.d_in * lin.token_block.down.out_features
        return total / seq_len

    def inactive_params(self, experts_per_token: Optional[float] = None) -> float:
        """Expert parameters one token does not use: the E - k experts its group's merge leaves out
        (the paper's count; the dense merge reads them with gate 0). experts_per_token is unused."""
        per_expert = sum(lin.weight[0].numel() + (lin.bias[0].numel() if lin.bias is not None else 0)
                         for lin in self.linears.values())
        return (self.cfg.num_experts - self.cfg.top_k) * per_expert

    def describe(self) -> dict:
        """The settings the model card lists."""
        return registry.describe(self.cfg)


registry.register(registry.KindSpec(
    name="meo", layer=MEOLayer,
    fields=("top_k", "meo_level", "token_bottleneck_ratio", "segment_len", "recompute_merged", "meo_noise_floor",
            "meo_load", "meo_aux_reduce"),
    card_fields=("top_k", "meo_level", "segment_len", "token_bottleneck_ratio"),
    noisy_default=True, expert_parallel=False,
))
