"""Per-kind MoEConfig fields (registry.py): another kind's field is an error; kind switches and saved configs load."""
from __future__ import annotations

from pathlib import Path

import pytest

from meo_ds.config import load_run_config, run_config_from_dict
from meo_ds.moe import MoEConfig, MoEConfigError, registry

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "launch" / "configs" / "demo_lm.yaml")
XMOE_GPT = str(ROOT / "launch" / "configs" / "xmoe_gpt_lm.yaml")


@pytest.mark.parametrize("kind,field,value,owner", [
    ("topk", "threshold", 0.5, "'xmoe'"),
    ("xmoe", "segment_len", 16, "'meo'"),
    ("meo", "dispatch", "capacity", "'topk' or 'xmoe'"),
    ("xmoe", "renormalize", False, "'topk'"),
])
def test_a_field_of_another_kind_is_an_error_naming_its_kind(kind, field, value, owner):
    with pytest.raises(MoEConfigError, match=f"{field}={value!r} is a setting of kind {owner}, not of kind '{kind}'"):
        MoEConfig(kind=kind, **{field: value}).validate()
    MoEConfig(kind=kind, **{field: MoEConfig.__dataclass_fields__[field].default}).validate()  # its default: fine


@pytest.mark.parametrize("overrides", [["model.moe.kind=xmoe"], ["model.moe.kind=meo", "parallel.ep_size=1"]])
def test_switching_the_kind_of_a_topk_preset_works(overrides):
    cfg = load_run_config(DEMO, overrides)
    assert cfg.model.moe.kind == overrides[0].split("=")[1]
    cfg.model.moe.validate()


def test_leaving_an_xmoe_preset_names_the_fields_to_reset():
    with pytest.raises(MoEConfigError, match=r"max_k=8 is a setting of kind 'xmoe'.*\(max_k=None\)"):
        load_run_config(XMOE_GPT, ["model.moe.kind=topk"]).model.moe.validate()
    load_run_config(XMOE_GPT, ["model.moe.kind=topk", "model.moe.max_k=null"]).model.moe.validate()


@pytest.mark.parametrize("kind", ["topk", "xmoe", "meo"])
def test_saved_flat_configs_load(kind):
    """A checkpoint's run config holds every MoEConfig field (the other kinds' at their defaults)."""
    cfg = load_run_config(DEMO, [f"model.moe.kind={kind}", "parallel.ep_size=1"])
    saved = cfg.to_dict()
    assert set(saved["model"]["moe"]) == set(MoEConfig.__dataclass_fields__)
    assert run_config_from_dict(saved).model.moe == cfg.model.moe
    run_config_from_dict(saved).model.moe.validate()


def test_every_kind_reads_only_moe_config_fields():
    fields = set(MoEConfig.__dataclass_fields__)
    for kind in registry.kinds():
        assert set(registry.get(kind).fields) <= fields, kind
    assert registry.owners("top_k") == ("topk", "meo")
