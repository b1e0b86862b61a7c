"""MoE layers on one GPU, in-process: the grouped-GEMM expert path equals the per-expert loop in
bf16 (forward and gradients), and each layer's forward syncs with the host only where
tests/moe/test_host_syncs.py allows it, as CUDA's own sync debug mode counts. Skipped without CUDA."""
from __future__ import annotations

import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_helpers import cuda_accelerator  # noqa: E402
from meo_ds.moe import LocalExperts, MoEConfig, build_moe_layer  # noqa: E402
from meo_ds.moe.experts import _grouped_mm_usable  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device())
HOPPER = torch.cuda.get_device_capability(DEVICE)[0] >= 9


@pytest.fixture(autouse=True)
def _cuda_accelerator():
    with cuda_accelerator():
        yield


def _bank(counts):
    torch.manual_seed(0)
    experts = LocalExperts(len(counts), "swiglu", 128, 256).to(DEVICE, torch.bfloat16)
    x = torch.randn(sum(counts), 128, device=DEVICE, dtype=torch.bfloat16)
    probe = torch.randn_like(x)
    return experts, x, probe


def _run(experts, x, probe, grouped: bool):
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    experts.grouped = grouped
    y = experts(x, COUNTS)
    (y.float() * probe.float()).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in experts.named_parameters()}
    return y.float(), x.grad.float(), grads


COUNTS = [37, 0, 130, 1, 64, 200, 8, 72]  # an empty expert, a single row, uneven sizes


@pytest.mark.skipif(not HOPPER, reason="torch._grouped_mm needs compute capability 9+")
def test_grouped_gemm_equals_per_expert_loop_in_bf16():
    experts, x, probe = _bank(COUNTS)
    assert _grouped_mm_usable(x, experts.deepspeed_experts), "the bf16 SwiGLU bank on a Hopper GPU must take the grouped GEMM"
    y_loop, dx_loop, g_loop = _run(experts, x, probe, grouped=False)
    y_grp, dx_grp, g_grp = _run(experts, x, probe, grouped=True)
    # bf16 has 8 bits of mantissa: both paths round differently, never by more than a few ulp.
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_grp, y_loop, **tol)
    torch.testing.assert_close(dx_grp, dx_loop, **tol)
    assert set(g_grp) == set(g_loop)
    for name in g_loop:
        scale = g_loop[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(g_grp[name] / scale, g_loop[name] / scale, **tol, msg=f"gradient of {name}")
    # The expert with no rows gets a zero gradient on both paths.
    assert g_grp["deepspeed_experts.1.w1.weight"].abs().max() == 0


KINDS = {  # name: (MoE config, host syncs allowed per forward without padding; tests/moe/test_host_syncs.py)
    "topk capacity": (dict(kind="topk", dispatch="capacity"), 0),
    "topk dropless": (dict(kind="topk", dispatch="dropless"), 1),
    "xmoe capacity": (dict(kind="xmoe", dispatch="capacity", threshold=0.7), 0),
    "xmoe dropless": (dict(kind="xmoe", dispatch="dropless", threshold=0.7), 1),
    "meo": (dict(kind="meo", noisy_gating=True), 0),
    "meo causal": (dict(kind="meo", noisy_gating=True, segment_len=16), 0),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_forward_host_syncs_under_cuda_sync_debug_mode(name):
    kw, allowed = KINDS[name]
    torch.manual_seed(0)
    layer = build_moe_layer(MoEConfig(num_experts=8, top_k=2, **kw), 128, 256, causal="segment_len" in kw)
    layer = layer.to(DEVICE, torch.bfloat16).train()
    x = torch.randn(4, 64, 128, device=DEVICE, dtype=torch.bfloat16)
    layer(x)  # warm-up: lazy initialisation, the grouped-GEMM probe
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == allowed, f"{name}: {len(syncs)} host syncs in one forward, allowed {allowed}: {syncs}"
    assert out.stats.num_tokens.device == DEVICE and int(out.stats.num_tokens) == 4 * 64
