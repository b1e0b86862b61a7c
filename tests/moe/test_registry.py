"""Adding a router is one Router subclass, its registration and a test: this hash router exists only here."""
from __future__ import annotations

import pytest
import torch

from meo_ds.export import layout, remote
from meo_ds.models import LMConfig, build_model
from meo_ds.moe import MoEConfig, MoEConfigError, Router, RouterOutput, build_moe_layer, register_router, registry


class HashRouter(Router):
    """Each token goes to one expert picked by hashing it (a fixed random projection), weight 1."""

    kind = "hash"

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("plane", torch.randn(d_model, generator=torch.Generator().manual_seed(0)))

    @classmethod
    def from_config(cls, cfg: MoEConfig, d_model: int) -> "HashRouter":
        return cls(d_model, cfg.num_experts)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        ids = ((x.float() @ self.plane).abs() * 1000).long().remainder(self.num_experts).unsqueeze(1)
        ones = torch.ones(ids.shape, device=x.device)
        probs = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter(1, ids, 1.0)
        zero = probs.new_zeros(())
        return RouterOutput(ids, ones, ones, ones.bool(), probs, zero, zero)


@pytest.fixture
def hash_kind():
    register_router(HashRouter)
    yield
    registry.unregister("hash")


def test_hash_router_trains_through_moe_layer(hash_kind):
    torch.manual_seed(0)
    layer = build_moe_layer(MoEConfig(kind="hash", num_experts=4), 8, 16)
    x, target = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        out = layer(x)
        loss = (out.hidden - target).square().mean() + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert out.stats.experts_per_token_mean.item() == 1.0 and out.stats.expert_load.sum().item() == 12


def test_model_export_card_and_flops_ask_the_kind(hash_kind):
    moe = MoEConfig(kind="hash", num_experts=4)
    cfg = LMConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8, moe=moe)
    model = build_model(cfg)
    model(torch.randint(0, 32, (2, 8)), targets=torch.randint(0, 32, (2, 8))).loss.backward()
    layer = model.layers[1].moe
    assert layer.flops_per_token(8) == 2 * 8 * 4 + 1 * 3 * 2 * 8 * 16  # router + the nominal one expert
    assert layer.flops_per_token(8, executed=True, rows_per_token=2.5) == 2 * 8 * 4 + 2.5 * 3 * 2 * 8 * 16
    assert remote.moe_summary("lm", cfg)[0]["kind"] == "hash"
    assert layout.mixtral_moe_problems(cfg, moe)[0] == "its MoE layers are hash (Mixtral routes top-k)"
    with pytest.raises(MoEConfigError, match="threshold=0.5 is a setting of kind 'xmoe', not of kind 'hash'"):
        MoEConfig(kind="hash", threshold=0.5).validate()
