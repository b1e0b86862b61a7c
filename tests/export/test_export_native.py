"""Native mapping of our LM: dense -> Llama / Mistral, top-k -> Mixtral (logits equal), and refusals."""
from __future__ import annotations

import pytest
import torch

from meo_ds.export import native
from meo_ds.export.errors import ExportError
from meo_ds.models import LMConfig, build_model
from meo_ds.moe import MoEConfig


def _lm(moe=None, **kw) -> LMConfig:
    return LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, moe=moe, **kw)


@pytest.mark.parametrize("target,moe,extra", [
    ("llama", None, {"tie_embeddings": True}), ("mistral", None, {}),
    ("mixtral", MoEConfig(kind="topk", num_experts=4, top_k=2, expert_hidden=24), {"moe_every": 1, "moe_offset": 0}),
])
def test_native_logits_equal(target, moe, extra) -> None:
    torch.manual_seed(0)
    cfg = _lm(moe, **extra)
    ours = build_model(cfg).eval()
    assert native.native_target(cfg) == ("mixtral" if moe else "llama")
    hf = native.build_hf_model(target, cfg, ours.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason() -> None:
    every_other = _lm(MoEConfig(kind="topk", num_experts=4, top_k=2))
    assert native.native_target(every_other) is None
    with pytest.raises(ExportError, match=r"layers \[0\] are dense"):
        native.build_hf_model("mixtral", every_other, build_model(every_other).state_dict())
    no_renorm = _lm(MoEConfig(kind="topk", num_experts=4, top_k=2, renormalize=False), moe_every=1, moe_offset=0)
    assert "not renormalised" in " ".join(native.incompatibilities(no_renorm, "mixtral"))
    assert "dense model" in " ".join(native.incompatibilities(_lm(), "mixtral"))
