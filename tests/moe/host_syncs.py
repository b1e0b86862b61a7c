"""Count, on the CPU, the operations that make a GPU wait for the host (a host sync).

A CUDA stream runs ahead of Python until Python needs a value or a shape that only the device
knows. `count_host_syncs()` patches the torch entry points that do that and counts their calls
while the block runs:

- device -> Python conversions: item, int(), float(), bool(), index(), tolist();
- data-dependent output shapes: nonzero, boolean-mask indexing and assignment, bincount (on
  CUDA it reads the largest id to size its output), masked_select, unique.

On a GPU `torch.cuda.set_sync_debug_mode` sees the same events (tests/gpu use it); here the
counter is the only way to see them. A call made while another counted call runs (e.g. a
conversion inside nonzero) counts once.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch

_METHODS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "nonzero", "bincount",
            "masked_select", "unique")
_FUNCTIONS = ("nonzero", "bincount", "masked_select", "unique", "argwhere")


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """with count_host_syncs() as n: ...  -> n[name] calls per sync-forcing entry point."""
    counts: Counter = Counter()
    depth = [0]
    saved = []

    def wrap(owner, name, when=lambda *a, **k: True):
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def counted(*args, **kwargs):
            if depth[0] == 0 and when(*args, **kwargs):
                counts[name.strip("_")] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(owner, name, counted)

    for name in _METHODS:
        if hasattr(torch.Tensor, name):
            wrap(torch.Tensor, name)
    for name in _FUNCTIONS:
        wrap(torch, name)
    wrap(torch.Tensor, "__getitem__", lambda self, index: _has_bool_index(index))
    wrap(torch.Tensor, "__setitem__", lambda self, index, value: _has_bool_index(index))
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
