"""From files, presets and `--set` overrides to a RunConfig; saved configs of older versions.

A run config is a YAML or JSON file (schema.py lists its sections). `model` is resolved through
the models package: `preset` names a file in meo_ds/presets (or a path to a YAML/JSON file) and
the other keys of `model` override the preset's values. Command-line overrides
`--set section.key=value` (value parsed as YAML, e.g. `--set model.moe.kind=xmoe`,
`--set train.betas=[0.9,0.95]`) are applied to the merged dictionary before it becomes
dataclasses (convert.py), so an unknown key anywhere is an error naming the key and the valid
keys. Model overrides land on top of the preset, so the preset is resolved first.
`model.vocab_size: auto` / `model.max_seq_len: auto` stay None in the model config until
pre-flight reads them from the corpus (schema.py, FROM_CORPUS).

Keys that moved (MOVED_KEYS, e.g. `model.moe.ep_size` -> `parallel.ep_size`) are an error
naming the new key when a user writes them, and are moved silently in the run configs saved
inside older checkpoints (`migrate_saved_run_config`, used by resume and export).
"""
from __future__ import annotations

import copy
import json
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from .convert import from_dict
from .errors import ConfigError
from .schema import RunConfig, split_auto_sizes

# Old dotted key (under `model`, any `moe` section) -> where it lives now.
MOVED_KEYS = {"moe.ep_size": "parallel.ep_size"}


# --------------------------------------------------------------------------- files
def read_mapping(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          f"save it as UTF-8") from None
    data = parse_text(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_text(text: str, path: Path) -> Any:
    """JSON (a .json file) or YAML text -> data; a syntax error is a ConfigError naming file, line and column."""
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); fix the file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}{_yaml_where(err)}: not valid YAML ({_yaml_problem(err)}); fix the file") from None


def _yaml_where(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: Exception) -> str:
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    return " ".join(filter(None, [context, problem])) or str(err).splitlines()[0]


# --------------------------------------------------------------------------- overrides
def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict, creating sub-mappings."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value (e.g. model.moe.kind=xmoe)")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = tree
    for key in keys[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
        node = nxt
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it, "
                          f"e.g. {dotted}='\"...\"'") from None


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_run_config(path: Optional[str] = None, overrides: typing.Sequence[str] = (), base: Optional[dict] = None) -> RunConfig:
    """Read a run config file (YAML/JSON), apply `--set` overrides, resolve the model preset."""
    tree = deep_merge(base or {}, read_mapping(path) if path else {})
    # Model overrides must land on top of the preset, so resolve the preset first.
    model_items = [o for o in overrides if o.strip().startswith("model.") or o.strip().startswith("model=")]
    for item in overrides:
        if item not in model_items:
            apply_override(tree, item)
    for item in model_items:  # `model=name` / `model.preset=name` choose the preset itself
        key = item.split("=", 1)[0].strip()
        if key in ("model", "model.preset"):
            apply_override(tree, item)
    tree["model"] = _resolve_model_tree(tree.get("model"), tree.get("task", "lm"))
    for item in model_items:
        key = item.split("=", 1)[0].strip()
        if key not in ("model", "model.preset"):
            if tree["model"] is None:
                tree["model"] = {}
            apply_override(tree, item)
    return run_config_from_dict(tree)


def run_config_from_dict(tree: dict) -> RunConfig:
    """A run config mapping (model resolved) -> RunConfig; a moved key is a ConfigError naming its new place."""
    moved = [f"{old} moved to {new}: write {_example(new, value)}" for old, new, value in _moved_keys(tree)]
    if moved:
        raise ConfigError("; ".join(moved))
    tree = dict(tree)
    model_tree = tree.pop("model", None)
    cfg = from_dict(RunConfig, tree)
    if model_tree is not None:
        model_tree, auto = split_auto_sizes(model_tree)
        cfg.model = build_model_config(model_tree, cfg.task)
        for key in auto:  # read from the corpus by pre-flight (schema.py)
            setattr(cfg.model, key, None)
    return cfg


# --------------------------------------------------------------------------- moved keys
def _moved_keys(tree: dict) -> Iterator[tuple[str, str, Any]]:
    """(old dotted key, new dotted key, value) of every moved key in a run config mapping."""
    yield from _moved_in(tree.get("model"), "model")


def _moved_in(node: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if isinstance(value, dict):
            for moved, new in MOVED_KEYS.items():
                section, name = moved.rsplit(".", 1)
                if key == section and name in value:
                    yield f"{where}.{moved}", new, value[name]
            yield from _moved_in(value, f"{where}.{key}")


def _example(dotted: str, value: Any) -> str:
    section, name = dotted.split(".", 1)
    return f"`{section}: {{{name}: {json.dumps(value)}}}` in the config (or --set {dotted}={json.dumps(value)})"


def migrate_saved_run_config(tree: dict) -> dict:
    """A run config mapping saved by an older meo_ds (inside a checkpoint) in today's layout:
    every moved key taken out of `model` and written to its new place (the first one found wins;
    a value already at the new place is kept). The input is not changed."""
    tree = copy.deepcopy(tree)
    for old, new, value in list(_moved_keys(tree)):
        node = tree
        for key in old.split(".")[:-1]:
            node = node[key]
        node.pop(old.rsplit(".", 1)[1])
        section, name = new.split(".", 1)
        target = tree.setdefault(section, {})
        if isinstance(target, dict):
            target.setdefault(name, value)
    return tree


# --------------------------------------------------------------------------- presets and the models package
def _resolve_model_tree(model: Any, task: str) -> Optional[dict]:
    """{preset: name-or-file, **overrides} or a file path -> the full model dict."""
    if model is None:
        return None
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a preset name, a file, or a mapping; got {model!r}")
    model = dict(model)
    preset = model.pop("preset", None)
    if not preset:
        return model
    preset_task, base = read_preset(preset)
    if preset_task is not None and preset_task != task:
        raise ConfigError(f"model preset {preset!r} is a {preset_task!r} model but the run's task is {task!r}; "
                          f"set task: {preset_task}, or choose one of the {task} presets: {', '.join(preset_names(task))}")
    return deep_merge(base, model)


def preset_dir() -> Path:
    """meo_ds/presets: the shipped model presets."""
    return Path(__file__).resolve().parent.parent / "presets"


def read_preset(preset: str) -> tuple[Optional[str], dict]:
    """A preset name (file in meo_ds/presets) or a YAML/JSON path -> (its task, the model mapping).

    A preset file is `{task: lm|translation, model: {...}}`; a file holding only model keys is
    accepted too (task None: any)."""
    candidate = Path(preset)
    if not candidate.is_file():
        candidate = preset_dir() / f"{preset}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in preset_dir().glob("*.yaml")) if preset_dir().is_dir() else []
        raise ConfigError(f"model preset {preset!r} not found; use a file path or one of: {', '.join(names) or '(none installed)'}")
    data = read_mapping(candidate)
    if isinstance(data.get("model"), dict):
        return data.get("task"), data["model"]
    return None, data


def preset_dict(preset: str) -> dict:
    """The model mapping of a preset (see read_preset)."""
    return read_preset(preset)[1]


def preset_names(task: Optional[str] = None) -> list[str]:
    """Shipped preset names (for `task` only, when given)."""
    names = sorted(p.stem for p in preset_dir().glob("*.yaml"))
    return [n for n in names if task is None or read_preset(n)[0] in (None, task)]


def build_model_config(model_tree: dict, task: str) -> Any:
    """Model mapping -> the models package's config dataclass for `task`."""
    from meo_ds import models

    config_class = getattr(models, "config_class", None)
    if config_class is None:
        raise ConfigError("this installation's meo_ds.models provides no config_class(task); install a complete "
                          "meo_ds (the model zoo) to build models from presets")
    return from_dict(config_class(task), model_tree, "model")
