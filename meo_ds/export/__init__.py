"""HuggingFace export of meo_ds checkpoints (`meo-export`, see meo_ds/export/cli.py).

    from meo_ds.export import export, consolidate
    export("runs/x/checkpoints", "hf/x")          # target auto: Mixtral / Llama / meo remote code
    consolidate("runs/x/checkpoints").state_dict  # full weights on CPU, any EP size and ZeRO stage
    model, run_cfg = load_model("runs/x/checkpoints")  # our own model with those weights

Importing this package also registers our remote-code classes with transformers' Auto classes
(`register_auto_classes`), so an export with `model_type` "meo_ds_moe" loads through
AutoConfig / AutoModelForCausalLM / AutoModelForSeq2SeqLM without trust_remote_code when meo_ds
is installed; without meo_ds, `trust_remote_code=True` loads the copied code from the export.
"""
from __future__ import annotations

from meo_ds.export.consolidate import CheckpointError, Consolidated, consolidate
from meo_ds.export.errors import ExportError


def register_auto_classes() -> None:
    """Register MeoConfig / MeoForCausalLM / MeoForSeq2SeqLM with the transformers Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from meo_ds.export.hf_remote.configuration_meo import MeoConfig
    from meo_ds.export.hf_remote.modeling_meo import MeoForCausalLM, MeoForSeq2SeqLM

    AutoConfig.register(MeoConfig.model_type, MeoConfig, exist_ok=True)
    AutoModelForCausalLM.register(MeoConfig, MeoForCausalLM, exist_ok=True)
    AutoModelForSeq2SeqLM.register(MeoConfig, MeoForSeq2SeqLM, exist_ok=True)


def export(*args, **kwargs):
    """See meo_ds.export.exporter.export."""
    from meo_ds.export.exporter import export as _export

    return _export(*args, **kwargs)


def load_model(*args, **kwargs):
    """See meo_ds.export.exporter.load_model."""
    from meo_ds.export.exporter import load_model as _load_model

    return _load_model(*args, **kwargs)


register_auto_classes()

__all__ = ["CheckpointError", "Consolidated", "ExportError", "consolidate", "export", "load_model",
           "register_auto_classes"]
