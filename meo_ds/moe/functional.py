"""Routing and merging math of the MoE layers in plain torch (routers' combine weights, MEO's merge).

One definition serves two callers: meo_ds.moe's layers (routing.py, meo.py) and the exported
remote-code model, which ships this very file as `moe_functional.py` next to its
`modeling_meo.py` (meo_ds/export/remote.py copies it; a test checks the copy byte for byte). So
this file imports torch, math and typing only, never meo_ds or DeepSpeed; what needs the
training machinery (noise, jitter, auxiliary losses, capacity, all-to-all, the recomputing
autograd function) stays in the library.

Routers (fp32 whatever the model's dtype; probs = softmax(x W_r^T) of [T, E]):
- top-k (`topk_choices`): the k most probable experts; combine weights are their probabilities,
  renormalised to sum 1 when asked (Mixtral).
- XMoE threshold (`threshold_choices`): in descending probability, expert j is taken iff the sum
  of the probabilities before it is < threshold; at least one, at most max_k. Combine weights
  are the raw probabilities. The output keeps max_k slots per token (`valid` marks the taken
  ones), a shape known without reading the data.
  Both give per-token slots [T, K]; `dense_combine` scatters them to dense [T, E] weights.

MEO (He et al., EMNLP 2023; the choices are documented in meo_ds/moe/meo.py):
- Groups (`GroupLayout`): a sequence, or causal segments of segment_len positions; packed
  documents restart their segments at each document.
- Gate input (`gate_summary`): the masked mean of the linear's input over the group; in causal
  mode the mean of the real tokens of the *earlier* segments of the same document (an exclusive
  prefix sum, so segment s reads no bit of a later token), or a learned default when there are
  none. `source_summary`: the masked mean of the encoder output (translation decoders).
  Incremental decoding (`continued_gate_summary`): the same prefix, continued chunk by chunk from
  running sums (done segments, open segment) that the caller keeps between chunks.
- Gate (`gate_logits`, `topk_softmax_gates`): logits = summary W_g^T (+ source W_src^T), softmax
  over the k largest, dense [N, E] with zeros elsewhere. Computed in fp32 (fp64 for fp64 weights).
- Merge (`merge_weights`, `merged_forward`): W^_n = sum_e g_ne W_e, b^_n = sum_e g_ne b_e, then one
  batched matmul per group, y_n = x_n W^_n^T + b^_n. Dense (a GEMM over all E) unless the caller
  passes the selected experts' ids (`merge_rows`: then only those are read), which pays when the
  groups merged together select fewer slices than E, or a few times E on CPU
  (`sparse_merge_pays`): e.g. decoding, one group per sequence. Decoding keeps the merged
  weights of the segment being decoded between its steps (`decode_merged_forward`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# routers


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits x W_r^T: [T, d] x [E, d] -> [T, E]."""
    return x.float() @ weight.float().t()


def topk_choices(probs: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of probs [T, E] -> (expert ids [T, k], their probabilities [T, k], combine weights [T, k])."""
    scores, ids = torch.topk(probs, k, dim=-1)
    weights = scores / scores.sum(dim=-1, keepdim=True) if renormalize else scores
    return ids, scores, weights


def threshold_choices(
    probs: torch.Tensor, threshold: float, max_k: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XMoE routing of probs [T, E] -> (expert ids [T, K], valid [T, K] bool, combine weights [T, K]).

    K = max_k (E when None); slot j is the (j+1)-th most probable expert, taken iff the
    probabilities before it sum to < threshold (slot 0 always). Weights are 0 where not valid.
    """
    sorted_p, ids = torch.sort(probs, dim=-1, descending=True)
    if max_k is not None:
        sorted_p, ids = sorted_p[:, :max_k], ids[:, :max_k]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    valid = before < threshold
    valid[:, 0] = True
    return ids, valid, sorted_p * valid


def dense_combine(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-token slots (ids [T, K], weights [T, K]) -> dense combine weights [T, E], 0 elsewhere."""
    return weights.new_zeros(weights.shape[0], num_experts).scatter(-1, ids, weights)


# ----------------------------------------------------------------------------------------------
# MEO: gates


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """MEO's gates and summaries run in fp32 at least (fp64 for a fp64 layer)."""
    return torch.promote_types(dtype, torch.float32)


def gate_logits(
    summary: torch.Tensor, gate_weight: torch.Tensor,
    source: Optional[torch.Tensor] = None, source_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Clean gate logits summary W_g^T (+ source W_src^T): [N, d_in] x [E, d_in] -> [N, E] in gate_dtype."""
    dtype = gate_dtype(gate_weight.dtype)
    logits = summary.to(dtype) @ gate_weight.to(dtype).t()
    if source_gate is not None:
        if source is None:
            raise ValueError("MEO gate: this gate reads the source sentence; pass its summary (source=...)")
        logits = logits + source.to(dtype) @ source_gate.to(dtype).t()
    return logits


def topk_softmax_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (dense gates [N, E]: softmax over the k largest, 0 elsewhere; their ids [N, k])."""
    top_logits, top_idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_logits, dim=-1)), top_idx


# ----------------------------------------------------------------------------------------------
# MEO: merge


def merge_rows(gates: torch.Tensor, table: torch.Tensor, top_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_n = sum_e gates[n, e] * table[e] for table [E, m] -> [N, m].

    Dense (top_idx None): one [N, E] x [E, m] GEMM over all experts. Sparse (top_idx [N, k], the
    experts holding every non-zero gate): reads only those k rows per group and adds them in
    ascending expert order, one multiply-add each (F.embedding_bag with per-sample weights).
    Both sum the same non-zero terms (a zero gate adds an exact zero), so they agree within the
    rounding of a k-term sum, and bit for bit where the GEMM also accumulates in ascending expert
    order (k = 1 always; x86 CPU BLAS for some shapes only: on an AMD EPYC a [1-3, 16] x [16, m]
    GEMM rounds differently).
    """
    if top_idx is None:
        return gates.to(table.dtype) @ table
    ids = top_idx.sort(dim=-1).values
    weights = gates.gather(-1, ids).to(table.dtype)
    return F.embedding_bag(ids, table, per_sample_weights=weights, mode="sum")


# How many expert slices, per expert, the sparse merge may read before the dense merge is cheaper.
# Where the dense [N, E] x [E, m] GEMM runs at memory bandwidth (GPUs) it reads each slice once: 1.
# On CPU it runs far below it (a GEMM with K = E packs its operand and is partly compute-bound):
# there the sparse merge measured faster up to 4 slices per expert and slower at 8 (meo.py's Choices).
SPARSE_MERGE_SLICES_PER_EXPERT = {"cpu": 5}


def sparse_merge_pays(num_groups: int, num_experts: int, top_k: int, device_type: str) -> bool:
    """Whether merging num_groups groups together on device_type ("cuda", "cpu", ...) should read
    only their k selected experts each. The merge is memory-bound: the dense GEMM reads each of the
    E expert slices once, the sparse merge k slices per group; so sparse iff num_groups * k < E
    times the device's SPARSE_MERGE_SLICES_PER_EXPERT (k = E is always dense: the same terms)."""
    per_expert = SPARSE_MERGE_SLICES_PER_EXPERT.get(device_type, 1)
    return top_k < num_experts and num_groups * top_k < per_expert * num_experts


def merge_weights(gates: torch.Tensor, weight: torch.Tensor, top_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W^_n = sum_e gates[n, e] * weight[e]: [N, E] x [E, d_out, d_in] -> [N, d_out, d_in] (see merge_rows)."""
    num_experts, d_out, d_in = weight.shape
    return merge_rows(gates, weight.reshape(num_experts, -1), top_idx).view(-1, d_out, d_in)


def merge_weights_and_bias(gates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           top_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W^ [N, d_out, d_in], b^ [N, d_out] or None): merge_weights and merge_rows of the bias."""
    return merge_weights(gates, weight, top_idx), merge_rows(gates, bias, top_idx) if bias is not None else None


def apply_merged(x: torch.Tensor, w_hat: torch.Tensor, b_hat: Optional[torch.Tensor]) -> torch.Tensor:
    """y_n = x_n W^_n^T + b^_n: x [N, T, d_in], merged weights w_hat [N, d_out, d_in], b_hat [N, d_out] or None."""
    if b_hat is None:
        return torch.bmm(x, w_hat.transpose(1, 2))
    return torch.baddbmm(b_hat.unsqueeze(1), x, w_hat.transpose(1, 2))


def merged_forward(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], top_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_n = x_n W^_n^T + b^_n: x [N, T, d_in], gates [N, E], weight [E, d_out, d_in], bias [E, d_out].

    top_idx [N, k] (optional): the experts holding the non-zero gates; merging reads only those.
    The result equals the dense merge's within the rounding of a k-term sum (merge_rows).
    """
    return apply_merged(x, *merge_weights_and_bias(gates, weight, bias, top_idx))


# The most merged weights (bytes, per merged linear) that incremental decoding keeps between steps.
DECODE_CACHE_BYTES = 128 * 2**20


def decode_merged_forward(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          top_idx: Optional[torch.Tensor], cache: dict, segment: int) -> torch.Tensor:
    """merged_forward for an incremental decoding chunk inside one causal segment, bit for bit.

    A segment's gates read only the segments before it, so every step inside it merges the same
    weights: W^ and b^ are merged at the segment's first step and kept in `cache` (a dict the
    caller keeps per linear) for the later ones. Merged weights over DECODE_CACHE_BYTES are not
    kept (each step then merges again).
    """
    if cache.get("segment") == segment and cache["weight"].shape[0] == x.shape[0]:
        return apply_merged(x, cache["weight"], cache["bias"])
    w_hat, b_hat = merge_weights_and_bias(gates, weight, bias, top_idx)
    cache.clear()
    if w_hat.numel() * w_hat.element_size() <= DECODE_CACHE_BYTES:
        cache.update(segment=segment, weight=w_hat, bias=b_hat)
    return apply_merged(x, w_hat, b_hat)


# ----------------------------------------------------------------------------------------------
# MEO: groups and gate summaries


def exclusive_cumsum(values: torch.Tensor, dim: int) -> torch.Tensor:
    """out[s] = sum of values[:s] along dim (0 for s = 0). Element s reads values[:s] only, so it
    is bit for bit independent of values[s:] (unlike cumsum - values, which rounds with them)."""
    head = torch.zeros_like(values.narrow(dim, 0, 1))
    return torch.cat([head, values.narrow(dim, 0, values.shape[dim] - 1).cumsum(dim)], dim=dim)


class GroupLayout:
    """Tokens [B, L] laid out as N = B * G groups of T slots that share one gate (row-major).

    Sequence mode: G = 1, T = L. Causal mode: groups are segments of T = segment_len positions; the
    chunk starts at absolute position `start`, padded in front to a segment boundary and at the
    back to whole segments. With doc_ids (packed documents, full forward only) segments restart
    at every document: the token at position p of its document takes slot p % T of that
    document's (p // T)-th group, a row holds its documents' groups one after another, and G is
    the most groups of any row (one host sync). Unused slots are masked out.
    all_real=True promises that mask is all True (no padding mask was given): with no segment
    padding either, masking is then skipped.
    """

    def __init__(self, mask: torch.Tensor, causal: bool, segment_len: int, start: int = 0,
                 doc_ids: Optional[torch.Tensor] = None, all_real: bool = False):
        self.batch, self.length = mask.shape
        self.causal = causal
        self.front = self.back = 0
        self.index = None  # [B, L] slot of each token in the [B, G*T] layout (None: contiguous)
        self.doc_slot = None  # [B, G] place of each group in the per-document layout (None: one document)
        self.ends_on_boundary = False
        self.first_segment = 0
        if not causal:
            self.num_segments, self.group_len = 1, self.length
        elif doc_ids is None:
            self.front = start % segment_len
            self.first_segment = start // segment_len  # the absolute index of the chunk's first segment
            total = self.front + self.length
            self.num_segments = -(-total // segment_len)
            self.back = self.num_segments * segment_len - total
            self.group_len = segment_len
            # The last segment is complete: its sums move from "current" to "done" in the state.
            self.ends_on_boundary = (start + self.length) % segment_len == 0
        else:
            self._document_layout(doc_ids, segment_len)
        self.mask = self.to_groups(mask.unsqueeze(-1)).squeeze(-1)  # [N, T] bool
        self.tokens = self.mask.sum(dim=1)  # [N] real tokens per group
        # No padding slot (known without reading the mask: no padding mask and no segment padding):
        # the masks can be skipped. Otherwise they are applied, even where they keep everything.
        self.all_real = all_real and self.index is None and not (self.front or self.back)

    def _document_layout(self, doc_ids: torch.Tensor, segment_len: int) -> None:
        batch, length = doc_ids.shape
        pos = torch.arange(length, device=doc_ids.device).expand(batch, length)
        new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        in_doc = pos - torch.where(new_doc, pos, 0).cummax(dim=1).values  # position within the document
        group = (new_doc | (in_doc % segment_len == 0)).long().cumsum(1) - 1  # group within the row
        doc = new_doc.long().cumsum(1) - 1  # document within the row
        seg_in_doc = in_doc // segment_len
        sizes = torch.stack([group[:, -1].max(), doc[:, -1].max(), seg_in_doc.max()]) + 1
        self.num_segments, num_docs, self.segs_per_doc = (int(v) for v in sizes.tolist())
        self.num_docs, self.group_len = num_docs, segment_len
        self.index = group * segment_len + in_doc % segment_len
        # Groups no token fills (short rows) go to one spare slot after the documents' groups.
        spare = num_docs * self.segs_per_doc
        self.doc_slot = torch.full((batch, self.num_segments), spare, dtype=torch.long, device=doc_ids.device)
        self.doc_slot.scatter_(1, group, doc * self.segs_per_doc + seg_in_doc)

    def to_groups(self, u: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [N, T, d] (zeros in the unused slots)."""
        if self.index is not None:
            index = self.index.unsqueeze(-1).expand(-1, -1, u.shape[-1])
            u = u.new_zeros(self.batch, self.num_segments * self.group_len, u.shape[-1]).scatter(1, index, u)
        elif self.front or self.back:
            u = F.pad(u, (0, 0, self.front, self.back))
        return u.reshape(self.batch * self.num_segments, self.group_len, u.shape[-1])

    def from_groups(self, y: torch.Tensor) -> torch.Tensor:
        """[N, T, d] -> [B, L, d], the inverse of to_groups."""
        y = y.reshape(self.batch, self.num_segments * self.group_len, y.shape[-1])
        if self.index is not None:
            return y.gather(1, self.index.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return y[:, self.front : self.front + self.length]

    def zero_padding(self, u: torch.Tensor) -> torch.Tensor:
        """u [N, T, d] with 0 in every slot that holds no real token."""
        if self.all_real:
            return u
        return torch.where(self.mask.unsqueeze(-1), u, torch.zeros((), dtype=u.dtype, device=u.device))

    def sum_before(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, G, ...] per group -> the sum over the earlier groups of the same document.

        Exact: group s's result reads the values of groups before it only (see exclusive_cumsum).
        """
        if self.doc_slot is None:
            return exclusive_cumsum(values, dim=1)
        rest = values.shape[2:]
        slot = self.doc_slot.view(*self.doc_slot.shape, *([1] * len(rest))).expand_as(values)
        spare = self.num_docs * self.segs_per_doc
        per_doc = values.new_zeros(self.batch, spare + 1, *rest).scatter(1, slot, values)
        per_doc = per_doc[:, :spare].reshape(self.batch, self.num_docs, self.segs_per_doc, *rest)
        before = exclusive_cumsum(per_doc, dim=2).reshape(self.batch, spare, *rest)
        before = torch.cat([before, torch.zeros_like(before[:, :1])], dim=1)
        return before.gather(1, slot)


def group_sums(u: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped input u [N, T, d] -> (sum over each group's real tokens [N, d], their count [N]), in gate_dtype."""
    dtype = gate_dtype(u.dtype)
    return layout.zero_padding(u).to(dtype).sum(dim=1), layout.tokens.to(dtype)


def mean_summary(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums [..., d] / counts [...]; a group with no real token has summary 0."""
    return sums / counts.clamp_min(1.0).unsqueeze(-1)


def prefix_summary(before_sum: torch.Tensor, before_cnt: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Causal gate input: the mean of the earlier segments' real tokens, `default` [d] where there are none."""
    default = default.to(before_sum.dtype)
    return torch.where((before_cnt > 0).unsqueeze(-1), mean_summary(before_sum, before_cnt), default)


def gate_summary(u: torch.Tensor, layout: GroupLayout, default: Optional[torch.Tensor]) -> torch.Tensor:
    """Gate input per group [N, d] from a linear's grouped input u [N, T, d] (full forward, no state).

    Sequence mode: the mean of the group's real tokens. Causal mode: `prefix_summary` over the
    earlier segments of the same document (`default`, the learned vector, where there are none).
    """
    sums, counts = group_sums(u, layout)
    if not layout.causal:
        return mean_summary(sums, counts)
    batch, segs = layout.batch, layout.num_segments
    sums, counts = sums.view(batch, segs, -1), counts.view(batch, segs)
    summary = prefix_summary(layout.sum_before(sums), layout.sum_before(counts), default)
    return summary.reshape(batch * segs, -1)


def source_summary(memory: torch.Tensor, memory_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Masked mean of the encoder output per sentence: memory [B, S, d], mask [B, S] -> [B, d] in gate_dtype."""
    dtype = gate_dtype(memory.dtype)
    if memory_mask is None:
        count = torch.full((memory.shape[0],), float(memory.shape[1]), dtype=dtype, device=memory.device)
    else:
        memory = torch.where(memory_mask.unsqueeze(-1), memory, torch.zeros((), dtype=memory.dtype, device=memory.device))
        count = memory_mask.sum(dim=1).to(dtype)
    return mean_summary(memory.to(dtype).sum(dim=1), count)


def continued_gate_summary(u: torch.Tensor, layout: GroupLayout, default: torch.Tensor,
                           prior: Optional[dict]) -> tuple[torch.Tensor, dict]:
    """Causal gate input per group [N, d] for one chunk of sequences decoded incrementally, and the
    running sums to pass with the next chunk: `gate_summary` over the whole sequence so far.

    `layout`: the chunk's causal GroupLayout, built with start = the positions already decoded (one
    document per row). `prior`: what the previous chunk returned (None for the first): done_sum
    [B, d] / done_cnt [B] over the completed segments, cur_sum / cur_cnt over the open last one,
    which the chunk's first segment continues. The prompt (prior None) gets gate_summary's values
    bit for bit; later chunks add the same numbers in another order (equal up to fp32 rounding).
    """
    sums, counts = group_sums(u, layout)
    batch, segs = layout.batch, layout.num_segments
    sums, counts = sums.view(batch, segs, -1), counts.view(batch, segs)
    if prior is None:
        zeros = sums.new_zeros(batch, sums.shape[-1])
        prior = {"done_sum": zeros, "done_cnt": counts.new_zeros(batch), "cur_sum": zeros, "cur_cnt": counts.new_zeros(batch)}
    sums = torch.cat([sums[:, :1] + prior["cur_sum"].unsqueeze(1), sums[:, 1:]], dim=1)
    counts = torch.cat([counts[:, :1] + prior["cur_cnt"].unsqueeze(1), counts[:, 1:]], dim=1)
    before_sum = prior["done_sum"].unsqueeze(1) + layout.sum_before(sums)  # segments < s
    before_cnt = prior["done_cnt"].unsqueeze(1) + layout.sum_before(counts)
    done_sum, done_cnt = before_sum[:, -1].detach(), before_cnt[:, -1].detach()
    cur_sum, cur_cnt = sums[:, -1].detach(), counts[:, -1].detach()
    if layout.ends_on_boundary:  # the last segment is complete: it moves from "cur" to "done"
        done_sum, done_cnt = done_sum + cur_sum, done_cnt + cur_cnt
        cur_sum, cur_cnt = torch.zeros_like(cur_sum), torch.zeros_like(cur_cnt)
    summary = prefix_summary(before_sum, before_cnt, default).reshape(batch * segs, -1)
    return summary, {"done_sum": done_sum, "done_cnt": done_cnt, "cur_sum": cur_sum, "cur_cnt": cur_cnt}
