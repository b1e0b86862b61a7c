"""meo-train checkpoints (2 CPU ranks) -> meo-export -> transformers, compared with our model.

One launch trains three tiny LMs with the real Trainer: top-k MoE in every layer (ep=2, ZeRO-2;
exports as native Mixtral), XMoE (ep=2; remote code) and MEO (data-parallel; remote code).
Each export must give the logits of meo_ds's model loaded from the same checkpoint, and greedy
generate() must return our generation's tokens, in a fresh process where meo_ds is not importable.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from meo_ds.export import remote
from meo_ds.export.cli import main as export_main
from meo_ds.export.exporter import load_model
from meo_ds.models import generation
from tests.distributed import run_ranks
from tests.export.export_fresh import run_fresh_check

HERE = Path(__file__).resolve().parent
DS = str(HERE.parents[1] / "ds_configs" / "cpu_fp32.json")
MOE = {"num_experts": 4, "top_k": 2}
RUNS = {  # name: (moe overrides, model overrides, expected target)
    "topk": ({"kind": "topk"}, {"moe_every": 1, "moe_offset": 0}, "mixtral"),
    "xmoe": ({"kind": "xmoe", "threshold": 0.6}, {}, "meo"),
    "meo": ({"kind": "meo", "noisy_gating": True, "segment_len": 8}, {}, "meo"),
}
EP_SIZE = {"topk": 2, "xmoe": 2, "meo": 1}  # MEO's experts are data-parallel


def _config(root: Path, data: Path, name: str) -> Path:
    moe, model, _ = RUNS[name]
    out = root / name
    out.mkdir(parents=True)
    tree = {
        "task": "lm", "name": name,
        "model": {"vocab_size": 1000, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
                  "max_seq_len": 64, **model, "moe": {**MOE, **moe}},
        "parallel": {"ep_size": EP_SIZE[name]},
        "data": {"path": str(data), "seq_len": 32},
        "train": {"steps": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "seed": 3},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "logging": {"out_dir": str(out), "interval": 2},
        "eval": {"max_batches": 1},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from meo_ds.data.demo import build_demo

    root = tmp_path_factory.mktemp("e2e")
    data = build_demo("lm", root / "demo", max_chars=200_000, vocab_size=1000)
    configs = [str(_config(root, data, name)) for name in RUNS]
    run_ranks(HERE / "train_many_worker.py", 2, ["--deepspeed_config", DS, *configs], timeout=300)
    return root


def _reference(model: torch.nn.Module, path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (2, 20), generator=g)
    prompt = ids[:, :5]
    with torch.no_grad():
        logits = model(ids).logits
        greedy = generation.generate(model, prompt, max_new_tokens=12)
    torch.save({"input_ids": ids, "logits": logits, "prompt": prompt, "greedy": greedy}, path)


def test_export_matches_our_model_in_a_fresh_process(trained: Path, tmp_path: Path) -> None:
    specs = []
    for name, (_, _, target) in RUNS.items():
        ckpt, out = trained / name / "checkpoints", tmp_path / f"hf_{name}"
        assert export_main([str(ckpt), str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == (["MixtralForCausalLM"] if target == "mixtral" else ["MeoForCausalLM"])
        if target == "meo":
            assert "auto_map" in config and (out / "modeling_meo.py").is_file()
            for file_name, source in remote.SHIPPED.items():  # the library's own math files, byte for byte
                assert (out / file_name).read_bytes() == source.read_bytes(), file_name
        card = (out / "README.md").read_text()
        assert "train/loss" in card and "eval/val_loss" in card and RUNS[name][0]["kind"] in card
        assert {"tokenizer.json", "tokenizer.model"} <= {p.name for p in out.iterdir()}
        _reference(load_model(ckpt)[0], tmp_path / f"ref_{name}.pt")
        specs.append({"dir": str(out), "task": "lm", "trust_remote_code": target == "meo",
                      "ref": str(tmp_path / f"ref_{name}.pt")})
    assert len(specs) == len(RUNS)
    run_fresh_check(specs, tmp_path)


def test_registered_auto_classes_load_without_remote_code(trained: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert export_main([str(trained / "xmoe" / "checkpoints"), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__module__ == "meo_ds.export.hf_remote.modeling_meo"
    ids = torch.randint(4, 1000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_model(trained / "xmoe" / "checkpoints")[0](ids).logits)


def test_unmappable_target_fails_without_output(trained: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained / "xmoe" / "checkpoints"
    assert export_main([str(ckpt), str(tmp_path / "o1"), "--target", "mixtral"]) == 2
    assert "xmoe" in capsys.readouterr().err
    assert export_main([str(ckpt), str(tmp_path / "o2"), "--target", "llama"]) == 2
    assert not any(tmp_path.iterdir())


def test_missing_expert_file_fails_without_output(trained: Path, tmp_path: Path, capsys) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "topk" / "checkpoints", ckpt)
    tag = (ckpt / "latest").read_text().strip()
    (ckpt / tag / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 2
    assert "missing expert file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_checkpoint_saved_with_model_moe_ep_size_still_exports_and_resumes(trained: Path, tmp_path: Path) -> None:
    """Checkpoints written before the run config had a `parallel` section record ep_size under
    model.moe (and again in client_state): export and the trainer's resume checks migrate it."""
    import shutil

    from meo_ds import checkpoint as ckpt_lib
    from meo_ds.config import load_run_config
    from meo_ds.preflight import check_checkpoints

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "topk" / "checkpoints", ckpt)
    tag = (ckpt / "latest").read_text().strip()
    main = ckpt / tag / "mp_rank_00_model_states.pt"
    state = torch.load(main, weights_only=False)
    old_ep = state["config"].pop("parallel")["ep_size"]  # the layout of the older version
    state["config"]["model"]["moe"]["ep_size"] = state["ep_size"] = old_ep
    torch.save(state, main)
    marker = json.loads((ckpt / tag / ckpt_lib.COMPLETE).read_text())
    marker["files"][main.name] = ckpt_lib.file_digest(main)
    (ckpt / tag / ckpt_lib.COMPLETE).write_text(json.dumps(marker))

    model, cfg = load_model(ckpt)
    assert old_ep == 2 and cfg.parallel.ep_size == 2 and not hasattr(cfg.model.moe, "ep_size")
    want = load_model(trained / "topk" / "checkpoints")[0].state_dict()
    assert model.state_dict().keys() == want.keys()
    assert all(torch.equal(value, want[key]) for key, value in model.state_dict().items())
    assert export_main([str(ckpt), str(tmp_path / "hf")]) == 0
    assert "| expert_parallel_size | 2 |" in (tmp_path / "hf" / "README.md").read_text()
    run = load_run_config(str(trained / "topk" / "run.yaml"), [f"checkpoint.resume={ckpt}"])
    check_checkpoints(run, 2)  # same model, same data stream: the resume would go ahead
