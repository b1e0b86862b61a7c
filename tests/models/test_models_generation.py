"""LM generation: cached decoding gives the same tokens as full recomputation, for every MoE kind."""
import pytest
import torch

from meo_ds.models import build_model
from meo_ds.models.generation import generate, sample_next
from test_models_lm import KINDS, tiny


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached(kind):
    torch.manual_seed(1)
    m = build_model(tiny(kind)).eval()
    prompt = torch.randint(0, 32, (2, 5))
    a = generate(m, prompt, 10, use_cache=True)
    b = generate(m, prompt, 10, use_cache=False)
    assert a.shape == (2, 15) and torch.equal(a, b)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sa = generate(m, prompt, 8, temperature=1.0, top_k=5, top_p=0.9, generator=ga)
    sb = generate(m, prompt, 8, temperature=1.0, top_k=5, top_p=0.9, use_cache=False, generator=gb)
    assert torch.equal(sa, sb)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(200, 1)
    assert set(sample_next(logits, 1.0, top_k=2).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5).tolist()) == {0}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)
