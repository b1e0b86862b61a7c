"""meo_ds: a DeepSpeed expert-parallel trainer for Mixture-of-Experts models (top-k MoE, XMoE, MEO)."""

__version__ = "0.1.0"
