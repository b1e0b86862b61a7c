"""Export errors: one type for every input the exporter refuses (the message says why and what to do)."""
from __future__ import annotations

from meo_ds.export.consolidate import CheckpointError


class ExportError(ValueError):
    """An export that cannot be done as asked (wrong target, missing tokenizer, output exists...)."""


__all__ = ["CheckpointError", "ExportError"]
