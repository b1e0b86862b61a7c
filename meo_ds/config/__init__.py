"""RunConfig: the single description of one training run, and the checks that keep it sound.

    cfg = load_run_config("run.yaml", ["model.moe.kind=xmoe", "parallel.ep_size=8"]).validate(world_size)
    ds = reconcile_ds_config(cfg, load_ds_config("ds_configs/zero2_bf16.json"), world_size)

One part per file:

    errors.py     ConfigError (every check raises it, naming the key and the fix), listing
    schema.py     the sections as dataclasses (RunConfig, ParallelConfig, DataConfig, TrainConfig,
                  ...): every key documented where it is defined; RunConfig.validate
    convert.py    nested dict <-> dataclass, generic: unknown keys and wrong types are errors
    loading.py    YAML/JSON files, model presets (meo_ds/presets), `--set` overrides, keys that
                  moved (an error in a user's config, migrated silently in a saved one)
    ds_config.py  the DeepSpeed JSON config reconciled with the run config

Import from the package (`from meo_ds.config import RunConfig`); the files are its layout.
"""
from .convert import from_dict, to_dict
from .ds_config import ds_precision, load_ds_config, reconcile_ds_config, zero_stage
from .errors import ConfigError, listing
from .loading import (MOVED_KEYS, _resolve_model_tree, apply_override, build_model_config, deep_merge,
                      load_run_config, migrate_saved_run_config, parse_text, preset_dict, preset_dir, preset_names,
                      read_mapping, read_preset, run_config_from_dict)
from .schema import (AUTO, FROM_CORPUS, CheckpointConfig, DataConfig, DebugConfig, EvalConfig, LoggingConfig, ParallelConfig,
                     Precision, RunConfig, Schedule, Task, TrainConfig, iter_moe_configs, split_auto_sizes)

__all__ = [
    "AUTO", "FROM_CORPUS", "CheckpointConfig", "ConfigError", "DataConfig", "DebugConfig", "EvalConfig", "LoggingConfig", "MOVED_KEYS",
    "ParallelConfig", "Precision", "RunConfig", "Schedule", "Task", "TrainConfig", "apply_override",
    "build_model_config", "deep_merge", "ds_precision", "from_dict", "iter_moe_configs", "listing",
    "load_ds_config", "load_run_config", "migrate_saved_run_config", "parse_text", "preset_dict", "preset_dir",
    "preset_names", "read_mapping", "read_preset", "reconcile_ds_config", "run_config_from_dict", "split_auto_sizes", "to_dict",
    "zero_stage",
]
