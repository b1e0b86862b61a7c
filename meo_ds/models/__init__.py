"""Model zoo: the MoE language model and the MoE translation model.

    cfg = config_class("lm")(...)          # LMConfig; "translation" -> MTConfig
    model = build_model(cfg)               # MoELM / MoETranslationModel
"""
import torch.nn as nn

from meo_ds.models.config import LMConfig, ModelConfigError, MTConfig, config_class
from meo_ds.models.lm import ModelOutput, MoELM
from meo_ds.models.mt import MoETranslationModel


def build_model(cfg: LMConfig | MTConfig) -> nn.Module:
    """The model a config describes."""
    if isinstance(cfg, LMConfig):
        return MoELM(cfg)
    if isinstance(cfg, MTConfig):
        return MoETranslationModel(cfg)
    raise TypeError(f"build_model: unsupported config type {type(cfg).__name__}; use LMConfig or MTConfig")


__all__ = ["LMConfig", "MTConfig", "ModelConfigError", "ModelOutput", "MoELM", "MoETranslationModel",
           "build_model", "config_class"]
