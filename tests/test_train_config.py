"""Run config + DeepSpeed config checks, LR schedules, skippable AdamW, checkpoint bookkeeping.

In-process (no ranks): every problem must be a ConfigError naming the key and the fix.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from meo_ds import checkpoint as ckpt
from meo_ds.config import (ConfigError, DataConfig, RunConfig, TrainConfig, apply_override, from_dict,
                           reconcile_ds_config)
from meo_ds.moe.config import MoEConfig
from meo_ds.optim import SkippableAdamW, lr_at, no_decay


def make_cfg(**train) -> RunConfig:
    cfg = RunConfig(task="lm", data=DataConfig(path="/nowhere"), train=TrainConfig(**train))
    cfg.model = {"moe": MoEConfig(num_experts=4)}  # any container of MoEConfigs works
    cfg.parallel.ep_size = 2
    return cfg


def test_unknown_keys_name_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'train.lrr'.*valid keys of train: .*lr"):
        from_dict(RunConfig, {"train": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"'bogus'"):
        from_dict(RunConfig, {"bogus": {}})


def test_types_and_literals_are_checked():
    with pytest.raises(ConfigError, match=r"train.steps='ten' must be an integer"):
        from_dict(RunConfig, {"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"task='vision' is not one of"):
        from_dict(RunConfig, {"task": "vision"})
    cfg = from_dict(RunConfig, {"train": {"lr": "3e-4", "betas": [0.9, 0.98]}})  # YAML 1.1 reads 3e-4 as str
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.98)


def test_overrides_parse_yaml_values_and_create_sections():
    tree: dict = {"model": {"moe": {"kind": "topk"}}}
    apply_override(tree, "model.moe.kind=xmoe")
    apply_override(tree, "train.betas=[0.9, 0.95]")
    apply_override(tree, "checkpoint.interval=5")
    assert tree == {"model": {"moe": {"kind": "xmoe"}}, "train": {"betas": [0.9, 0.95]}, "checkpoint": {"interval": 5}}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(tree, "train.steps")


def test_validate_lists_every_problem():
    cfg = make_cfg(steps=0, lr=-1.0)
    cfg.data.path = ""
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=3)
    text = str(err.value)
    for needle in ("train.steps=0", "train.lr=-1.0", "data.path is empty", "world size 3 is not divisible by ep_size=2"):
        assert needle in text, text


def test_expert_parallel_size_is_checked_against_world_experts_and_kind():
    cfg = make_cfg()
    cfg.validate(world_size=4)
    for ep, world, needle in ((3, 3, "num_experts=4 is not divisible by ep_size=3"),
                              (0, 2, "parallel.ep_size=0 must be an integer >= 1"),
                              (4, 6, "world size 6 is not divisible by ep_size=4")):
        cfg.parallel.ep_size = ep
        with pytest.raises(ConfigError, match=needle):
            cfg.validate(world_size=world)
    cfg.parallel.ep_size, cfg.model["moe"].kind = 2, "meo"
    with pytest.raises(ConfigError, match=r"\(meo\) move weights, not tokens: their experts are data-parallel; set parallel.ep_size=1"):
        cfg.validate(world_size=2)
    cfg.model = {}  # a dense model has no experts to shard
    with pytest.raises(ConfigError, match="no top-k or XMoE layer"):
        cfg.validate(world_size=2)


def test_ep_size_under_model_moe_moved_to_parallel(tmp_path: Path):
    from meo_ds.config import load_run_config, migrate_saved_run_config, run_config_from_dict

    with pytest.raises(ConfigError, match=r"model.moe.ep_size moved to parallel.ep_size: write `parallel: "
                                          r"\{ep_size: 2\}` in the config \(or --set parallel.ep_size=2\)"):
        load_run_config(None, ["model=tiny", "model.moe.ep_size=2"])
    old = tmp_path / "old.yaml"
    old.write_text("model: {preset: tiny, moe: {ep_size: 4}}\n")
    with pytest.raises(ConfigError, match="model.moe.ep_size moved to parallel.ep_size"):
        load_run_config(str(old))
    # A run config saved in an older checkpoint: migrated silently, the input left as it was.
    saved = load_run_config(None, ["model=tiny", "data.path=x"]).to_dict()
    del saved["parallel"]
    saved["model"]["moe"]["ep_size"] = 2
    migrated = migrate_saved_run_config(saved)
    assert saved["model"]["moe"]["ep_size"] == 2 and "ep_size" not in migrated["model"]["moe"]
    cfg = run_config_from_dict(migrated)
    assert cfg.parallel.ep_size == 2 and cfg.model.moe.num_experts == 4
    assert migrate_saved_run_config(cfg.to_dict()) == cfg.to_dict()  # today's layout: unchanged


def test_ds_config_batch_mismatch_is_an_error_and_missing_values_are_filled():
    cfg = make_cfg(micro_batch_size=4, grad_accum=2)
    ds = reconcile_ds_config(cfg, {"zero_optimization": {"stage": 2}}, world_size=2, device="cpu")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["gradient_clipping"] == cfg.train.grad_clip and cfg.train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"train_batch_size=32 but the run config gives 16"):
        reconcile_ds_config(make_cfg(micro_batch_size=4, grad_accum=2), {"train_batch_size": 32}, 2, "cpu")


def test_micro_batch_size_is_lm_only_and_translation_counts_one_token_budget():
    lm = make_cfg()
    assert lm.train.micro_batch_size is None and lm.micro_batch_size == 8  # unset: the LM default
    mt = make_cfg(micro_batch_size=1)
    mt.task = "translation"
    mt.validate(world_size=2)  # 1 is accepted
    mt.train.micro_batch_size = None
    mt.validate(world_size=2)
    ds = reconcile_ds_config(mt, {}, world_size=2, device="cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (1, 2)
    mt.train.micro_batch_size = 8
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=8 does not apply to translation: .*data.max_tokens=2048"):
        mt.validate(world_size=2)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=0 must be >= 1"):
        make_cfg(micro_batch_size=0).validate(world_size=2)


def test_ds_config_precision_clipping_optimizer_zero3_monitor():
    with pytest.raises(ConfigError, match="train.precision=fp32 but the DeepSpeed config enables bf16"):
        reconcile_ds_config(make_cfg(precision="fp32"), {"bf16": {"enabled": True}}, 2, "cuda")
    with pytest.raises(ConfigError, match="fp16 training is not supported on the CPU"):
        reconcile_ds_config(make_cfg(), {"fp16": {"enabled": True}}, 2, "cpu")
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but train.grad_clip=1.0"):
        reconcile_ds_config(make_cfg(), {"gradient_clipping": 0.5}, 2, "cpu")
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        reconcile_ds_config(make_cfg(), {"optimizer": {"type": "Adam"}}, 2, "cpu")
    with pytest.raises(ConfigError, match="ZeRO stage 3 needs every MoE layer's experts to be ordinary parameters"):
        reconcile_ds_config(make_cfg(), {"zero_optimization": {"stage": 3}}, 2, "cpu")
    meo = make_cfg()
    meo.model = {"moe": MoEConfig(kind="meo")}
    reconcile_ds_config(meo, {"zero_optimization": {"stage": 3}}, 2, "cpu")
    ds = reconcile_ds_config(make_cfg(), {"csv_monitor": {"enabled": True, "output_path": "auto"}}, 2, "cpu")
    assert ds["csv_monitor"]["output_path"].startswith("runs/default/monitor")


def test_shipped_ds_configs_reconcile():
    root = Path(__file__).resolve().parents[1] / "ds_configs"
    for path in sorted(root.glob("*.json")):
        ds = json.loads(path.read_text())
        cfg = make_cfg()
        if ds.get("zero_optimization", {}).get("stage") == 3:
            cfg.model = {"moe": MoEConfig(kind="meo")}
        device = "cpu" if path.name.startswith("cpu") else "cuda"
        reconcile_ds_config(cfg, ds, world_size=2, device=device)


def test_lr_schedules():
    kw = dict(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(5, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(40, schedule="inverse_sqrt", **kw) == pytest.approx(math.sqrt(10 / 40))


def test_no_weight_decay_on_norms_biases_and_router():
    lin = torch.nn.Linear(4, 4)
    assert no_decay("layers.0.norm.weight", torch.nn.Parameter(torch.ones(4)))
    assert no_decay("layers.0.mlp.bias", lin.bias)
    assert no_decay("layers.0.moe.router.weight", lin.weight)
    assert no_decay("layers.0.ffn.fc1.gate_weight", lin.weight)  # MEO gate
    assert not no_decay("layers.0.attn.q_proj.weight", lin.weight)


def test_skipped_step_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.skip_next_step = True
    opt.step()
    assert torch.equal(p.data, torch.ones(3)) and not opt.state[p]
    opt.step()
    assert not torch.equal(p.data, torch.ones(3)) and opt.state[p]["step"] == 1


def test_latest_pointer_and_pruning(tmp_path: Path):
    for step in (2, 4, 6):
        (tmp_path / ckpt.tag_for(step)).mkdir()
        (tmp_path / ckpt.tag_for(step) / ckpt.COMPLETE).write_text("{}")
    (tmp_path / ckpt.tag_for(8)).mkdir()  # a save that died: no COMPLETE marker
    (tmp_path / "latest").write_text(ckpt.tag_for(6))
    assert ckpt.resolve("auto", tmp_path).tag == ckpt.tag_for(6)
    assert ckpt.prune(tmp_path, keep_last=2) == [ckpt.tag_for(2)]
    assert ckpt.remove_incomplete(tmp_path) == [ckpt.tag_for(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", ckpt.tag_for(4), ckpt.tag_for(6)]
    assert ckpt.resolve("none", tmp_path) is None and ckpt.resolve("auto", tmp_path / "empty") is None
    (tmp_path / "latest").write_text(ckpt.tag_for(8))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve("auto", tmp_path)


def test_paper_size_run_config_checks_out_for_64_ranks():
    from meo_ds.config import load_ds_config, load_run_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_run_config(str(root / "launch" / "configs" / "xmoe_gpt_lm.yaml"), ["data.path=/data/lm"])
    cfg.validate(world_size=64)
    ds = reconcile_ds_config(cfg, load_ds_config(str(root / "ds_configs" / "zero2_bf16.json")), 64, "cuda")
    assert ds["train_batch_size"] == 512 and cfg.parallel.ep_size == 8 and cfg.model.moe.kind == "xmoe"
    with pytest.raises(ConfigError, match="world size 12 is not divisible by ep_size=8"):
        cfg.validate(world_size=12)


def test_paper_size_translation_config_checks_out_for_8_ranks():
    from meo_ds.config import load_ds_config, load_run_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_run_config(str(root / "launch" / "configs" / "xmoe_wmt_mt.yaml"))
    cfg.validate(world_size=8)
    ds = reconcile_ds_config(cfg, load_ds_config(str(root / "ds_configs" / "zero2_bf16.json")), 8, "cuda")
    assert cfg.task == "translation" and cfg.schedule == "inverse_sqrt" and cfg.parallel.ep_size == 8
    assert (cfg.model.moe.kind, cfg.model.moe.num_experts, cfg.model.d_model) == ("xmoe", 64, 512)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2


def test_malformed_yaml_json_and_override_name_the_file_and_place(tmp_path: Path):
    from meo_ds.config import load_ds_config, load_run_config

    bad = tmp_path / "run.yaml"
    bad.write_text("task: lm\ntrain:\n  steps: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4:5: not valid YAML \(.*expected ',' or '\]'.*\); fix the file"):
        load_run_config(str(bad))
    bad.write_bytes(b"task: lm\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        load_run_config(str(bad))
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"ds\.json:1:35: not valid JSON \(Expecting property name"):
        load_ds_config(str(ds))
    with pytest.raises(ConfigError, match=r"override 'train.betas=\[0.9': the value is not valid YAML"):
        apply_override({}, "train.betas=[0.9")


def test_unvalidated_values_that_failed_inside_the_loop_are_config_errors():
    cfg = make_cfg(dist_timeout_s=0.0, betas=(0.9, 1.5))
    cfg.data.seed, cfg.data.seq_len = -1, 0
    cfg.eval.max_batches = 0
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=2)
    for needle in ("data.seed=-1 must be >= 0", "data.seq_len=0 must be >= 1", "train.dist_timeout_s=0.0 must be > 0",
                   "train.betas=[0.9, 1.5] must lie in [0, 1)", "eval.max_batches >= 1"):
        assert needle in str(err.value), str(err.value)
