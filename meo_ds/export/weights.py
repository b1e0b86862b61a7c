"""Putting checkpoint weights into a transformers model built on the meta device (native and remote targets).

`dtype_of` picks the dtype the exported config records (the most common floating dtype of the
weights). `load_exact` assigns the renamed weights (assign=True, so nothing is copied onto the
meta tensors) and demands that they fit exactly: every parameter of the model comes from the
checkpoint and no checkpoint weight is left over. A tied output projection is not loaded but tied
to the input embedding afterwards.
"""
from __future__ import annotations

import torch

from meo_ds.export.errors import ExportError


def dtype_of(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The most common floating dtype among the weights (fp32 when there is none)."""
    floats = [v.dtype for v in state_dict.values() if v.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def load_exact(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Assign state_dict to the meta-device model; ExportError (naming `what`) unless the keys match exactly."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    want = set(model.state_dict())
    if tied:
        state_dict.pop("lm_head.weight", None)
        want.discard("lm_head.weight")
    missing, extra = sorted(want - set(state_dict)), sorted(set(state_dict) - want)
    if missing or extra:
        raise ExportError(f"weights do not fit {what}: missing {missing[:4]}, unexpected {extra[:4]}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.tie_weights()
