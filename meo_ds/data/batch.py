"""What a loader's batch means to the model and to the token count (trainer and evaluation).

A batch is a dict of int64/bool tensors (see LMLoader, MTLoader). `model_inputs` keeps the keys the
model's forward takes (each loader lists them in its MODEL_INPUTS; bookkeeping keys such as the
translation batch's pair `index` stay behind) and moves them to the device; `target_tokens`
counts the predicted tokens, the labels that are not IGNORE_INDEX (padding): the weight of the
batch's mean loss in every token-weighted sum. `source_tokens` counts an encoder's real input
tokens (the translation batch's `src_mask`; 0 for a batch without a source), for throughput.
"""
from __future__ import annotations

from typing import Iterable

import torch

IGNORE_INDEX = -100  # a label the loss skips (padding); torch's cross_entropy default


def model_inputs(batch: dict, device: torch.device, names: Iterable[str]) -> dict:
    """The tensors of `batch` named in `names`, on `device`."""
    wanted = set(names)
    return {k: v.to(device) for k, v in batch.items() if k in wanted and torch.is_tensor(v)}


def target_tokens(batch: dict) -> int:
    """Predicted tokens of `batch` (labels other than IGNORE_INDEX); one host read of a count."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def source_tokens(batch: dict) -> int:
    """Real source tokens of `batch` (src_mask True: source + eos, padding excluded); 0 without a source."""
    return int(batch["src_mask"].sum()) if "src_mask" in batch else 0
