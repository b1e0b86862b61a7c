"""RunConfig: the single description of one training run.

A run config is a YAML or JSON file with these sections (every key optional except where noted):

    task: lm                 # "lm" (language modelling) or "translation"
    name: demo               # run name: logs and checkpoints go to <logging.out_dir>
    model: {preset: lm-tiny, moe: {kind: xmoe}}   # a preset name or file, plus overrides
    data: {...}              # DataConfig
    train: {...}             # TrainConfig (batch, optimizer, schedule, precision, stopping)
    checkpoint: {...}        # CheckpointConfig
    logging: {...}           # LoggingConfig
    eval: {...}              # EvalConfig
    debug: {...}             # DebugConfig: fault-injection hooks used by the tests

`model` is resolved through the models package: `preset` names a file in meo_ds/presets (or a
path to a YAML/JSON file); the other keys of `model` override the preset's values. Command-line
overrides `--set section.key=value` (value parsed as YAML, e.g. `--set model.moe.kind=xmoe`,
`--set train.betas=[0.9,0.95]`) are applied to the merged dictionary before it becomes
dataclasses, so an unknown key anywhere is an error naming the key and the valid keys.

The DeepSpeed JSON config is a second input; `reconcile_ds_config` checks it against the run
config (batch sizes, precision, gradient clipping, ZeRO stage, world size vs expert-parallel
size) and fills what it leaves out, so both agree before any rank does work.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from meo_ds.moe.config import MoEConfig

Task = Literal["lm", "translation"]
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["auto", "cosine", "inverse_sqrt", "constant"]


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the problem and the fix."""


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    # Directory written by `meo-prepare` (token shards + tokenizer). Required.
    path: str = ""
    # LM: tokens per training sequence. Translation: maximum source/target length in tokens.
    seq_len: int = 128
    # Translation: tokens (source + target) per rank per micro-batch (token-based batching).
    max_tokens: int = 2048
    # Validation split name inside `path`.
    val_split: str = "validation"
    # Shuffle seed of the training stream (the data order is a pure function of it and the step).
    seed: int = 1234
    # Check every shard against the manifest's sha256 before training (once per machine; reads the
    # whole corpus). Off: only the cheap checks (sizes, indexes; token ids batch by batch).
    verify: bool = False


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # sequences (LM) or sentence pairs (translation) per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 10
    # "auto": warmup + cosine for LM, warmup + inverse square root for translation.
    schedule: Schedule = "auto"
    weight_decay: float = 0.1  # never applied to norms, biases, router/gate weights
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables); written into the DS config
    # None: take it from the DeepSpeed config; else it must agree with it.
    precision: Optional[Precision] = None
    seed: int = 1234
    # Stop the run after this many consecutive optimizer steps with a non-finite loss.
    max_nonfinite_in_a_row: int = 5
    # Collectives that wait longer than this fail (a dead rank makes the others exit).
    dist_timeout_s: float = 300.0


@dataclass
class CheckpointConfig:
    # "" -> <logging.out_dir>/checkpoints
    dir: str = ""
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # keep the newest K complete checkpoints
    save_at_end: bool = True
    save_initial: bool = False  # also save the untrained weights as step 0
    # "auto": resume from <dir>/latest when it exists; "none": start fresh; else a checkpoint dir.
    resume: str = "auto"
    # Start from these model weights (a checkpoint dir, or a tag dir inside one) when not resuming.
    init_from: str = ""


@dataclass
class LoggingConfig:
    out_dir: str = "runs/default"  # metrics.jsonl, train.log, monitor output, checkpoints
    interval: int = 10  # one log line every N steps (rank 0)
    throughput_warmup_steps: int = 2  # tokens/s excludes the first N steps (compilation, caches)
    # Which accelerator's peak FLOPS to use for MFU; "auto" detects it (CPU: MFU is n/a).
    peak_flops_device: str = "auto"


@dataclass
class EvalConfig:
    interval: int = 0  # evaluate every N steps (0: only at the end)
    at_end: bool = True
    max_batches: int = 20  # validation micro-batches per rank
    # Translation: BLEU/chrF with beam search on the first N validation pairs.
    bleu: bool = True
    bleu_sentences: int = 200
    beam_size: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0


@dataclass
class DebugConfig:
    """Fault-injection hooks for the tests. Leave them at their defaults for real runs."""

    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps
    die_at_step: int = 0  # rank `die_rank` exits abruptly at the start of this step
    die_in_save_at_step: int = 0  # rank `die_rank` exits in the middle of this step's checkpoint
    die_rank: int = 1
    step_sleep_s: float = 0.0  # sleep after each step (lets a test signal a run mid-way)


@dataclass
class RunConfig:
    task: Task = "lm"
    name: str = "run"
    model: Any = None  # the models package's config dataclass (resolved from a preset)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # ----------------------------------------------------------------- derived values
    @property
    def schedule(self) -> str:
        if self.train.schedule != "auto":
            return self.train.schedule
        return "cosine" if self.task == "lm" else "inverse_sqrt"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or os.path.join(self.logging.out_dir, "checkpoints"))

    def moe_configs(self) -> list[MoEConfig]:
        return list(iter_moe_configs(self.model))

    @property
    def ep_size(self) -> int:
        sizes = {m.ep_size for m in self.moe_configs()}
        if len(sizes) > 1:
            raise ConfigError(f"MoE layers disagree on ep_size ({sorted(sizes)}); use one expert-parallel size")
        return sizes.pop() if sizes else 1

    def to_dict(self) -> dict:
        return to_dict(self)

    # ----------------------------------------------------------------- checks
    def validate(self, world_size: Optional[int] = None) -> "RunConfig":
        problems = list(self._problems(world_size))
        if problems:
            raise ConfigError(listing("invalid run config", problems))
        return self

    def _problems(self, world_size: Optional[int]) -> Iterator[str]:
        t, c = self.train, self.checkpoint
        if self.task not in ("lm", "translation"):
            yield f"task={self.task!r} is unknown; use 'lm' or 'translation'"
        if self.model is None:
            yield "model is missing; set model.preset (a name in meo_ds/presets or a YAML file)"
        if not self.data.path:
            yield "data.path is empty; point it at a directory written by `meo-prepare`"
        for name in ("seq_len", "max_tokens"):
            if getattr(self.data, name) < 1:
                yield f"data.{name}={getattr(self.data, name)} must be >= 1"
        if self.data.seed < 0:
            yield f"data.seed={self.data.seed} must be >= 0 (it seeds numpy's generator of the data order)"
        if not t.dist_timeout_s > 0:
            yield f"train.dist_timeout_s={t.dist_timeout_s} must be > 0 (seconds a collective may wait)"
        if not (0 <= t.betas[0] < 1 and 0 <= t.betas[1] < 1) or not t.eps > 0:
            yield f"train.betas={list(t.betas)} must lie in [0, 1) and train.eps={t.eps} must be > 0"
        for name in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(t, name) < 1:
                yield f"train.{name}={getattr(t, name)} must be >= 1"
        if not t.lr > 0:
            yield f"train.lr={t.lr} must be > 0"
        if t.warmup_steps < 0:
            yield f"train.warmup_steps={t.warmup_steps} must be >= 0"
        if t.schedule == "inverse_sqrt" and t.warmup_steps < 1:
            yield "train.schedule=inverse_sqrt needs train.warmup_steps >= 1"
        if not 0 <= t.min_lr_ratio <= 1:
            yield f"train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]"
        if t.grad_clip < 0:
            yield f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)"
        if t.precision not in (None, "fp32", "bf16", "fp16"):
            yield f"train.precision={t.precision!r} is unknown; use fp32, bf16, fp16 or null (from the DS config)"
        if t.max_nonfinite_in_a_row < 1:
            yield f"train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row} must be >= 1"
        if c.interval < 0 or c.keep_last < 1:
            yield "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1"
        if self.logging.interval < 1:
            yield f"logging.interval={self.logging.interval} must be >= 1"
        if self.eval.beam_size < 1:
            yield f"eval.beam_size={self.eval.beam_size} must be >= 1"
        if self.eval.interval < 0 or self.eval.max_batches < 1:
            yield "eval.interval must be >= 0 and eval.max_batches >= 1"
        if self.logging.throughput_warmup_steps < 0:
            yield f"logging.throughput_warmup_steps={self.logging.throughput_warmup_steps} must be >= 0"
        yield from self._moe_problems(world_size)

    def _moe_problems(self, world_size: Optional[int]) -> Iterator[str]:
        if self.model is None:
            return
        sizes = sorted({m.ep_size for m in self.moe_configs()})
        if len(sizes) > 1:
            yield f"MoE layers disagree on ep_size ({sizes}); set one expert-parallel size"
        for moe in self.moe_configs():
            try:
                moe.validate(world_size)
            except ValueError as err:
                yield str(err)
                return


def listing(title: str, problems: list[str]) -> str:
    """One problem: one line; several: one per line."""
    if len(problems) == 1:
        return f"{title}: {problems[0]}"
    return f"{title}:\n  - " + "\n  - ".join(problems)


# --------------------------------------------------------------------------- dict <-> dataclass
def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are ConfigErrors."""
    if data is None:
        return cls()
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(_join(where, k)) for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{where}={value!r} must have {len(args)} items")
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        return dict(value)
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain JSON-able dicts (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def iter_moe_configs(obj: Any) -> Iterator[MoEConfig]:
    """Every MoEConfig inside a (nested) model config dataclass."""
    if isinstance(obj, MoEConfig):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_moe_configs(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_moe_configs(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_moe_configs(v)


# --------------------------------------------------------------------------- files and overrides
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
    tree = dict(tree)
    model_tree = tree.pop("model", None)
    cfg = from_dict(RunConfig, tree)
    cfg.model = build_model_config(model_tree, cfg.task) if model_tree is not None else None
    return cfg


# --------------------------------------------------------------------------- models integration
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
    return Path(__file__).resolve().parent / "presets"


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


# --------------------------------------------------------------------------- DeepSpeed config
def load_ds_config(path: Optional[str]) -> dict:
    if not path:
        raise ConfigError("no DeepSpeed config; pass --deepspeed_config ds_configs/<one>.json (see ds_configs/README.md)")
    return read_mapping(path)


def ds_precision(ds: dict) -> Optional[str]:
    bf16 = bool(ds.get("bf16", {}).get("enabled", False)) or bool(ds.get("bfloat16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError("the DeepSpeed config enables both bf16 and fp16; enable one")
    return "bf16" if bf16 else "fp16" if fp16 else None


def reconcile_ds_config(cfg: RunConfig, ds: dict, world_size: int, device: str = "cuda") -> dict:
    """Check the DeepSpeed config against the run config; return it completed. Raises ConfigError.

    The run config owns batch sizes, gradient clipping and the optimizer; the DeepSpeed config
    owns ZeRO, precision (unless train.precision is set) and monitors. Values both give must agree.
    """
    ds, problems = copy.deepcopy(ds), []
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have not in (None, "auto") and have != value:
            problems.append(
                f"DeepSpeed config {key}={have} but the run config gives {value} (train.micro_batch_size="
                f"{t.micro_batch_size} x train.grad_accum={t.grad_accum} x world size {world_size}); "
                f"remove {key} from the DeepSpeed config or make the two agree"
            )
        ds[key] = value
    problems += _precision_problems(cfg, ds, device)
    clip = ds.get("gradient_clipping", "auto")
    if clip not in (None, "auto") and float(clip) != t.grad_clip:
        problems.append(f"DeepSpeed config gradient_clipping={clip} but train.grad_clip={t.grad_clip}; make them agree")
    ds["gradient_clipping"] = t.grad_clip
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"the DeepSpeed config has an {key!r} section; the trainer builds AdamW and the LR "
                            f"schedule from the run config's train section: remove {key!r}")
    problems += _zero_problems(cfg, ds)
    problems += _monitor_problems(cfg, ds)
    if problems:
        raise ConfigError(listing("run config and DeepSpeed config disagree", problems))
    ds["zero_allow_untested_optimizer"] = True  # our AdamW subclass (skippable steps)
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own log lines
    return ds


def _precision_problems(cfg: RunConfig, ds: dict, device: str) -> list[str]:
    have = ds_precision(ds)
    want = cfg.train.precision
    problems = []
    if want is not None and have is not None and want != have:
        problems.append(f"train.precision={want} but the DeepSpeed config enables {have}; make them agree "
                        f"(or set train.precision: null to follow the DeepSpeed config)")
    if want is not None and have is None:
        explicit = any(ds.get(k, {}).get("enabled") is False for k in ("bf16", "fp16"))
        if want != "fp32" and explicit:
            problems.append(f"train.precision={want} but the DeepSpeed config disables it; enable {want} there")
        if want in ("bf16", "fp16"):
            ds.setdefault(want, {})["enabled"] = True
    precision = want or have or "fp32"
    if precision == "fp16" and device == "cpu":
        problems.append("fp16 training is not supported on the CPU accelerator; use ds_configs/cpu_fp32.json")
    cfg.train.precision = precision
    return problems


def _zero_problems(cfg: RunConfig, ds: dict) -> list[str]:
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        return [f"zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3"]
    kinds = sorted({m.kind for m in cfg.moe_configs()})
    if stage == 3 and any(k != "meo" for k in kinds):
        return [f"ZeRO stage 3 needs every MoE layer to be MEO (its experts are ordinary parameters); this model "
                f"has {kinds}: use ZeRO stage 2 (ds_configs/zero2_*.json)"]
    return []


def _monitor_problems(cfg: RunConfig, ds: dict) -> list[str]:
    problems = []
    for key in ("csv_monitor", "tensorboard", "wandb", "comet"):
        section = ds.get(key)
        if not isinstance(section, dict) or not section.get("enabled"):
            continue
        if key in ("csv_monitor", "tensorboard"):
            if section.get("output_path") in (None, "", "auto"):
                section["output_path"] = os.path.join(cfg.logging.out_dir, "monitor") + os.sep
            if section.get("job_name") in (None, "", "auto"):
                section["job_name"] = cfg.name
        if key == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                problems.append("the DeepSpeed config enables tensorboard but the tensorboard package is not "
                                "installed: `pip install tensorboard`, or disable it (csv_monitor needs nothing)")
    return problems
