"""Checkpoint directory -> HuggingFace export directory (the work behind `meo-export`).

Steps: consolidate the DeepSpeed checkpoint (meo_ds.export.consolidate); rebuild the run config
the trainer saved in the checkpoint's client state (that of an older version migrated:
config.loading) and its model, parallelism-free like the consolidated weights; check the weights against a meta-device
instance of our model (every key and shape, so a checkpoint of another architecture fails
before anything is written); choose the target (auto: native Mixtral for top-k MoE language
models that Mixtral can express, native Llama/Mistral for dense ones, our remote-code classes
otherwise); write weights + config, tokenizer, generation config and model card into a staging
directory that is renamed onto OUTPUT_DIR only when everything succeeded. The tokenizer's
decoder depends on the task (meo_ds/export/tokenizer.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from meo_ds.export import card, native, remote
from meo_ds.export.consolidate import Consolidated, consolidate
from meo_ds.export.errors import ExportError
from meo_ds.export.tokenizer import write_tokenizer

TARGETS = ("auto", "mixtral", "llama", "mistral", "meo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    out_dir: Path
    target: str
    tag: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs
def run_config_of(ck: Consolidated) -> Any:
    """The RunConfig the trainer stored in client_state['config'] (keys that moved since: moved).
    Its model is parallelism-free, as the consolidated weights (every expert) are."""
    from meo_ds.config import ConfigError, migrate_saved_run_config, run_config_from_dict

    tree = ck.metadata.get("config")
    if not isinstance(tree, dict):
        raise ExportError(
            f"checkpoint {ck.path} holds no run config (client_state['config']); export needs a checkpoint "
            f"written by meo-train, which records the model configuration"
        )
    try:
        cfg = run_config_from_dict(migrate_saved_run_config(tree))
    except (ConfigError, ValueError, TypeError) as err:
        raise ExportError(f"checkpoint {ck.path}: its run config cannot be rebuilt: {err}") from err
    if cfg.model is None:
        raise ExportError(f"checkpoint {ck.path}: its run config has no model section")
    return cfg


def load_model(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[torch.nn.Module, Any]:
    """Our own model (meo_ds.models) holding a trainer checkpoint's weights, on CPU in eval mode,
    and the run config it was trained with: for evaluation or generation without ranks."""
    return model_of(consolidate(checkpoint_dir, tag))


def model_of(ck: Consolidated) -> tuple[torch.nn.Module, Any]:
    """Our model holding the consolidated weights `ck` (CPU, eval mode) and its run config."""
    from meo_ds import models

    cfg = run_config_of(ck)
    check_weights(cfg.model, ck.state_dict)
    model = models.build_model(cfg.model)
    model.load_state_dict(ck.state_dict)
    return model.eval(), cfg


def check_weights(model_cfg: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Every parameter/buffer of our model is present with its shape, and nothing else."""
    from meo_ds import models

    with torch.device("meta"):
        model = models.build_model(model_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state_dict))
    extra = sorted(set(state_dict) - set(want))
    wrong = sorted(k for k in set(want) & set(state_dict) if tuple(state_dict[k].shape) != want[k])
    if missing or extra or wrong:
        parts = [f"{name}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for name, keys in
                 (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys]
        raise ExportError("checkpoint weights do not match the model its run config describes; " + "; ".join(parts))


def find_tokenizer(cfg: Any, explicit: Optional[str]) -> Optional[Path]:
    """--tokenizer (a tokenizer.model / tokenizer.json file or a directory holding one), else the one of
    <data.path> (tokenizer.model, else tokenizer.json), else the manifest's tokenizer source."""
    from meo_ds.data.hf_tokenizer import tokenizer_file

    if explicit:
        path = tokenizer_file(explicit)
        if not path.is_file():
            raise ExportError(f"--tokenizer {explicit} does not exist (or holds no tokenizer.model / tokenizer.json)")
        return path
    data_dir = Path(cfg.data.path) if cfg.data.path else None
    if data_dir is not None and tokenizer_file(data_dir).is_file():
        return tokenizer_file(data_dir)
    manifest = data_manifest(cfg)
    source = ((manifest or {}).get("tokenizer") or {}).get("source")
    if source and Path(source).is_file():
        return Path(source)
    return None


def data_manifest(cfg: Any) -> Optional[dict]:
    path = Path(cfg.data.path) / "manifest.json" if cfg.data.path else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def check_output(out_dir: Path, overwrite: bool, checkpoint_dir: Path) -> None:
    """The output may be replaced wholesale (--overwrite) and is staged beside itself, so it must be
    neither the checkpoint directory, nor inside it or one of its tags, nor above it."""
    out = out_dir.resolve()
    sources = [Path(checkpoint_dir).resolve()]
    if sources[0].is_dir():
        sources += [p.resolve() for p in sources[0].iterdir() if p.is_dir()]  # tags, wherever links lead
    for src in sources:
        relation = ("is" if out == src else "lies inside" if src in out.parents
                    else "contains" if out in src.parents else None)
        if relation:
            raise ExportError(f"output {out_dir} {relation} the checkpoint {src}; exporting there would "
                              f"{'replace' if overwrite else 'mix files into'} the checkpoint. Choose an output "
                              f"directory outside {checkpoint_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out_dir} is not empty; choose another or pass --overwrite")


# --------------------------------------------------------------------------- export
def choose_target(task: str, model_cfg: Any, requested: str) -> str:
    if requested not in TARGETS:
        raise ExportError(f"unknown target {requested!r}; use one of {', '.join(TARGETS)}")
    if requested == "meo":
        return "meo"
    if task != "lm":
        if requested != "auto":
            raise ExportError(f"a {task} model cannot be exported as {requested}: only language models map to "
                              f"native transformers architectures; use --target meo (or auto)")
        return "meo"
    if requested == "auto":
        return native.native_target(model_cfg) or "meo"
    problems = native.incompatibilities(model_cfg, requested)
    if problems:
        raise ExportError(f"this model cannot be exported as {requested}: " + "; ".join(problems) +
                          ". Use --target meo (remote code) or --target auto")
    return requested


def export(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    tag: Optional[str] = None,
    target: str = "auto",
    tokenizer: Optional[str] = None,
    require_tokenizer: bool = True,
    dtype: Optional[str] = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> ExportResult:
    """Export a meo_ds DeepSpeed checkpoint as a HuggingFace model directory."""
    from meo_ds.data.hf_tokenizer import load_tokenizer
    from meo_ds.data.io import staging_dir

    out_dir = Path(out_dir)
    check_output(out_dir, overwrite, Path(checkpoint_dir))
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    ck = consolidate(checkpoint_dir, tag)
    cfg = run_config_of(ck)
    chosen = choose_target(cfg.task, cfg.model, target)
    check_weights(cfg.model, ck.state_dict)
    tok_path = find_tokenizer(cfg, tokenizer)
    if tok_path is None and require_tokenizer:
        raise ExportError("no tokenizer found (data.path/tokenizer.model or tokenizer.json of the run config is "
                          "missing); pass --tokenizer PATH/TO/tokenizer.model (or tokenizer.json), or --no-tokenizer "
                          "to export weights only")
    state_dict = ck.state_dict
    if dtype is not None:
        state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        special = load_tokenizer(tok_path).special_ids() if tok_path is not None else None
    except ValueError as err:  # not a tokenizer, or a special token its vocabulary lacks
        raise ExportError(str(err)) from None
    result = ExportResult(out_dir=out_dir, target=chosen, tag=ck.tag, notes=list(ck.notes))
    with staging_dir(out_dir) as tmp:
        hf_model = write_model(tmp, chosen, cfg, state_dict, max_shard_size, special)
        if tok_path is not None:
            write_tokenizer(tmp, tok_path, cfg.task)
        else:
            result.notes.append("no tokenizer exported")
        _write_card(tmp, chosen, cfg, ck, hf_model.config.to_dict(), Path(checkpoint_dir), out_dir)
        result.files = sorted(p.name for p in tmp.iterdir())
    return result


def write_model(tmp: Path, target: str, cfg: Any, state_dict: dict, max_shard_size: str = "2GB",
                special_ids: Optional[dict] = None) -> Any:
    """Weights + config (+ the remote code) of `target` into tmp; cfg: the run config (task, model).
    `special_ids` (the tokenizer's pad/bos/eos, None where it has none) replace the configs' defaults
    (meo_ds's own tokenizers: pad 0, bos 2, eos 3)."""
    if target == "meo":
        model = remote.build_hf_model(cfg.task, cfg.model, state_dict)
    else:
        model = native.build_hf_model(target, cfg.model, state_dict)
    if special_ids is not None:
        configs = [model.config]
        if getattr(model, "generation_config", None) is not None:
            configs.append(model.generation_config)
        for config in configs:
            for name in ("pad", "bos", "eos"):
                setattr(config, f"{name}_token_id", special_ids[name])
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
    if target == "meo":
        remote.copy_code(tmp)
    return model


def _write_card(tmp: Path, target: str, cfg: Any, ck: Consolidated, hf_config: dict, checkpoint_dir: Path,
                out_dir: Path) -> None:
    run_tree = cfg.to_dict()
    logs = card.find_logs(checkpoint_dir, run_tree)
    step = ck.metadata.get("trainer_step", ck.global_steps)
    source = {"checkpoint": str(checkpoint_dir), "tag": ck.tag, "global_steps": ck.global_steps,
              "expert_parallel_size": cfg.parallel.ep_size, "world_size": ck.metadata.get("world_size"),
              "deepspeed": ck.metadata.get("ds_version")}
    text = card.render_card(
        title=f"{cfg.name} ({cfg.task}, {target})",
        target=target,
        hf_config=hf_config,
        moe=remote.moe_summary(cfg.task, cfg.model),
        run_config=run_tree,
        data_manifest=data_manifest(cfg),
        metrics=card.logged_metrics(logs, up_to_step=step),
        step=step,
        source={k: v for k, v in source.items() if v is not None},
        usage=remote.usage(cfg.task, target, str(out_dir.resolve())),
    )
    (tmp / "README.md").write_text(text)
