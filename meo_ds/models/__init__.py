"""Model zoo: the MoE language model (config_class('lm') -> LMConfig, build_model(cfg) -> MoELM)."""
from meo_ds.models.config import LMConfig, ModelConfigError, config_class
from meo_ds.models.lm import ModelOutput, MoELM, build_model

__all__ = ["LMConfig", "ModelConfigError", "ModelOutput", "MoELM", "build_model", "config_class"]
