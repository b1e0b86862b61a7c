"""MEO: merged experts equal the per-linear vanilla MoE, causal segment gating, decoding, FLOPs."""

import pytest
import torch
import torch.nn.functional as F

import meo_ds.moe.meo as meo
from meo_ds.moe.config import MoEConfig, MoEConfigError
from meo_ds.moe.functional import topk_softmax_gates
from meo_ds.moe.meo import MEOLayer, MEOLinear, meo_flops_per_sequence, merged_linear, vanilla_moe_linear


def random_topk_gates(n: int, num_experts: int, k: int, dtype=torch.float64) -> torch.Tensor:
    logits = torch.randn(n, num_experts, dtype=dtype)
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def make_layer(activation="gelu", causal=False, segment_len=3, level="sequence", experts=4, k=2, d=6, hidden=10,
               recompute=True, noisy=False, dtype=torch.float64, seed=0) -> MEOLayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(kind="meo", num_experts=experts, top_k=k, activation=activation, meo_level=level,
                    segment_len=segment_len, recompute_merged=recompute, noisy_gating=noisy,
                    token_bottleneck_ratio=2)
    layer = MEOLayer(cfg, d, hidden, causal=causal).to(dtype)
    # Random gates (zero-initialised by default) so that routing depends on the input, and
    # distinct experts (they start equal by default) so that routing changes the output.
    for lin in layer.linears.values():
        torch.nn.init.normal_(lin.gate_weight, std=1.0)
        for p in (lin.weight, lin.bias):
            if p is not None:
                torch.nn.init.uniform_(p, -lin.d_in**-0.5, lin.d_in**-0.5)
        if lin.default_summary is not None:
            torch.nn.init.normal_(lin.default_summary)
    return layer.eval()


def randomise_token_blocks(layer: MEOLayer) -> None:
    """Token blocks start as the identity (zero up-projection): make them matter."""
    for lin in layer.linears.values():
        for p in lin.token_block.parameters():
            torch.nn.init.normal_(p, std=0.5)


# ---------------------------------------------------------------------------------------------
# merged linear == vanilla per-linear MoE


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_merged_linear_equals_vanilla_moe(with_bias, recompute):
    torch.manual_seed(1)
    n, t, d_in, d_out, experts, k = 5, 7, 6, 4, 8, 3
    x = torch.randn(n, t, d_in, dtype=torch.float64)
    w = torch.randn(experts, d_out, d_in, dtype=torch.float64)
    b = torch.randn(experts, d_out, dtype=torch.float64) if with_bias else None
    g = random_topk_gates(n, experts, k)
    y = merged_linear(x, g, w, b, recompute=recompute)
    ref = vanilla_moe_linear(x, g, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # Not trivially equal: a different gate gives a different output.
    assert not torch.allclose(merged_linear(x, random_topk_gates(n, experts, k), w, b), ref)


def test_recomputed_gradients_equal_plain_autograd(monkeypatch):
    torch.manual_seed(2)
    n, t, d_in, d_out, experts = 6, 5, 4, 3, 4

    def grads(recompute: bool):
        torch.manual_seed(3)
        x = torch.randn(n, t, d_in, dtype=torch.float64, requires_grad=True)
        g = random_topk_gates(n, experts, 2).requires_grad_()
        w = torch.randn(experts, d_out, d_in, dtype=torch.float64, requires_grad=True)
        b = torch.randn(experts, d_out, dtype=torch.float64, requires_grad=True)
        y = merged_linear(x, g, w, b, recompute=recompute)
        (y * torch.randn_like(y)).sum().backward()
        return [y.detach(), x.grad, g.grad, w.grad, b.grad]

    plain = grads(False)
    # Force several chunks of W^ so the chunked backward is exercised too.
    monkeypatch.setattr(meo, "MERGED_CHUNK_BYTES", 2 * d_out * d_in * 8)
    for got, want in zip(grads(True), plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_recomputed_merged_linear_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: merged_linear(*a, recompute=True), (x, g, w, b))
    assert torch.autograd.gradcheck(lambda *a: merged_linear(*a, recompute=True), (x, g, w, None))


def _saved_activation_numel(recompute: bool, n=8, t=2, d=16, experts=4) -> int:
    """Elements autograd keeps for backward of one merged linear, parameters not counted."""
    w = torch.randn(experts, d, d, requires_grad=True)
    b = torch.randn(experts, d, requires_grad=True)
    x = torch.randn(n, t, d, requires_grad=True)
    g = random_topk_gates(n, experts, 2, dtype=torch.float32).requires_grad_()
    return saved_numel(lambda: merged_linear(x, g, w, b, recompute=recompute), w, b)


def saved_numel(forward, *params: torch.Tensor) -> int:
    """Elements autograd saves for the backward of forward() (then run), `params` not counted."""
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in [p.data_ptr() for p in params]:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    out.sum().backward()
    return sum(saved)


def test_recompute_does_not_keep_merged_weights():
    n, d = 8, 16
    plain, recomputed = _saved_activation_numel(False), _saved_activation_numel(True)
    assert plain - recomputed >= n * d * d  # W^ ([N, d_out, d_in]) is kept only by the plain path
    assert recomputed <= n * 2 * d + n * 4  # x and the gates


# ---------------------------------------------------------------------------------------------
# full layer == naive per-token reference


def _vanilla_token(lin: MEOLinear, v: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """Vanilla per-linear MoE on one token v (already through the linear's token block)."""
    gates = lin.route(summary.unsqueeze(0))[0]
    out = torch.zeros(lin.d_out, dtype=v.dtype)
    for e in gates[0].nonzero().flatten().tolist():
        y = lin.weight[e] @ v + (lin.bias[e] if lin.bias is not None else 0)
        out = out + gates[0, e].to(v.dtype) * y
    return out


def _naive_ffn(layer: MEOLayer, v: torch.Tensor, summary_of) -> torch.Tensor:
    """One token through the FFN; summary_of(name, input vector) gives that linear's gate input."""
    lins = layer.linears

    def run(name, inp):
        if lins[name].token_block is not None:  # token-level MEO: the gate and experts read its output
            inp = inp + lins[name].token_block.up(F.relu(lins[name].token_block.down(inp)))
        return _vanilla_token(lins[name], inp, summary_of(name, inp))

    if layer.cfg.activation == "gelu":
        return run("fc2", F.gelu(run("fc1", v)))
    return run("w2", F.silu(run("w1", v)) * run("w3", v))


def naive_layer(layer: MEOLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    seg = layer.cfg.segment_len
    for b in range(x.shape[0]):
        real = [t for t in range(x.shape[1]) if mask[b, t]]
        if layer.causal:
            seen = {name: [] for name in layer.linears}  # (position, input) of real tokens so far

            for t in real:
                def summary_of(name, inp, t=t):
                    prev = [u for (p, u) in seen[name] if p < (t // seg) * seg]
                    seen[name].append((t, inp))
                    return torch.stack(prev).mean(0) if prev else layer.linears[name].default_summary
                out[b, t] = _naive_ffn(layer, x[b, t], summary_of)
        else:
            # Sequence-level: each linear's gate reads the mean of its input over the whole
            # sequence. Pass i computes the inputs of linear i exactly (earlier linears' means are
            # already right), so after one pass per linear all means are the true ones.
            means = {}
            for _ in layer.linears:
                inputs = {name: [] for name in layer.linears}
                for t in real:
                    def summary_of(name, inp):
                        inputs[name].append(inp)
                        return means.get(name, torch.zeros_like(inp))
                    _naive_ffn(layer, x[b, t], summary_of)
                means = {name: torch.stack(v).mean(0) for name, v in inputs.items()}
            for t in real:
                out[b, t] = _naive_ffn(layer, x[b, t], lambda name, inp: means[name])
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_equals_naive_per_token_reference(activation, causal):
    layer = make_layer(activation, causal=causal, level="token")
    randomise_token_blocks(layer)
    torch.manual_seed(5)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    mask[2, :2] = False  # left padding
    mask[2, 4] = False  # a hole
    with torch.no_grad():
        got = layer(x, mask).hidden
        want = naive_layer(layer, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_recompute_layer_matches_plain_layer(causal):
    def run(recompute):
        layer = make_layer("swiglu", causal=causal, recompute=recompute)
        x = torch.randn(2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
        out = layer(x)
        (out.hidden.square().sum() + out.aux_loss).backward()
        return [out.hidden.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# padding, causality, decoding


@pytest.mark.parametrize("causal", [False, True])
def test_padded_positions_change_nothing(causal):
    layer = make_layer("gelu", causal=causal)
    torch.manual_seed(7)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :3] = False
    out = layer(x, mask)
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn_like(x2[~mask])
    out2 = layer(x2, mask)
    torch.testing.assert_close(out.hidden, out2.hidden, rtol=0, atol=0)
    torch.testing.assert_close(out.aux_loss, out2.aux_loss)
    # Without the mask the same change does alter the real tokens' outputs.
    assert not torch.allclose(layer(x).hidden[mask], layer(x2).hidden[mask])


def test_all_padding_sequence_is_finite_and_excluded():
    layer = make_layer("gelu")
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = layer(x, mask)
    assert torch.isfinite(out.hidden).all() and torch.isfinite(out.aux_loss)
    assert (out.hidden[1] == 0).all()
    assert out.stats.num_tokens == 10 and out.stats.extra["num_groups"] == 2
    # The other sequences are unaffected by the empty one.
    torch.testing.assert_close(out.hidden[[0, 2]], layer(x[[0, 2]]).hidden)


def _input_jacobian_rows(layer, x):
    """grads[t] = d(sum of output at position t) / d input, for every t."""
    x = x.clone().requires_grad_()
    y = layer(x).hidden
    return [torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)[0] for t in range(x.shape[1])]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_causal_segment_gating_has_no_future_dependence(activation):
    layer = make_layer(activation, causal=True, segment_len=3, level="token")
    randomise_token_blocks(layer)
    x = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = _input_jacobian_rows(layer, x)
    for t, g in enumerate(grads):
        assert (g[:, t + 1 :] == 0).all(), f"output {t} depends on a later input"
        assert g[:, t].abs().sum() > 0
        if t >= 3:  # gates read earlier segments, so earlier inputs matter
            assert g[:, : (t // 3) * 3].abs().sum() > 0


def test_sequence_level_gating_does_depend_on_the_future():
    layer = make_layer("gelu", causal=False)
    x = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = _input_jacobian_rows(layer, x)
    assert grads[0][:, 1:].abs().sum() > 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_incremental_decoding_equals_full_forward(activation):
    layer = make_layer(activation, causal=True, segment_len=3, level="token")
    torch.manual_seed(9)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :2] = False  # left-padded prompt
    with torch.no_grad():
        full = layer(x, mask).hidden
        for chunks in ([(t, t + 1) for t in range(11)], [(0, 4), (4, 5), (5, 9), (9, 11)]):
            state = {}
            steps = [layer(x[:, a:b], mask[:, a:b], state=state).hidden for a, b in chunks]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
            assert state["pos"] == 11


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_decoding_merges_once_per_segment_bit_for_bit(activation, monkeypatch):
    """Eval, no grad: a chunk inside one segment reuses the merged weights of the segment's first
    step (its gates read only earlier segments), and decodes bit for bit as merging at every step."""
    from meo_ds.moe import functional
    layer = make_layer(activation, causal=True, segment_len=3, level="token", experts=8, dtype=torch.float32).eval()
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(10))
    merges = []
    real = functional.merge_weights
    monkeypatch.setattr(functional, "merge_weights", lambda *a: merges.append(1) or real(*a))

    def decode(grad: bool) -> torch.Tensor:
        state = {}
        with torch.set_grad_enabled(grad):  # with grad (training's path) nothing is kept
            steps = [layer(x[:, :4], state=state).hidden] + [layer(x[:, t:t + 1], state=state).hidden
                                                             for t in range(4, 10)]
        return torch.cat(steps, dim=1).detach()

    kept = decode(False)
    linears = len(layer.linears)
    # The prompt (positions 0-3) merges once per linear, then positions 4 (segment 1), 6 and 9 do.
    assert len(merges) == linears * (1 + 3)
    merges.clear()
    assert torch.equal(kept, decode(True)) and len(merges) == linears * (1 + 6)
    assert kept.abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_meo_flat_in_k_vanilla_linear_in_k():
    d_in, d_out, seq = 768, 3072, 256
    counts = {k: meo_flops_per_sequence(d_in, d_out, seq, k) for k in (1, 2, 4, 8)}
    for k, c in counts.items():
        assert c["vanilla"] == k * counts[1]["vanilla"]
        assert c["meo"] <= counts[1]["meo"] * (1 + 2 * k / seq)  # merge adds 2k d_in d_out only
    assert counts[8]["vanilla"] / counts[8]["meo"] > 7.5


def test_layer_flops_per_token_matches_formula():
    cfg = MoEConfig(kind="meo", num_experts=16, top_k=4, activation="gelu", segment_len=64)
    seq = MEOLayer(cfg, 32, 64)
    per_linear = [meo_flops_per_sequence(32, 64, 128, 4)["meo"], meo_flops_per_sequence(64, 32, 128, 4)["meo"]]
    gate = 2 * (32 + 64) * 16
    assert seq.flops_per_token(128) == pytest.approx((sum(per_linear) + gate) / 128)
    causal = MEOLayer(cfg, 32, 64, causal=True)  # two segments: two merges per linear
    merge = 2 * 4 * 32 * 64 * 2
    assert causal.flops_per_token(128) == pytest.approx(seq.flops_per_token(128) + (merge + gate) / 128)
    # Executed: the merge the last forward ran. Before any forward, one sequence (1 group x k=4 < 16
    # experts) merges sparsely, as the model count does; a batch of 32 sequences merges densely
    # (32 x k=4 = 8 slices per expert, over CPU's SPARSE_MERGE_SLICES_PER_EXPERT).
    assert seq.flops_per_token(128, executed=True) == pytest.approx(seq.flops_per_token(128))
    seq(torch.randn(32, 128, 32))
    dense_extra = 2 * (16 - 4) * 32 * 64 * 2 / 128  # two linears of 32 x 64
    assert seq.flops_per_token(128, executed=True) - seq.flops_per_token(128) == pytest.approx(dense_extra)
    seq(torch.randn(2, 128, 32))
    assert seq.flops_per_token(128, executed=True) == pytest.approx(seq.flops_per_token(128))


def test_bert_base_flops_against_the_paper():
    """The paper: BERT-base, MoE in every FFN, 16 experts, k=4, L=128: 72.0 (vanilla) vs 28.6 GFLOPs (MEO)."""
    layers, d, d_ff, length, k, vocab = 12, 768, 3072, 128, 4, 30522
    attention = layers * (4 * 2 * length * d * d + 2 * 2 * length * length * d)
    mlm_head = 2 * length * d * d + 2 * length * d * vocab

    def total(kind):
        ffn = sum(meo_flops_per_sequence(a, b, length, k)[kind] for a, b in ((d, d_ff), (d_ff, d)))
        return (layers * ffn + attention + mlm_head) / 1e9

    vanilla, merged = total("vanilla"), total("meo")
    print(f"BERT-base GFLOPs: vanilla {vanilla:.2f} (paper 72.0), MEO {merged:.2f} (paper 28.6)")
    assert vanilla == pytest.approx(72.0, rel=0.005)
    assert merged == pytest.approx(28.6, rel=0.015)
    assert vanilla - merged == pytest.approx(72.0 - 28.6, rel=0.01)


# ---------------------------------------------------------------------------------------------
# training, token block, aux loss, stats


@pytest.mark.parametrize("noisy", [False, True])
def test_a_few_optimizer_steps_reduce_the_loss(noisy):
    torch.manual_seed(10)
    cfg = MoEConfig(kind="meo", num_experts=4, top_k=2, activation="gelu", noisy_gating=noisy)
    layer = MEOLayer(cfg, 8, 16).train()  # default (zero) gate init
    target = torch.nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(16, 12, 8)
    y = torch.tanh(target(x)) * x.mean(dim=1, keepdim=True)  # sequence-dependent target
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = layer(x)
        loss = F.mse_loss(out.hidden, y)
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(lin.gate_weight.abs().sum() > 0 for lin in layer.linears.values())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_start_equal_so_meo_starts_as_one_dense_ffn(activation):
    """At initialisation every expert of a linear is the same draw, so W^ is that draw for any
    gate: the layer is one dense FFN (independent experts made each sequence a different random FFN)."""
    torch.manual_seed(0)
    cfg = MoEConfig(kind="meo", num_experts=4, top_k=2, activation=activation)
    layer = MEOLayer(cfg, 8, 16, causal=True).double().train()  # noisy gates: random experts per group
    for lin in layer.linears.values():
        assert torch.equal(lin.weight, lin.weight[:1].expand_as(lin.weight)), "experts must start equal"
        assert lin.weight[0].abs().max() <= lin.d_in**-0.5  # nn.Linear's default bound
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    w = {name: lin.weight[0] for name, lin in layer.linears.items()}
    if activation == "gelu":
        b = {name: layer.linears[name].bias[0] for name in w}
        want = F.linear(F.gelu(F.linear(x, w["fc1"], b["fc1"])), w["fc2"], b["fc2"])
    else:
        want = F.linear(F.silu(F.linear(x, w["w1"])) * F.linear(x, w["w3"]), w["w2"])
    torch.testing.assert_close(layer(x).hidden, want)


def test_noise_breaks_the_zero_init_tie():
    torch.manual_seed(11)
    cfg = MoEConfig(kind="meo", num_experts=8, top_k=2, noisy_gating=True)
    layer = MEOLayer(cfg, 8, 16).train()
    out = layer(torch.randn(32, 4, 8))
    assert (out.stats.extra["group_load_per_linear"] > 0).sum(dim=1).min() > 2


def test_token_block_in_front_of_every_linear_starts_as_identity():
    """The reference's layout: a block of width d_in / ratio before each merged linear, fc2/w2's
    d_ff-wide input included; W_up, b_up and b_down zero, W_down nn.Linear's default."""
    seq_layer = make_layer("swiglu", level="sequence", dtype=torch.float32, d=8, hidden=12)
    tok_layer = make_layer("swiglu", level="token", dtype=torch.float32, d=8, hidden=12)
    widths = {name: lin.token_block.down.out_features for name, lin in tok_layer.linears.items()}
    assert widths == {"w1": 4, "w3": 4, "w2": 6}  # d_in // ratio, ratio 2
    for lin in tok_layer.linears.values():
        block = lin.token_block
        assert block.down.weight.abs().sum() > 0
        assert all((p == 0).all() for p in (block.down.bias, block.up.weight, block.up.bias))
    tok_layer.load_state_dict(seq_layer.state_dict(), strict=False)
    x = torch.randn(2, 5, 8)
    out = tok_layer(x)
    torch.testing.assert_close(out.hidden, seq_layer(x).hidden, rtol=0, atol=0)
    out.hidden.square().sum().backward()
    for lin in tok_layer.linears.values():  # every block can learn away from identity
        assert lin.token_block.up.weight.grad.abs().sum() > 0


def test_aux_loss_and_stats(monkeypatch):
    layer = make_layer("gelu", experts=4, k=2)
    routed = []
    for lin in layer.linears.values():
        route = lin.route
        monkeypatch.setattr(lin, "route", lambda s, src=None, route=route: routed.append(route(s, src)) or routed[-1])
    x = torch.randn(5, 6, 6, dtype=torch.float64)
    out = layer(x)

    def cv2(v):
        return v.var() / v.mean() ** 2

    by_hand = []
    for gates, idx, _ in routed:
        load = torch.zeros_like(gates).scatter(-1, idx, 1.0).sum(0)
        by_hand.append(cv2(gates.sum(0)) + cv2(load))
    # Summed over the layer's two linears (the paper's), times the coefficient.
    expected = layer.cfg.aux_loss_coef * (by_hand[0] + by_hand[1])
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.stats.balance_loss == pytest.approx(expected.item() / layer.cfg.aux_loss_coef, rel=1e-5)
    loads = out.stats.extra["group_load_per_linear"]
    assert loads.shape == (2, 4) and (loads.sum(dim=1) == 5 * 2).all()
    assert out.stats.expert_load.sum().item() == pytest.approx(2 * 30)  # k * tokens
    assert out.stats.num_tokens == 30 and out.stats.experts_per_token_mean == 2.0
    assert out.stats.experts_per_token_hist[2] == 30 and out.stats.a2a_bytes == 0
    out.aux_loss.backward()
    assert layer.linears["fc1"].gate_weight.grad.abs().sum() > 0  # the importance term is differentiable


def test_bf16_output_dtype_and_finite():
    layer = make_layer("swiglu", causal=True, dtype=torch.bfloat16)
    out = layer(torch.randn(2, 7, 6, dtype=torch.bfloat16))
    assert out.hidden.dtype == torch.bfloat16 and torch.isfinite(out.hidden.float()).all()
    assert out.aux_loss.dtype == torch.float32


def test_autocast_bf16_on_fp32_layer():
    layer = make_layer("gelu", causal=True, dtype=torch.float32)
    x = torch.randn(2, 7, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.hidden.dtype == torch.float32
    torch.testing.assert_close(out.hidden, layer(x).hidden, rtol=0.1, atol=0.05)
    out.hidden.sum().backward()
    assert layer.linears["fc1"].weight.grad.dtype == torch.float32
    assert layer.linears["fc1"].weight.grad.abs().sum() > 0


def test_experts_are_plain_data_parallel_parameters():
    layer = make_layer("gelu")
    for p in layer.parameters():
        assert getattr(p, "allreduce", True) and not hasattr(p, "group_name")
    from meo_ds.parallel import ParallelizeError, parallelize

    with pytest.raises(ParallelizeError, match="ep_size"):
        parallelize(MEOLayer(MoEConfig(kind="meo", num_experts=4), 6, 10), 2)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors():
    layer = make_layer("gelu", dtype=torch.float32)
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 6\]"):
        layer(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 6\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="empty"):
        layer(torch.randn(2, 0, 6))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="causal=True"):
        layer(x, state={})
    with pytest.raises(MoEConfigError, match="kind='meo'"):
        MEOLayer(MoEConfig(kind="topk"), 6, 10)
    with pytest.raises(MoEConfigError, match="top_k"):
        MEOLayer(MoEConfig(kind="meo", num_experts=2, top_k=3), 6, 10)
    causal = make_layer("gelu", causal=True, dtype=torch.float32)
    state = {}
    causal(x, state=state)
    with pytest.raises(ValueError, match="fresh state"):
        causal(torch.randn(3, 1, 6), state=state)
    with pytest.raises(ValueError, match="seq_len"):
        layer.flops_per_token(0)
    with pytest.raises(ValueError, match=">= 1"):
        meo_flops_per_sequence(8, 8, 0, 2)
    w = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"x must be \[groups, tokens, 5\]"):
        merged_linear(torch.randn(2, 3, 4), torch.rand(2, 4), w)
    with pytest.raises(ValueError, match=r"gates must be \[2, 4\]"):
        merged_linear(torch.randn(2, 3, 5), torch.rand(2, 3), w)
    with pytest.raises(ValueError, match=r"bias must be \[4, 3\]"):
        merged_linear(torch.randn(2, 3, 5), torch.rand(2, 4), w, torch.randn(3))


# ---------------------------------------------------------------------------------------------
# causal MEO: exact prefix, packed documents, decoders routed by the source


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_later_tokens_of_a_segment_leave_earlier_outputs_bit_identical(activation):
    """Outputs up to position t read no bit of a later token, not even at rounding level: the gate
    of segment s sums segments < s by an exclusive prefix (cumsum - sums rounded with segment s)."""
    layer = make_layer(activation, causal=True, segment_len=4)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 16, 6, dtype=torch.float64, generator=g) * torch.logspace(-3, 3, 16, dtype=torch.float64)[:, None]
    with torch.no_grad():
        base = layer(x).hidden
        for t in range(1, 16):
            y = x.clone()
            y[:, t:] = torch.randn(4, 16 - t, 6, dtype=torch.float64, generator=g) * 1e3
            assert torch.equal(layer(y).hidden[:, :t], base[:, :t]), f"outputs before {t} moved"


def _packed_rows():
    """Two rows of packed documents (lengths 5+7 and 3+4+5) and each document alone."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 12, 6, dtype=torch.float64, generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    spans = [(0, 0, 5), (0, 5, 12), (1, 0, 3), (1, 3, 7), (1, 7, 12)]
    return x, docs, spans


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_packed_documents_are_routed_as_if_alone(activation):
    layer = make_layer(activation, causal=True, segment_len=3)
    x, docs, spans = _packed_rows()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 11] = False  # a padded tail
    with torch.no_grad():
        packed = layer(x, mask, doc_ids=docs).hidden
        for row, a, b in spans:
            alone = layer(x[row : row + 1, a:b], mask[row : row + 1, a:b]).hidden[0]
            torch.testing.assert_close(packed[row, a:b], alone, rtol=1e-13, atol=1e-13)
        # Without doc_ids the later documents' gates read the earlier documents.
        unaware = layer(x, mask).hidden
    assert not torch.allclose(unaware[0, 5:], packed[0, 5:])


def test_packed_documents_gradients_and_bad_doc_ids():
    layer = make_layer("swiglu", causal=True, segment_len=3)
    x, docs, _ = _packed_rows()
    x = x.requires_grad_()
    layer(x, doc_ids=docs).hidden[0, 5:].sum().backward()
    assert (x.grad[0, :5] == 0).all() and x.grad[0, 5:].abs().sum() > 0  # doc 2 reads nothing of doc 1
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        layer(x.detach(), doc_ids=docs[:, :5])
    with pytest.raises(ValueError, match="incremental decoding"):
        layer(x.detach(), doc_ids=docs, state={})


def make_cross_layer(activation="swiglu", segment_len=4, dtype=torch.float64, level="sequence") -> MEOLayer:
    layer = make_layer(activation, causal=True, segment_len=segment_len, dtype=dtype, level=level)
    cross = MEOLayer(layer.cfg, 6, 10, causal=True, cross=True).to(dtype)
    cross.load_state_dict(layer.state_dict(), strict=False)
    if level == "token":
        randomise_token_blocks(cross)
    for lin in cross.linears.values():
        torch.nn.init.normal_(lin.source_gate, std=1.0, generator=torch.Generator().manual_seed(23))
    return cross.eval()


def test_decoder_gates_read_the_source_even_for_short_targets():
    layer = make_cross_layer(segment_len=8)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=g)  # shorter than one segment
    memory = torch.randn(3, 7, 6, dtype=torch.float64, generator=g)
    memory_mask = torch.arange(7) < torch.tensor([[7], [4], [2]])
    with torch.no_grad():
        out = layer(x, memory=memory, memory_mask=memory_mask).hidden
        other = layer(x, memory=memory.flip(0), memory_mask=memory_mask.flip(0)).hidden
        padded = memory.clone()
        padded[~memory_mask] = 50.0
        same = layer(x, memory=padded, memory_mask=memory_mask).hidden
    assert not torch.allclose(out, other)  # another source sentence routes the target differently
    torch.testing.assert_close(same, out, rtol=0, atol=0)  # padded source positions are ignored
    with pytest.raises(ValueError, match="gates read the source"):
        layer(x)


def test_source_routed_incremental_decoding_equals_full_forward():
    layer = make_cross_layer(segment_len=3)
    g = torch.Generator().manual_seed(25)
    x = torch.randn(2, 8, 6, dtype=torch.float64, generator=g)
    memory = torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    memory_mask = torch.arange(5) < torch.tensor([[5], [3]])
    with torch.no_grad():
        full = layer(x, memory=memory, memory_mask=memory_mask).hidden
        state = {}
        steps = [layer(x[:, t : t + 1], state=state, memory=memory, memory_mask=memory_mask).hidden for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_remote_decoder_layer_matches_bit_for_bit(level):
    """The exported layer (token blocks before every linear, source-read gates) is ours in fp32."""
    from meo_ds.export.hf_remote import modeling_meo as remote
    from meo_ds.export.hf_remote.configuration_meo import MeoConfig

    ours = make_cross_layer(dtype=torch.float32, level=level)
    hf_cfg = MeoConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2, moe=dict(vars(ours.cfg)))
    theirs = remote.MEO(hf_cfg, hf_cfg.moe, causal=True, cross=True)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "noise_weight" not in k}, strict=True)
    g = torch.Generator().manual_seed(26)
    x, memory = torch.randn(2, 9, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask, memory_mask = torch.ones(2, 9, dtype=torch.bool), torch.arange(5) < torch.tensor([[5], [2]])
    with torch.no_grad():
        assert torch.equal(theirs(x, mask, memory, memory_mask), ours(x, mask, memory=memory, memory_mask=memory_mask).hidden)


# ---------------------------------------------------------------------------------------------
# the paper's gate: noisy top-k with a floor, smooth load, loss summed over the linears


def test_default_meo_gate_is_the_papers():
    cfg = MoEConfig(kind="meo")
    assert cfg.noisy() and cfg.meo_noise_floor == 0.01 and cfg.meo_load == "smooth" and cfg.meo_aux_reduce == "sum"
    assert not MoEConfig(kind="topk").noisy() and not MoEConfig(kind="xmoe").noisy()
    layer = MEOLayer(cfg, 8, 16)
    assert all(lin.noise_weight is not None for lin in layer.linears.values())
    with pytest.raises(MoEConfigError, match="meo_load"):
        MoEConfig(kind="meo", meo_load="hard").validate()


def test_prob_in_top_k_is_the_chance_of_beating_the_kth_other_expert():
    g = torch.Generator().manual_seed(30)
    clean = torch.randn(7, 5, dtype=torch.float64, generator=g)
    std = torch.rand(7, 5, dtype=torch.float64, generator=g) + 0.1
    noisy = clean + std * torch.randn(7, 5, dtype=torch.float64, generator=g)
    got = meo.prob_in_top_k(clean, noisy, std, 2)
    normal = torch.distributions.Normal(0.0, 1.0)
    for n in range(7):
        for e in range(5):
            others = torch.cat([noisy[n, :e], noisy[n, e + 1 :]])
            threshold = others.topk(2).values[-1]  # e enters the top 2 iff it beats this
            want = normal.cdf((clean[n, e] - threshold) / std[n, e])
            assert got[n, e].item() == pytest.approx(want.item(), rel=1e-12)


def test_smooth_load_trains_the_noise_weights_and_count_does_not():
    def load_term(**kw):
        torch.manual_seed(31)
        lin = MEOLayer(MoEConfig(kind="meo", num_experts=8, top_k=2, **kw), 8, 16).train().linears["w1"]
        load = lin.route(torch.randn(16, 8))[2]
        return lin, load

    lin, load = load_term()
    meo.cv_squared(load.sum(dim=0)).backward()  # the load term of the balance loss alone
    assert lin.noise_weight.grad.abs().sum() > 0 and lin.gate_weight.grad.abs().sum() > 0
    _, count = load_term(meo_load="count")
    assert not count.requires_grad and set(count.unique().tolist()) == {0.0, 1.0}


def test_aux_loss_sum_and_mean_options():
    x = torch.randn(5, 6, 6, dtype=torch.float64)
    summed = make_layer("swiglu", experts=4, k=2)(x).aux_loss
    layer = make_layer("swiglu", experts=4, k=2)
    layer.cfg.meo_aux_reduce = "mean"
    assert layer(x).aux_loss.item() == pytest.approx(summed.item() / 3, rel=1e-6)  # three linears (fp32 CV^2)


# ---------------------------------------------------------------------------------------------
# sparse merge (only the selected experts) == dense merge == vanilla MoE


def _routed_gates(n: int, experts: int, k: int, seed: int, dtype=torch.float64):
    """Leaf logits and the dense top-k softmax gates built from them (as MEOLinear.route does)."""
    logits = torch.randn(n, experts, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    top, idx = logits.topk(k, dim=-1)
    return logits, torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1)), idx


def _merged_grads(path: str, with_bias: bool, recompute: bool, n=3, t=5, d_in=6, d_out=4, experts=8, k=2):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, t, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(experts, d_out, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(experts, d_out, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    logits, gates, idx = _routed_gates(n, experts, k, seed=12)
    if path == "vanilla":
        y = vanilla_moe_linear(x, gates, w, b)
    else:
        y = merged_linear(x, gates, w, b, recompute=recompute, top_idx=idx if path == "sparse" else None)
    (y * torch.randn(y.shape, dtype=y.dtype, generator=gen)).sum().backward()
    return [y.detach(), x.grad, w.grad, logits.grad] + ([b.grad] if with_bias else [])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_sparse_merge_equals_dense_merge_and_vanilla_moe(with_bias, recompute, chunked, monkeypatch):
    assert meo.uses_sparse_merge(3, torch.empty(8, 4, 6), 2)  # 3 groups x k=2 < 8 experts
    if chunked:  # two groups of W^ per chunk: the chunked forward and backward
        monkeypatch.setattr(meo, "MERGED_CHUNK_BYTES", 2 * 4 * 6 * 8)
    sparse = _merged_grads("sparse", with_bias, recompute)
    for reference in ("dense", "vanilla"):
        for got, want in zip(sparse, _merged_grads(reference, with_bias, recompute)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(g.abs().max() > 0 for g in sparse)


def test_sparse_merge_of_one_expert_is_bitwise_the_dense_merge():
    """k = 1: each group's merge is one product g * W_e, exact whatever the summation order (fp32)."""
    gen = torch.Generator().manual_seed(13)
    x, w = torch.randn(4, 5, 16, generator=gen), torch.randn(16, 8, 16, generator=gen)
    b = torch.randn(16, 8, generator=gen)
    _, gates, idx = _routed_gates(4, 16, 1, seed=14, dtype=torch.float32)
    gates = gates.detach() * 0.7  # not 1.0: the product must round
    assert torch.equal(merged_linear(x, gates, w, b, top_idx=idx), merged_linear(x, gates, w, b))


def test_sparse_merge_rule():
    """Sparse iff groups x k < E x the device's slices per expert (1 where the GEMM is memory-bound,
    5 on CPU); k = E is always dense (the same terms)."""
    from meo_ds.moe.functional import sparse_merge_pays
    assert sparse_merge_pays(3, 16, 5, "cuda") and not sparse_merge_pays(4, 16, 4, "cuda")
    assert sparse_merge_pays(16, 16, 4, "cpu") and not sparse_merge_pays(16, 16, 5, "cpu")
    assert not sparse_merge_pays(1, 8, 8, "cpu")
    w = torch.empty(16, 4, 4)  # uses_sparse_merge applies the rule of the weight's device
    assert meo.uses_sparse_merge(16, w, 4) and not meo.uses_sparse_merge(16, w, 5)


def test_one_expert_gates_pass_no_gradient_so_the_layer_detaches_them():
    """k = 1: the softmax over one logit is the constant 1 and passes exactly 0 back, which is why
    MEOLinear may hand the merge detached gates (skipping the dots' GEMM) without changing a gradient."""
    logits = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    gates, _ = topk_softmax_gates(logits, 1)
    (gates * torch.randn(6, 8, dtype=torch.float64)).sum().backward()
    assert torch.equal(gates.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    layer = make_layer("swiglu", experts=4, k=1, noisy=True).train()
    layer(torch.randn(2, 5, 6, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)).aux_loss.backward()
    assert all(lin.gate_weight.grad.abs().max() > 0 for lin in layer.linears.values())  # the balance loss


def test_sparse_recompute_does_not_keep_merged_weights():
    """The sparse path saves what the dense one saves (x, gates) plus the [N, k] expert ids."""
    n, t, d, experts, k = 8, 2, 16, 32, 2
    w = torch.randn(experts, d, d, requires_grad=True)
    b = torch.randn(experts, d, requires_grad=True)
    x = torch.randn(n, t, d, requires_grad=True)
    _, gates, idx = _routed_gates(n, experts, k, seed=15, dtype=torch.float32)
    assert meo.uses_sparse_merge(n, w, k)
    saved = saved_numel(lambda: merged_linear(x, gates.detach(), w, b, recompute=True, top_idx=idx), w, b)
    assert saved <= n * t * d + n * experts + n * k


def test_merged_linear_rejects_bad_top_idx():
    w = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="top_idx must be int64"):
        merged_linear(torch.randn(2, 3, 5), torch.rand(2, 4), w, top_idx=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="top_idx must be int64"):
        merged_linear(torch.randn(2, 3, 5), torch.rand(2, 4), w, top_idx=torch.zeros(2, 1, dtype=torch.int32))


def _layer_grads(layer: MEOLayer, x: torch.Tensor, mask: torch.Tensor) -> list:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x, mask)
    probe = torch.randn(out.hidden.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(16))
    (out.hidden * probe).sum().backward()
    return [out.hidden.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_sparse_merge_equals_dense_and_naive_reference(level, causal, activation, monkeypatch):
    layer = make_layer(activation, causal=causal, level=level, experts=8, k=2)
    if level == "token":
        randomise_token_blocks(layer)
    x = torch.randn(3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    mask[2, :2] = False  # left padding
    taken = []
    monkeypatch.setattr(meo, "uses_sparse_merge", lambda *a: taken.append("sparse") or True)
    sparse = _layer_grads(layer, x, mask)
    assert taken and all(lin.merged_experts == 2 for lin in layer.linears.values())
    monkeypatch.setattr(meo, "uses_sparse_merge", lambda *a: False)
    dense = _layer_grads(layer, x, mask)
    assert len(sparse) == len(dense) == 2 + len([p for p in layer.parameters() if p.requires_grad])
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(sparse[0], naive_layer(layer, x, mask), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal,activation", [(False, "gelu"), (True, "swiglu")])
def test_exported_meo_layer_matches_a_sparse_merging_layer_bit_for_bit(causal, activation):
    """Our layer merges sparsely here (3 groups x k=2 < 16 experts); the export, which merges all its
    groups in one piece with the same rule, does too on CPU. fp32: within rounding (where a dense
    merge runs, a GEMM may sum in another order than ascending experts)."""
    from meo_ds.export.hf_remote import modeling_meo as remote
    from meo_ds.export.hf_remote.configuration_meo import MeoConfig
    from meo_ds.export.layout import moe_key
    from meo_ds.moe import build_moe_layer

    torch.manual_seed(0)
    cfg = MoEConfig(kind="meo", num_experts=16, top_k=2, activation=activation, segment_len=8, meo_level="token")
    ours = build_moe_layer(cfg, 16, 24, causal=causal).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    hf_cfg = MeoConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, moe=dict(vars(cfg)))
    theirs = remote.MEO(hf_cfg, hf_cfg.moe, causal)
    theirs.load_state_dict({moe_key(k): v for k, v in ours.state_dict().items() if moe_key(k) is not None}, strict=True)
    x = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        want = ours(x, mask).hidden
        got = theirs(x, mask)
    assert all(lin.merged_experts == 2 for lin in ours.linears.values())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert want.abs().max() > 0.1
